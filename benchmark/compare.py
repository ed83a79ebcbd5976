"""Read the result JSONs of benchmark.sh and print one table and a bar plot: baseline vs EAGLE-3.

    python benchmark/compare.py outputs/benchmark

Files are `<engine>-<baseline|eagle3>-c<concurrency>[-r<repeat>][-<script>].json` (vLLM's
`bench serve` results), one per part of the prompts (benchmark/run.py).  The parts of one
server and concurrency add up: output tokens/s is all their tokens over all their time,
and with repeats (benchmark.sh --repeats) each repeat's speed-up shows the spread.  When
the parts are split by writing system, each row also gets `by_script`: the same row for
that writing system's parts alone, speed-up against the baseline's same parts.
The EAGLE-3 acceptance length and per-position acceptance come from vLLM's spec-decode
counts in the results, or SGLang's `avg_spec_accept_length` in `<stem>.server_info.json`
(the server's running average, read after its last run: a total only, none per script).
Speed-up is EAGLE-3 output tokens/s over the baseline's at the same concurrency.
Writes compare.md, compare.json and compare.png next to the results.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

NAME = re.compile(
    r"^(?P<engine>[a-z]+)-(?P<server>baseline|eagle3)-c(?P<c>\d+)(?:-r(?P<repeat>\d+))?"
    r"(?:-(?P<script>[a-z]+))?\.json$"
)
COLUMNS = [
    "engine",
    "concurrency",
    "server",
    "completed",
    "output_tok_s",
    "tpot_ms",
    "ttft_ms",
    "speedup",
    "speedup_per_repeat",
    "acceptance_length",
    "acceptance_per_position",
]


def _find(obj, key):
    """The first value of `key` anywhere in nested dicts/lists (SGLang nests its server info)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for v in obj:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _throughput(results) -> float:
    results = list(results)
    return sum(r["total_output_tokens"] for r in results) / sum(r["duration"] for r in results)


def _row(
    engine: str, concurrency: int, server: str, parts: dict[tuple, dict], base: dict[tuple, dict], script: str = ""
) -> dict:
    """One server at one concurrency, its parts ({(repeat, script): result}) added up; speed-up
    over the baseline's same parts `base`, in all and (with repeats) per repeat."""
    results = [parts[k] for k in sorted(parts)]  # the order they ran in
    done = sum(r["completed"] for r in results)

    def mean(key):  # per-request means, weighted by each part's requests
        return sum(r[key] * r["completed"] for r in results) / done if done else None

    def repeat(d, n):
        return [r for (i, _), r in d.items() if i == n]

    paired = sorted({i for i, _ in parts} & {i for i, _ in base}) if server != "baseline" else []
    row = {
        "engine": engine,
        "concurrency": concurrency,
        "server": server,
        **({"script": script} if script else {}),
        "completed": f"{done}/{sum(r['num_prompts'] for r in results)}",
        "output_tok_s": _throughput(results),
        "tpot_ms": mean("mean_tpot_ms"),
        "ttft_ms": mean("mean_ttft_ms"),
        "speedup": _throughput(results) / _throughput(base.values()) if base else None,
        "speedup_per_repeat": (
            [_throughput(repeat(parts, n)) / _throughput(repeat(base, n)) for n in paired] if len(paired) > 1 else None
        ),
        "acceptance_length": None,
        "acceptance_per_position": None,
    }
    drafts = sum(r.get("spec_decode_num_drafts") or 0 for r in results)
    if drafts:  # vLLM: per-position rates are accepted tokens at that position per draft
        row["acceptance_length"] = 1 + sum(r["spec_decode_accepted_tokens"] for r in results) / drafts
        rates = [r["spec_decode_per_position_acceptance_rates"] for r in results]
        row["acceptance_per_position"] = [
            sum(rate[i] * r["spec_decode_num_drafts"] for rate, r in zip(rates, results)) / drafts
            for i in range(len(rates[0]))
        ]
    elif not script:  # SGLang's running average is the whole run's, not a writing system's
        row["acceptance_length"] = results[-1].get("sglang_accept_length")
    return row


def read_runs(folder: Path) -> dict[tuple, dict[tuple, dict]]:
    """{(engine, concurrency, server): {(repeat, script): result}} from the result files."""
    runs: dict[tuple, dict[tuple, dict]] = {}
    for path in sorted(folder.glob("*.json")):
        m = NAME.match(path.name)
        if not m:
            continue
        r = json.loads(path.read_text())
        info = path.with_name(path.stem + ".server_info.json")
        if info.exists():
            r["sglang_accept_length"] = _find(json.loads(info.read_text()), "avg_spec_accept_length")
        runs.setdefault((m["engine"], int(m["c"]), m["server"]), {})[int(m["repeat"] or 0), m["script"] or ""] = r
    return runs


def _only(parts: dict[tuple, dict], script: str) -> dict[tuple, dict]:
    return {k: r for k, r in parts.items() if k[1] == script}


def read_results(folder: Path) -> list[dict]:
    """A row per engine, concurrency and server (the order of COLUMNS), with `by_script` rows when
    the prompts were served one writing system at a time."""
    runs, rows = read_runs(folder), []
    for (engine, c, server), parts in runs.items():
        base = runs.get((engine, c, "baseline"), {})
        row = _row(engine, c, server, parts, base)
        scripts = sorted({s for _, s in parts if s})
        if scripts:  # the prompts were served one writing system at a time
            row["by_script"] = {s: _row(engine, c, server, _only(parts, s), _only(base, s), s) for s in scripts}
        rows.append(row)
    return sorted(rows, key=lambda r: (r["engine"], r["concurrency"], r["server"] != "baseline"))


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, list):
        return " ".join(f"{x:.2f}" for x in v)
    return str(v)


def table(rows: list[dict]) -> str:
    """One line per row; with writing systems, a `script` column and each row's by_script rows under it."""
    columns = COLUMNS
    if any("by_script" in r for r in rows):
        columns = COLUMNS[:3] + ["script"] + COLUMNS[3:]
        rows = [s for r in rows for s in [r | {"script": "all"}, *r.get("by_script", {}).values()]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["engine"], r["concurrency"]) for r in rows})
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.6))
    for i, g in enumerate(groups):
        for j, server in enumerate(("baseline", "eagle3")):
            r = next((r for r in rows if (r["engine"], r["concurrency"]) == g and r["server"] == server), None)
            if r is None:
                continue
            ax.bar(
                i + (j - 0.5) * 0.38,
                r["output_tok_s"],
                0.38,
                color="tab:gray" if j == 0 else "tab:blue",
                label=server if i == 0 else None,
            )
            if server == "eagle3" and r["speedup"]:
                ax.annotate(f"{r['speedup']:.2f}x", (i + 0.19, r["output_tok_s"]), ha="center", va="bottom")
    ax.set_xticks(range(len(groups)), [f"{e}\nconcurrency {c}" for e, c in groups])
    ax.set_ylabel("output tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    a = p.parse_args(argv)
    rows = read_results(a.folder)
    if not rows:
        print(f"{a.folder}: no <engine>-<baseline|eagle3>-c<N>.json results", file=sys.stderr)
        return 1
    text = table(rows)
    print(text)
    (a.folder / "compare.md").write_text(text + "\n")
    (a.folder / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, a.folder / "compare.png")
    print(f"wrote {a.folder / 'compare.md'}, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
