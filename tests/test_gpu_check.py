"""benchmark/gpu_check.sh at the tiny shape on the CPU (what CI can run of the GPU check)."""

import json
import math
import subprocess

from conftest import ROOT, run_env

from benchmark import gpu_check


def test_gpu_check_runs_every_part_and_writes_one_table(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "benchmark" / "gpu_check.sh"), "--out", str(tmp_path)],
        cwd=tmp_path,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["shape"] == "tiny" and report["device"] == "cpu"
    rows = report["rows"]
    bench = [(x["seq_len"], x["micro_batch"], x["impl"]) for x in rows if x["part"] == "bench"]
    assert bench == [
        (L, b, impl)
        for L, batches in gpu_check.PLANS["tiny"]["bench"]
        for b in batches
        for impl in ("reference", "efficient")
    ]
    for x in rows:
        if x["part"] == "bench":
            assert not x["oom"] and x["tokens_per_s"] > 0 and x["peak_gib"] > 0
            assert (x["impl"] == "efficient") == ("tokens_per_s_x" in x and x["peak_gib_x"] > 0)
    train = {x["features"]: x for x in rows if x["part"] == "train"}
    assert set(train) == {"online", "cached"}
    for x in train.values():  # real deepspeed runs of main.py to max_steps on the random target
        assert "error" not in x and x["steps"] == gpu_check.PLANS["tiny"]["train"]["steps"] and x["tokens_per_s"] > 0
        assert math.isfinite(x["loss0_last"])
    assert (tmp_path / "train_cached" / "cache").is_dir() and (tmp_path / "train_online" / "out" / "draft").is_dir()
    equiv = [x for x in rows if x["part"] == "equiv"]
    assert len(equiv) == 2 and all(x["ok"] and 0 < x["err"] < 0.1 for x in equiv)
    assert equiv[1]["top1_agree"] > 0.9
    for line in [
        "bench  L=128 micro-batch 2 efficient:",
        "train  L=128 micro-batch 2 cached features:",
        "equiv  TTT logits vs float64 chain:",
    ]:
        assert line in r.stdout


def test_gpu_check_fails_a_ttt_attention_that_ignores_the_later_steps(tmp_path, monkeypatch):
    """The bug a TTT mask invites: step k>0 queries not seeing their own earlier guesses."""
    from traineagle3 import merged_attention, ttt

    real = merged_attention.merged_ttt_attention

    def step0_only(q, keys, values, scale, **kw):
        return real(q, keys[:1], values[:1], scale, **kw)

    monkeypatch.setattr(merged_attention, "merged_ttt_attention", step0_only)
    monkeypatch.setattr(ttt, "merged_ttt_attention", step0_only)
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "equiv"]) == 1
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [x["ok"] for x in rows] == [False, False]
    assert rows[1]["err"] > 10 * rows[1]["against_err"]  # not rounding: another function
