"""Measured tau of a draft, read from the files runs wrote, for its model card.

Three sources, each a run's own output: the training run's metrics.jsonl (the test
split's greedy decoding replayed: `tau`), `evaluate.py --out` (offline, HF) and
benchmark's compare.json (served).  Nothing here computes a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .cli import UserError


@dataclass
class Measurement:
    prompts: str  # the prompt set
    how: str  # replayed / offline / served, and by what
    tau: float  # tokens per decoding round (acceptance length)
    per_position: list  # acceptance rate at each draft position
    speedup: float | None
    date: str  # when the run wrote it (UTC day)
    source: str  # the file it came from
    k: int | None = None  # drafted tokens per round it ran with


def file_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).date().isoformat()


def replayed(run: Path, draft: Path, train: dict) -> Measurement | None:
    """The last test record of the run at or before the draft's step (a checkpoint's, or the end)."""
    path = run / "metrics.jsonl"
    state = draft.parent / "trainer_state.json"
    step = json.loads(state.read_text())["global_step"] if state.exists() else float("inf")
    if not path.exists():
        return None
    tests = [
        r
        for r in map(json.loads, path.read_text().splitlines())
        if r.get("split") == "test" and "tau" in r and r["step"] <= step
    ]
    if not tests:
        return None
    r = tests[-1]
    prompts = train.get("test_data") or f"held-out {train.get('test_fraction')} of {train.get('train_data')}"
    return Measurement(
        prompts,
        f"replayed greedy decoding of the test answers after training step {r['step']} "
        f"({r['rounds']} rounds, k={len(r['round_acceptance'])})",
        r["tau"],
        r["round_acceptance"],
        None,
        r.get("time", file_date(path))[:10],
        str(path),
        len(r["round_acceptance"]),
    )


def read_results(spec: str) -> list[Measurement]:
    """`[NAME=]FILE`: an evaluate.py result or a benchmark compare.json, NAME the prompt set (default: FILE's stem)."""
    name, _, file = spec.rpartition("=")
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{file}: no such results file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not JSON ({e})") from None
    name, date = name or path.stem, file_date(path)
    if isinstance(data, dict) and "tau" in data.get("total", {}):
        t = data["total"]
        return [
            Measurement(
                f"{name} ({t['prompts']} prompts)",
                f"offline, HF greedy chain drafting, k={t['k']}, {'lossless' if t['identical'] else 'NOT lossless'}",
                t["tau"],
                t["acceptance_per_position"],
                t["speedup"],
                date,
                str(path),
                t["k"],
            )
        ]
    if isinstance(data, list) and all(isinstance(r, dict) and "server" in r for r in data):
        return [
            Measurement(
                f"{name} ({r['completed']} requests)",
                f"served by {r['engine']}, concurrency {r['concurrency']}",
                r["acceptance_length"],
                r.get("acceptance_per_position") or [],
                r.get("speedup"),
                date,
                str(path),
                len(r.get("acceptance_per_position") or []) or None,
            )
            for r in data
            if r["server"] == "eagle3" and r.get("acceptance_length") is not None
        ]
    raise UserError(f"{file}: neither an evaluate.py result nor a benchmark compare.json")
