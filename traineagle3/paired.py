"""Served tau of two or more drafts, paired on the same prompts, with the interval of each gap.

    python -m traineagle3.paired --target T --draft ours=exported/vllm --draft peer=peer/vllm_draft \\
        --prompts sharegpt=test.jsonl --prompts mt-bench=question.jsonl \\
        [--num-prompts 20] [--max-tokens 256] [--k 3] [--dtype auto] [--out paired/]

Which of two drafts is better is a question about the same prompts: prompts differ far more
from each other than good drafts do, so two drafts scored on different prompts, or one
number each, say little.  Each draft is served in turn by vLLM (benchmark/vllm/serve.sh, the
settings users serve with), every prompt asked greedily, one at a time, and the drafts and
accepted tokens per position of that request read from the server's /metrics.  A draft's tau
is 1 + accepted / drafts over its prompts (the engine's own total).  Each draft after the
first is compared with the first: the gap in tau and its 95% interval from resampling the
prompts (the same resampling for both drafts: paired), and on how many prompts it was
ahead.  Greedy outputs should be the target's whatever the draft: the report says on how
many prompts two drafts' outputs differed (bf16 near-ties can swap a token, and the text
after it), since the comparison is paired only where the texts are the same.

Each draft's requests are kept in OUT/<draft>/<prompts>.json with what they depend on (the
draft folder's files, the prompts, k, the token budget, the dtype); a rerun reuses them, so a
new candidate costs one server, not one per draft.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from .atomic import write_json_atomic
from .cli import Parser, UserError, cli, number
from .precision import AUTO
from .records import read_prompts
from .serving import VllmServer, launched

RESAMPLES = 2000


def named(text: str) -> tuple[str, str]:
    """'name=path' -> (name, path); a bare path is named after its folder or file."""
    name, sep, path = text.partition("=")
    if not sep:
        path, name = text, Path(text.rstrip("/")).stem
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    return name, path


def fingerprint(folder: Path) -> str:
    """The draft folder's files, hashed: a reused result is of these exact weights."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def served_tau(rows: list[dict]) -> float:
    drafts = sum(r["drafts"] for r in rows)
    return 1 + sum(sum(r["accepted"]) for r in rows) / drafts if drafts else 1.0


def per_position(rows: list[dict], k: int) -> list[float]:
    drafts = sum(r["drafts"] for r in rows)
    return [sum(r["accepted"][i] for r in rows) / drafts if drafts else 0.0 for i in range(k)]


def paired_gap(first: list[dict], other: list[dict], seed: int = 0) -> dict:
    """other's tau minus first's on the same prompts, with the 2.5-97.5% of the same gap over
    resamplings of the prompts (both drafts resampled alike)."""
    if [r["id"] for r in first] != [r["id"] for r in other]:
        raise ValueError("paired rows must be the same prompts in the same order")
    arrays = [
        (np.array([r["drafts"] for r in rows], float), np.array([sum(r["accepted"]) for r in rows], float))
        for rows in (first, other)
    ]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(first), (RESAMPLES, len(first)))

    def tau(drafts, accepted):
        return 1 + accepted[picks].sum(1) / np.maximum(drafts[picks].sum(1), 1)

    gaps = tau(*arrays[1]) - tau(*arrays[0])
    ahead = [served_tau([b]) - served_tau([a]) for a, b in zip(first, other)]  # per prompt: how often, not how much
    return {
        "gap": served_tau(other) - served_tau(first),
        "interval": [float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))],
        "ahead": sum(g > 0 for g in ahead),
        "behind": sum(g < 0 for g in ahead),
        "outputs_differ": sum(a["output"] != b["output"] for a, b in zip(first, other)),
    }


def serve_prompts(url: str, prompts: list[dict], max_tokens: int, k: int, label: str) -> list[dict]:
    """Each prompt's first turn, greedy, one request at a time: its output and its drafting counts."""
    server, rows = VllmServer(url), []
    for i, p in enumerate(prompts):
        messages = [{"role": "user", "content": p["turns"][0]}]
        out, drafts, accepted = server.speculative(messages, None, max_tokens, k)
        rows.append({"id": p["id"], "output": out, "drafts": drafts, "accepted": accepted})
        print(f"{label}: prompt {i + 1}/{len(prompts)}, tau so far {served_tau(rows):.3f}", flush=True)
    return rows


def key_of(args, folder: Path, prompts: list[dict]) -> dict:
    """What a draft's served rows depend on."""
    text = json.dumps([p["turns"][0] for p in prompts], ensure_ascii=False).encode()
    return {
        "draft": fingerprint(folder),
        "prompts": hashlib.sha256(text).hexdigest()[:16],
        "target": str(args.target),
        "k": args.k,
        "max_tokens": args.max_tokens,
        "dtype": args.dtype,
    }


