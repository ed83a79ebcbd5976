"""bench_train on the CPU at a small shape: the ratios are printed, not asserted (CPU timings say little)."""

import json
import math

import pytest

from traineagle3 import bench_train

ARGS = [
    "--shape",
    "tiny",
    "--seq-len",
    "96",
    "--ttt-steps",
    "3",
    "--dtype",
    "fp32",
    "--draft-vocab",
    "512",
    "--warmup",
    "1",
    "--iters",
    "1",
]


@pytest.mark.parametrize("extra", [["--micro-batch", "1", "2"], ["--with-target"]])
def test_bench_reports_both_formulations_with_finite_numbers(tmp_path, capsys, extra):
    result = bench_train.main(ARGS + extra + ["--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    print(out)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    batches = [int(b) for b in extra[1:]] if extra[0] == "--micro-batch" else [1]
    assert [(r["impl"], r["micro_batch"]) for r in result["results"]] == [
        (i, b) for b in batches for i in ("reference", "efficient")
    ]
    for r in result["results"]:
        assert not r["oom"]
        for k in ("tokens_per_s", "step_s", "static_gib", "step_gib", "peak_gib", "first_loss"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
    assert [q["micro_batch"] for q in result["ratios"]] == batches
    for q in result["ratios"]:
        assert all(math.isfinite(q[k]) and q[k] > 0 for k in ("tokens_per_s", "peak_gib", "step_gib"))
        assert q["first_loss_rel_diff"] < 1e-5  # same draft, same inputs: the formulations agree
    assert "efficient/reference at micro-batch 1: tokens/s x" in out


def test_max_micro_batch_search_bisects_to_the_largest_that_fits(monkeypatch):
    monkeypatch.setattr(bench_train, "fits", lambda setup, impl, b: b <= 13)
    assert bench_train.max_micro_batch(None, "efficient", 64) == 13
    assert bench_train.max_micro_batch(None, "efficient", 10) == 10
    monkeypatch.setattr(bench_train, "fits", lambda setup, impl, b: False)
    assert bench_train.max_micro_batch(None, "efficient", 64) == 0
