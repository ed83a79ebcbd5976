"""traineagle3.forecast: nested subsets, the saturating fit and its band, the refusal, resume,
and one tiny forecast end to end on the test target (main.py's recipe on each fraction)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_env
from safetensors.torch import load_file
from test_deepspeed import ds_config, train_args

from traineagle3.cli import UserError
from traineagle3.forecast import fit_curve, forecast, mean_curve, parse_fractions, predict, report
from traineagle3.train import nested_subsets

TRUE = {"c": 2.0, "n0": 100.0, "b": 0.5}  # a curve in the shape of our drafts' tau against conversations
SLOW = {"c": 4.0, "n0": 13.0, "b": 0.05}  # the default's data: still rising at 8x, no sign of levelling off


def test_fit_recovers_a_saturating_curve_from_four_noisy_points():
    n = np.array([64, 128, 256, 512])
    rng = np.random.default_rng(0)
    for _ in range(5):
        tau = predict(TRUE, n) + rng.normal(0, 0.002, len(n))
        fit = fit_curve(n, tau, k=3)
        assert fit["c"] == pytest.approx(TRUE["c"], abs=0.15)
        assert fit["b"] == pytest.approx(TRUE["b"], abs=0.2)
        assert fit["n0"] == pytest.approx(TRUE["n0"], rel=0.5)
        assert float(predict(fit, 4 * 512)) == pytest.approx(float(predict(TRUE, 4 * 512)), abs=0.03)


def test_fit_keeps_tau_within_one_and_k_plus_one():
    n = np.array([10, 20, 40, 80])
    steep = 1 + 3 * (1 - (1 + n / 5.0) ** -2.0)  # heads for 4 = k + 1 with k = 3
    fit = fit_curve(n, steep + 0.2, k=3)  # past the ceiling: the fit stops at it
    assert fit["c"] <= 4.0 and float(predict(fit, 1e9)) <= 4.0
    assert float(predict(fit_curve(n, steep, k=3), 0)) == pytest.approx(1.0)  # no data, no acceptance


def test_nested_subsets_are_nested_seeded_and_fraction_one_is_all():
    idx = list(range(3, 403))
    subsets = nested_subsets(idx, [1 / 8, 1 / 4, 1 / 2, 1], seed=7)
    assert [len(s) for s in subsets] == [50, 100, 200, 400] and subsets[-1] == idx
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) < set(large)
    assert nested_subsets(idx, [1 / 4], seed=7) == [subsets[1]]
    assert nested_subsets(idx, [1 / 4], seed=8) != [subsets[1]]


def test_parse_fractions():
    assert parse_fractions("1/2, 1/8,1,0.25") == [0.125, 0.25, 0.5, 1.0]
    for bad in ("1/0", "a,b", "0,1", "1/2,3/2", ""):
        with pytest.raises(UserError):
            parse_fractions(bad)


def points(taus, n=(50, 100, 200, 400), samples=30, k=3, seed=0) -> list[dict]:
    """Fractions with per-sample histograms whose replayed tau is close to `taus`."""
    rng = np.random.default_rng(seed)
    out = []
    for x, tau in zip(n, taus):
        p = (tau - 1) / k  # each round accepts a Binomial(k, p) number of drafts: mean 1 + k p
        hists = {str(s): np.bincount(rng.binomial(k, p, 40), minlength=k + 1).tolist() for s in range(samples)}
        total = np.sum(list(hists.values()), axis=0)
        measured = float((total * np.arange(1, k + 2)).sum() / total.sum())
        rates = [float(total[i + 1 :].sum() / total.sum()) for i in range(k)]
        out.append(
            {
                "label": f"{x}",
                "conversations": x,
                "supervised_tokens": 100 * x,
                "tau": measured,
                "round_acceptance": rates,
                "minutes": x / 100,
                "test_rounds": hists,
            }
        )
    return out


def test_flat_or_shrinking_tau_gets_one_line_and_no_curve(tmp_path, capsys):
    for taus in ([1.5, 1.5, 1.5, 1.5], [1.6, 1.55, 1.5, 1.45]):
        with pytest.raises(UserError, match="^no forecast: ") as e:
            report(points(taus), 3, None, 1.0, tmp_path)
        assert "\n" not in str(e.value)
        written = json.loads((tmp_path / "forecast.json").read_text())
        assert "refused" in written and "fit" not in written and len(written["points"]) == 4
        assert not (tmp_path / "forecast.png").exists()
    with pytest.raises(UserError, match="distinct"):
        forecast(points([1.3, 1.5], n=(100, 200)), 3)


@pytest.mark.parametrize("truth", [TRUE, SLOW], ids=["levels-off", "still-rising"])
def test_report_predicts_with_a_band_and_the_data_for_a_target(truth, tmp_path, capsys):
    """Whether tau levels off within the range or goes on rising, the truth lies in the band."""
    pts = points([float(x) for x in predict(truth, [50, 100, 200, 400])], samples=60)
    report(pts, 3, 1.85, 0.5, tmp_path)
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "forecast.json").read_text())
    assert (tmp_path / "forecast.png").stat().st_size > 10_000
    assert [p["multiple"] for p in result["predictions"]] == [2, 4, 10, 100]
    for p in result["predictions"]:
        lo, hi = p["band"]
        assert result["band_fits"]["floor"] <= lo <= p["tau"] <= hi <= 4  # more data: no lower than the pilot
        assert f"{p['conversations']:>13,}  {p['tau']:>13.3f}" in out
        assert p["band"][0] <= float(predict(truth, p["conversations"])) <= p["band"][1]  # the truth inside
        assert p["tau"] == pytest.approx(np.mean(p["by_form"]))  # the mean of the two forms
    widths = [p["band"][1] - p["band"][0] for p in result["predictions"]]
    assert widths == sorted(widths) and widths[0] > 0  # wider the further out
    target = result["target"]
    assert target["band"][0] <= target["conversations"] and "tau 1.85: about" in out
    reached = float(mean_curve(result["fit"]["forms"], target["conversations"]))
    assert 400 < target["conversations"] and reached == pytest.approx(1.85)
    assert result["check"]["measured"] == pts[-1]["tau"] and "test_rounds" not in json.dumps(result["points"])
    unreachable = forecast(pts, 3, target_tau=3.9)["target"]
    assert unreachable["conversations"] is None


def forecast_cmd(target, data, out, ds, cache, fractions):
    args = train_args(target, data, out, ds, cache, "--feature_cache", "true", "--ttt_steps", "3", "--resume", "true")
    return [sys.executable, "-m", "traineagle3.forecast", *args, "--test_fraction", "0.2", "--fractions", fractions]


def test_tiny_forecast_end_to_end_then_resumed(tiny_target, chat_jsonl, tmp_path):
    """Each fraction trained and scored on the same held-out samples (fraction 1 exactly main.py's
    run), a result per fraction; run again, the done fractions are read back, not trained."""
    ds, out, cache = ds_config(tmp_path, accum=1), tmp_path / "forecast", tmp_path / "cache"
    cmd = forecast_cmd(tiny_target, chat_jsonl, out, ds, cache, "1/4,1/2,1")
    first = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode in (0, 2) and (out / "forecast.json").exists(), first.stderr[-3000:]
    results = sorted(out.glob("fraction-*/result.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    pts = [json.loads(p.read_text()) for p in results]
    assert [p["label"] for p in pts] == ["1/4", "1/2", "1"] and pts[0]["conversations"] < pts[1]["conversations"]
    assert len({tuple(sorted(p["test_rounds"])) for p in pts}) == 1  # the same held-out samples
    assert 0 < pts[0]["supervised_tokens"] < pts[1]["supervised_tokens"] < pts[2]["supervised_tokens"]
    for p, folder in zip(pts, results):
        last = json.loads((folder.parent / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["split"] == "test" and p["tau"] == pytest.approx(last["tau"], abs=1e-5)
        assert sum(sum(h) for h in p["test_rounds"].values()) == last["rounds"] and p["minutes"] > 0
    written = json.loads((out / "forecast.json").read_text())
    # the tiny random target's tau hardly moves: the one-line refusal, or a curve through the points
    if first.returncode == 2:
        assert first.stderr.strip().splitlines()[-1].startswith("error: no forecast: ") and "refused" in written
    else:
        assert len(written["predictions"]) == 4 and (out / "forecast.png").exists()

    main = tmp_path / "main"
    ran = subprocess.run(
        [
            sys.executable,
            str(ROOT / "traineagle3" / "llama" / "main.py"),
            *train_args(tiny_target, chat_jsonl, main, ds, cache, "--feature_cache", "true", "--ttt_steps", "3"),
            "--test_fraction",
            "0.2",
        ],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    whole, alone = (
        load_file(str(results[-1].parent / "draft" / "model.safetensors")),
        load_file(str(main / "draft" / "model.safetensors")),
    )
    assert whole.keys() == alone.keys() and all((whole[k] == alone[k]).all() for k in whole)

    stamps = {p: p.stat().st_mtime_ns for p in results}
    (results[1]).unlink()  # as if killed before the 1/2 fraction was written
    again = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == first.returncode, again.stderr[-3000:]
    assert results[1].exists() and all(stamps[p] == p.stat().st_mtime_ns for p in (results[0], results[2]))
    assert again.stderr.count("done, read back") == 2


def test_two_ranks_each_score_a_share_and_the_forecast_gathers_them(tiny_target, chat_jsonl, tmp_path):
    """Under the deepspeed launcher: every held-out sample's rounds reach rank 0's result, once."""
    ds, out = ds_config(tmp_path, accum=1), tmp_path / "forecast"
    cmd = forecast_cmd(tiny_target, chat_jsonl, out, ds, tmp_path / "cache", "1/2,1")
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29561"]
    r = subprocess.run(
        [*launcher, "--module", *cmd[2:]], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 2 and "error: no forecast: 2 fraction(s)" in r.stderr + r.stdout, (r.stdout + r.stderr)[
        -3000:
    ]
    for result in out.glob("fraction-*/result.json"):
        point = json.loads(result.read_text())
        last = json.loads((result.parent / "metrics.jsonl").read_text().splitlines()[-1])
        assert (
            sum(sum(h) for h in point["test_rounds"].values()) == last["rounds"] and len(point["test_rounds"]) % 2 == 0
        )
    assert len(list(out.glob("fraction-*/result.json"))) == 2