def table(results: dict, names: list[str], k: int) -> str:
    """One block per prompt set: each draft's tau and per-position acceptance, its gap to the first."""
    lines = []
    for set_name, by_draft in results.items():
        n = len(by_draft[names[0]]["rows"])
        lines += [
            f"\n{set_name} ({n} prompts)",
            f"{'draft':<16} {'tau':>6}  acceptance per position  gap to {names[0]}",
        ]
        for name in names:
            r = by_draft[name]
            rates = " ".join(f"{x:.2f}" for x in r["acceptance_per_position"])
            gap = ""
            if g := r.get("vs_first"):
                lo, hi = g["interval"]
                gap = (
                    f"{g['gap']:+.3f} (95% {lo:+.3f} to {hi:+.3f}), ahead on {g['ahead']}, behind on {g['behind']}"
                    f"; outputs differ on {g['outputs_differ']}"
                )
            lines.append(f"{name:<16} {r['tau']:>6.3f}  {rates:<{5 * k + 8}}{gap}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the target folder or name vLLM serves")
    p.add_argument(
        "--draft",
        type=named,
        action="append",
        required=True,
        help="NAME=FOLDER, a folder vLLM loads as the EAGLE-3 draft (export's vllm/, speculators' checkpoint); "
        "two or more, the first is the one the others are compared with",
    )
    p.add_argument("--prompts", type=named, action="append", required=True, help="NAME=FILE (MT-bench or chats)")
    p.add_argument("--num-prompts", type=number(int, 2), default=20)
    p.add_argument("--max-tokens", type=number(int, 1), default=256)
    p.add_argument("--k", type=number(int, 1), default=3, help="num_speculative_tokens")
    p.add_argument("--max-model-len", type=number(int, 16), default=2048)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help=f"the server's; {AUTO}")
    p.add_argument("--out", default="paired", help="folder for each draft's served rows and paired.json")
    args = p.parse_args(argv)
    names = [n for n, _ in args.draft]
    if len(names) < 2 or len(set(names)) < len(names):
        p.error(f"--draft: two or more, with distinct names (got {', '.join(names)})")
    return args


@cli
def main(argv=None) -> None:
    import torch

    from .default_model import resolve_target
    from .precision import choose

    args = parse_args(argv)
    prompt_sets = {}
    for name, path in args.prompts:  # the user's files first, before any server
        prompt_sets[name] = read_prompts(path, args.num_prompts, max_turns=1)
        if len(prompt_sets[name]) < 2:
            raise UserError(f"{path}: {len(prompt_sets[name])} usable prompts; a paired interval needs 2 or more")
    folders = {}
    for name, path in args.draft:
        folder = Path(path)
        if not (folder / "config.json").exists():
            raise UserError(f"{path}: no config.json: not a draft folder vLLM loads (export one first)")
        folders[name] = folder.resolve()
    args.dtype = choose("cuda" if torch.cuda.is_available() else "cpu", args.dtype)[0]  # served, and in the key
    target, out = resolve_target(args.target), Path(args.out)
    results: dict = {s: {} for s in prompt_sets}
    for name, folder in folders.items():
        todo = {}
        for set_name, prompts in prompt_sets.items():
            path, key = out / name / f"{set_name}.json", key_of(args, folder, prompts)
            saved = json.loads(path.read_text()) if path.exists() else {}
            if saved.get("key") == key:
                print(f"{path}: served before, read back")
                results[set_name][name] = saved
            else:
                todo[set_name] = (path, key)
        if not todo:
            continue
        with launched(
            "vllm",
            target,
            draft=folder,
            k=args.k,
            dtype=args.dtype,
            served_name="paired",
            max_model_len=args.max_model_len,
            log_dir=out / name / "serve",
            quiet=True,
        ) as url:
            for set_name, (path, key) in todo.items():
                rows = serve_prompts(url, prompt_sets[set_name], args.max_tokens, args.k, f"{name} on {set_name}")
                results[set_name][name] = {"key": key, "rows": rows}
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, results[set_name][name])
    names = list(folders)
    for by_draft in results.values():
        for name in names:
            rows = by_draft[name]["rows"]
            by_draft[name] |= {"tau": served_tau(rows), "acceptance_per_position": per_position(rows, args.k)}
            if name != names[0]:
                by_draft[name]["vs_first"] = paired_gap(by_draft[names[0]]["rows"], rows)
    summary = {
        s: {n: {x: v for x, v in r.items() if x != "rows"} for n, r in by_draft.items()}
        for s, by_draft in results.items()
    }
    write_json_atomic(out / "paired.json", {"args": {**vars(args), "target": str(target)}, "results": summary})
    print(table(results, names, args.k))
    print(f"\n{out / 'paired.json'}")


if __name__ == "__main__":
    main()
