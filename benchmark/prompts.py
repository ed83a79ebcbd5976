"""Turn a prompt file into the JSONL files `vllm bench serve --dataset-name custom` reads.

    python -m benchmark.prompts data/clean/test.jsonl outputs/benchmark/prompts.jsonl --limit 80 [--repeats 2]

MT-bench questions give their first turn, chat records (the held-out split) their first
user turn -- `traineagle3.records.read_prompts`, the reading `traineagle3.evaluate` uses,
so offline and served numbers are measured on the same prompts.  vLLM's benchmark applies the target's chat template.

The benchmark serves the prompts in parts, one `vllm bench serve` run each.  With
--repeats R > 1 prompt j goes to repeat j mod R + 1, so each repeat gets a like share of
short and long prompts.  When the prompts are in more than one writing system (cjk /
latin / code / other: `traineagle3.records.writing_system`), each repeat is split by it
too, so the table can give tau and speed-up per writing system.  A part's file is
`<out stem>[-r<repeat>][-<script>].jsonl`; the out file holds all the prompts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from traineagle3.records import read_prompts, writing_system


@dataclass
class Part:
    repeat: int  # 1..R
    script: str  # the prompts' writing system; '' when the prompts are not split by it
    suffix: str  # of its prompt file's and its results' names: [-r<repeat>][-<script>]
    prompts: list[str]


def split(prompts: list[str], repeats: int) -> list[Part]:
    """The parts, in serving order: repeat by repeat, and in a repeat by writing system."""
    scripts = [writing_system(p) for p in prompts]
    by_script = len(set(scripts)) > 1
    parts: dict[tuple[int, str], list[str]] = {}
    for j, (prompt, script) in enumerate(zip(prompts, scripts)):
        parts.setdefault((j % repeats + 1, script if by_script else ""), []).append(prompt)
    return [
        Part(i, s, (f"-r{i}" if repeats > 1 else "") + (f"-{s}" if s else ""), ps)
        for (i, s), ps in sorted(parts.items())
    ]


def read(src: str, limit: int | None, repeats: int) -> list[str]:
    """The first user turns of `src`; SystemExit when there are none or fewer than `repeats`."""
    prompts = [q["turns"][0] for q in read_prompts(src, limit)]
    if not prompts:
        raise SystemExit(f"{src}: no usable prompts")
    if len(prompts) < repeats:
        raise SystemExit(f"{src}: {len(prompts)} usable prompts, fewer than --repeats {repeats}")
    return prompts


def write(prompts: list[str], parts: list[Part], out: Path) -> None:
    """All the prompts to `out`, and each part to its own file when there is more than one."""

    def lines(ps):
        return "".join(json.dumps({"prompt": p}) + "\n" for p in ps)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(lines(prompts))
    if len(parts) > 1:
        for part in parts:
            out.with_name(f"{out.stem}{part.suffix}.jsonl").write_text(lines(part.prompts))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="MT-bench question.jsonl or ShareGPT/OpenAI JSON/JSONL")
    p.add_argument("out", type=Path)
    p.add_argument("--limit", type=int)
    p.add_argument("--repeats", "--rounds", type=int, default=1, help="also split the prompts into this many parts")
    a = p.parse_args(argv)
    prompts = read(a.src, a.limit, a.repeats)
    parts = split(prompts, a.repeats)
    write(prompts, parts, a.out)
    print(
        f"{len(prompts)} prompts from {a.src} -> {a.out}"
        + (f" and {len(parts)} parts: {', '.join(p.suffix[1:] for p in parts)}" if len(parts) > 1 else "")
    )


if __name__ == "__main__":
    main()
