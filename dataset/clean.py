"""Clean regenerated conversations and split them into train and test, deterministically.

    python -m dataset.clean --in data/regen.jsonl --out-dir data/clean [--test-fraction 0.05 --seed 42]

Rules, applied to each answer in order; a conversation ends before its first bad answer
(the turns after it were conditioned on it) and is dropped if no answer is left:
- empty:      nothing but white space;
- refused:    opens with a stock refusal ("I'm sorry, but I can't ...", "As an AI
              language model, I cannot ..."); `--keep-refusals` keeps them;
- garbled:    contains U+FFFD (broken decoding), or is a degenerate loop: at least
              400 characters that zlib compresses below 5% of their size (prose
              compresses to 30-50%, tables and ASCII art to 7-15%);
- truncated:  finish_reason "length", only with `--drop-truncated`.
Then duplicates are dropped: conversations with the same user turns (white space and
case folded) keep their first copy.  A conversation is held out when a hash of `--seed`
and its id falls below `--test-fraction` (about that share of the data): the split
depends on nothing else, so input order does not matter and growing the data never
moves a conversation between train and test (a draft retrained on more data is still
scored on prompts it never saw).  Both files are in that hash order.
`--train-only FILE` adds conversations to train.jsonl only, whatever their hash: e.g.
answers that were not regenerated (ShareGPT's own), which would not measure the target if
held out.  They pass the same rules after `--in`'s, so a copy of a held-out prompt among
them is dropped as a duplicate.
Writes train.jsonl, test.jsonl and summary.json (counts per rule).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import zlib
from collections import Counter
from pathlib import Path

from traineagle3.atomic import publish
from traineagle3.cli import Parser, cli, number
from traineagle3.records import BadRecord, normalise, record_id, split_key

from .jsonl import Appender, read_records

REFUSAL = re.compile(
    r"^\s*(I'?m sorry,? but I (can(no|')t|am unable|won'?t)|I (cannot|can'?t|am unable to|won'?t) "
    r"(help|assist|provide|comply|fulfil)|As an AI( language model)?,? I (cannot|can'?t|am not able|don'?t))",
    re.IGNORECASE,
)


def answer_problem(text: str, finish_reason: str | None, keep_refusals: bool, drop_truncated: bool) -> str | None:
    """Why an answer is unusable, or None."""
    if not text.strip():
        return "empty"
    if not keep_refusals and REFUSAL.match(text):
        return "refused"
    if "\ufffd" in text:
        return "garbled (U+FFFD)"
    raw = text.encode()
    if len(raw) >= 400 and len(zlib.compress(raw)) < 0.05 * len(raw):
        return "garbled (repetition loop)"
    if drop_truncated and finish_reason == "length":
        return "truncated"
    return None


def clean_conversation(rec: dict, keep_refusals: bool, drop_truncated: bool) -> tuple[list[dict], str | None]:
    """The usable prefix of a record's conversation and the problem that ended it, if any."""
    conv = normalise(rec)
    reasons = [t.get("finish_reason") for t in rec.get("turns", [])]
    kept, answers = [], 0
    for m in conv:
        if m["role"] == "assistant":
            reason = reasons[answers] if answers < len(reasons) else None
            problem = answer_problem(m["content"], reason, keep_refusals, drop_truncated)
            if problem:
                while kept and kept[-1]["role"] == "user":
                    kept.pop()
                return (kept if answers else []), problem
            answers += 1
        kept.append(m)
    return kept, None


def prompt_key(conv: list[dict]) -> str:
    users = "\n\x00".join(" ".join(m["content"].split()).casefold() for m in conv if m["role"] == "user")
    return hashlib.sha256(users.encode()).hexdigest()


def _records(src: Path, train_only: Path | None):
    """(file, index, record, may it be held out) of `src`, then of `train_only`."""
    for index, rec in read_records(src):
        yield src, index, rec, True
    if train_only is not None:
        for index, rec in read_records(train_only):
            yield train_only, index, rec, False


def clean(
    src: Path,
    out_dir: Path,
    test_fraction: float = 0.05,
    seed: int = 42,
    keep_refusals: bool = False,
    drop_truncated: bool = False,
    train_only: Path | None = None,
) -> dict:
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}  # problem -> its first records, as "file: record N"
    seen, parts = set(), {"test": [], "train": []}  # (split key, record)
    for path, index, rec, may_hold_out in _records(src, train_only):
        try:
            conv, problem = clean_conversation(rec, keep_refusals, drop_truncated)
        except BadRecord as e:
            conv, problem = [], f"malformed ({e})"
        if problem:
            counts[f"answers ended: {problem}"] += 1
            if len(examples.setdefault(problem, [])) < 5:
                examples[problem].append(f"{path}: record {index}")
        if not any(m["role"] == "assistant" for m in conv):
            counts["dropped: no usable answer"] += 1
            continue
        key = prompt_key(conv)
        if key in seen:
            counts["dropped: duplicate"] += 1
            continue
        seen.add(key)
        rid = record_id(index, rec.get("id"))
        h = split_key(rid, seed)  # hashed once: it both splits and orders
        parts["test" if may_hold_out and h < test_fraction else "train"].append((h, {"id": rid, "conversations": conv}))
    splits = {name: [r for _, r in sorted(part, key=lambda x: x[0])] for name, part in parts.items()}
    n_test = len(splits["test"])
    out_dir = Path(out_dir)
    for name, records in splits.items():
        with publish(out_dir / f"{name}.jsonl", overwrite=True) as tmp:
            writer = Appender(tmp, truncate=True)
            for r in records:
                writer.write(r)
            writer.close()
    summary = {
        "input": str(src),
        "train_only": str(train_only) if train_only else None,
        "kept": n_test + len(splits["train"]),
        "train": len(splits["train"]),
        "test": n_test,
        "test_fraction": test_fraction,
        "seed": seed,
        "counts": dict(sorted(counts.items())),
        "examples": examples,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{src}{f' + {train_only}' if train_only else ''}: kept {summary['kept']} conversations "
        f"({len(splits['train'])} train, {n_test} test) in {out_dir}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    return summary


@cli
def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="src", required=True, type=Path, help="regenerated JSONL")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--test-fraction", type=number(float, 0, 1), default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--keep-refusals", action="store_true")
    p.add_argument("--drop-truncated", action="store_true", help="end conversations at answers cut by max_tokens")
    p.add_argument("--train-only", type=Path, help="JSONL of conversations for train.jsonl only (never held out)")
    a = p.parse_args(argv)
    clean(a.src, a.out_dir, a.test_fraction, a.seed, a.keep_refusals, a.drop_truncated, a.train_only)


if __name__ == "__main__":
    main()
