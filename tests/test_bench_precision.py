"""bench_precision: both precisions timed in one run, and a verdict on precision.py's rule."""

import json

from conftest import make_tiny_target

from traineagle3 import bench_precision
from traineagle3.precision import choose


def test_times_both_precisions_on_a_tiny_target_and_checks_the_rule(smol_tokenizer, tmp_path, capsys):
    tiny_target = make_tiny_target(smol_tokenizer, tmp_path / "target", layers=8)  # room for 3 aux layers
    out = tmp_path / "bench.json"
    args = ["--target", str(tiny_target), "--iters", "1", "--max-length", "16", "--draft-vocab", "64"]
    bench_precision.main(args + ["--draft-intermediate-size", "64", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["auto"] == choose("cpu")[0]
    assert [r["what"] for r in result["rows"]] == ["feature pass", "draft step"]
    for r in result["rows"]:
        assert r["float32"] > 0 and r["bfloat16"] > 0
        assert r["faster"] == min(("float32", "bfloat16"), key=r.get)
    assert result["agree"] == all(r["faster"] == result["auto"] for r in result["rows"])
    assert f"auto picks {result['auto']}" in capsys.readouterr().out


def test_says_when_the_measurement_disagrees_with_the_rule(monkeypatch, tmp_path, capsys):
    timings = {"feature pass": {"float32": 10.0, "bfloat16": 20.0}, "draft step": {"float32": 5.0, "bfloat16": 4.0}}
    monkeypatch.setattr(bench_precision, "torch_timings", lambda args: timings)
    monkeypatch.setattr(bench_precision, "choose", lambda device: ("float32", "stand-in"))
    bench_precision.main(["--json", str(tmp_path / "b.json")])  # bf16 won the draft step
    assert "the measurement DISAGREES" in capsys.readouterr().out
    timings["draft step"]["float32"] = 3.0
    bench_precision.main(["--json", str(tmp_path / "b.json")])
    assert "the measurement agrees" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["fp32/bf16"] == 0.5
