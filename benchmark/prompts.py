"""Turn a prompt file into the JSONL `vllm bench serve --dataset-name custom` reads.

    python -m benchmark.prompts data/clean/test.jsonl outputs/benchmark/prompts.jsonl --limit 80 [--rounds 2]

MT-bench questions give their first turn, chat records (the held-out split) their first
user turn -- `traineagle3.records.read_prompts`, the reading `traineagle3.evaluate` uses,
so offline and served numbers are measured on the same prompts.  vLLM's benchmark
applies the target's chat template.
With --rounds R > 1 it also writes `<out stem>-r<i>.jsonl` for i = 1..R: prompt j goes to
round j mod R + 1, so each round gets a like share of short and long prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from traineagle3.records import read_prompts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="MT-bench question.jsonl or ShareGPT/OpenAI JSON/JSONL")
    p.add_argument("out", type=Path)
    p.add_argument("--limit", type=int)
    p.add_argument("--rounds", type=int, default=1, help="also split the prompts into this many files")
    a = p.parse_args(argv)
    prompts = read_prompts(a.src, a.limit)
    if not prompts:
        raise SystemExit(f"{a.src}: no usable prompts")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": q["turns"][0]}) + "\n" for q in prompts]
    a.out.write_text("".join(lines))
    print(f"{len(prompts)} prompts from {a.src} -> {a.out}")
    if a.rounds > 1:
        if len(lines) < a.rounds:
            raise SystemExit(f"{a.src}: {len(lines)} usable prompts, fewer than --rounds {a.rounds}")
        for i in range(a.rounds):
            a.out.with_name(f"{a.out.stem}-r{i + 1}.jsonl").write_text("".join(lines[i::a.rounds]))


if __name__ == "__main__":
    main()
