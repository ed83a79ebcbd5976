"""Forecast tau against data size: the recipe trained on nested fractions of a pilot, a curve
fitted, extrapolated.

    deepspeed --module traineagle3.forecast --deepspeed_config ds_config.json --config train.json
    python -m traineagle3.forecast ... --fractions 1/8,1/4,1/2,1 --target-tau 2.5

Every fraction trains main.py's recipe (same epochs, so its steps shrink with it) on the
first part of one seeded permutation of the training samples, so each subset lies inside
every larger one; all are scored on the same held-out samples by the replayed tau main.py
logs. The target runs once: the fractions share one feature cache and the pilot's draft
vocabulary. Fraction 1 is exactly main.py's run.

The curve is tau(n) = 1 + (c - 1) (1 - (1 + n/n0)^-b) over n training conversations: tau is
1 without data and grows with it towards c, never past the k + 1 that k drafts allow (far past
n0 it is the power law c - a n^-b). Where it levels off, four points cannot tell, so the
forecast is the mean of two fits: c = k + 1, and c fitted (`fit_forms`). Its band covers both
and the spread of the same mean (a) without each point in turn (how much the extrapolation
leans on one fraction) and (b) on the held-out samples resampled, paired across fractions (how
much on which samples were scored), no lower than the pilot's own tau (more data does not
lower it); with four points it is wide far out, which is the honest answer.  Each
fraction's folder (output_dir/fraction-N) resumes: a done fraction is read back, a killed one
continues from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .acceptance import round_stats
from .atomic import write_json_atomic
from .cli import UserError, cli, number
from .config import to_dict

log = logging.getLogger("traineagle3")

DEFAULT_FRACTIONS = "1/8,1/4,1/2,1"
MULTIPLES = (2, 4, 10, 100)  # of the pilot's size, in the table
REACH = 1000  # --target-tau: further than this many times the pilot, "not reached"
RESAMPLES = 200
RESULT = "result.json"
# fit_forms' curves, each tau = 1 + (c - 1) (1 - (1 + n/n0)^-b) over n training conversations
FORM = "the mean of tau = 1 + (c - 1) (1 - (1 + n/n0)^-b) with c = k + 1, and with c <= k + 1 fitted"
# TrainConfig fields that change where a run writes or how it logs, not what it trains
NOT_RECIPE = {
    "output_dir",
    "resume",
    "progress",
    "report_to",
    "save_every",
    "log_every",
    "keep_checkpoints",
    "num_proc",
}


def parse_fractions(text: str) -> list[float]:
    """'1/8,1/4,1/2,1' -> [0.125, 0.25, 0.5, 1.0]: distinct, in (0, 1], ascending."""
    try:
        values = sorted({float(Fraction(x.strip())) for x in text.split(",") if x.strip()})
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--fractions {text!r}: not a comma-separated list like {DEFAULT_FRACTIONS}") from None
    if not values or values[0] <= 0 or values[-1] > 1:
        raise UserError(f"--fractions {text!r}: each must lie in (0, 1]")
    return values


# ---------------------------------------------------------------------------- the fit


def fit_curve(n, tau, k: int, ceiling: bool = False) -> dict:
    """Least squares tau = 1 + (c - 1) (1 - (1 + n/n0)^-b), with 1 <= c <= k + 1 fitted, or with
    `ceiling` c = k + 1 (two parameters: tau rises towards what k drafts allow).

    tau is 1 without data and grows towards c, never past the k + 1 that k drafts allow;
    far past n0 it is the power law c - a n^-b.  For each (n0, b) the model is linear in c:
    a grid, then a finer grid around its best cell."""
    n, tau = np.asarray(n, float), np.asarray(tau, float)
    n0s, bs = np.geomspace(n.min() / 100, n.max() * 1e4, 161), np.geomspace(0.005, 4.0, 161)
    for _ in range(3):
        g = 1 - (1 + n / n0s[:, None, None]) ** -bs[None, :, None]  # [n0, b, point]
        if ceiling:
            rise = np.full(g.shape[:2], float(k))  # c - 1
        else:
            rise = np.clip(((tau - 1) * g).sum(-1) / np.maximum((g * g).sum(-1), 1e-12), 0, k)
        sse = (((1 + rise[..., None] * g) - tau) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(sse), sse.shape)
        best = {"c": float(1 + rise[i, j]), "n0": float(n0s[i]), "b": float(bs[j]), "sse": float(sse[i, j])}
        n0s = np.geomspace(n0s[max(i - 1, 0)], n0s[min(i + 1, len(n0s) - 1)], 41)
        bs = np.geomspace(bs[max(j - 1, 0)], bs[min(j + 1, len(bs) - 1)], 41)
    return best | {"ceiling": ceiling}


def fit_forms(n, tau, k: int) -> list[dict]:
    """Both forms' fits: towards k + 1, and with c fitted.

    Four points over an 8x range rarely say where tau levels off. A fitted c follows the noise
    of one point and bends the curve early; c = k + 1 keeps it rising for as long as the drafts
    allow.  On synthetic curves of both kinds (docs/RESULTS.md) neither form extrapolates well on
    the other kind, and their mean is never far from the better one: the forecast is that mean,
    and its band covers both."""
    return [fit_curve(n, tau, k, ceiling=True), fit_curve(n, tau, k, ceiling=False)]


def predict(fit: dict, n) -> np.ndarray:
    return 1 + (fit["c"] - 1) * (1 - (1 + np.asarray(n, float) / fit["n0"]) ** -fit["b"])


def mean_curve(fits: list[dict], n) -> np.ndarray:
    """The forecast: the mean of the forms' predictions at n conversations."""
    return np.mean([predict(f, n) for f in fits], axis=0)


def data_for(fits: list[dict], tau: float, limit: float) -> float | None:
    """Conversations at which the mean curve reaches tau; None where it levels off below, or gets
    there only past `limit`, where no four-point fit says anything.  Both forms rise with n, so
    their mean does: bisection on log n."""
    if float(mean_curve(fits, limit)) < tau:
        return None
    lo, hi = 0.0, math.log(limit)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(mean_curve(fits, math.exp(mid))) < tau else (lo, mid)
    return math.exp(hi)


def refusal(n: list[int], tau: list[float], resampled: np.ndarray) -> str | None:
    """Why these points give no curve (None: they do): fewer than 3 fractions with distinct
    tau, or tau not growing beyond the noise of the held-out samples (`resampled`: tau per
    resampling of them and fraction, as `resample_tau` gives)."""
    if len(set(n)) < 3 or len({round(t, 2) for t in tau}) < 3:
        return (
            f"{len(set(n))} fraction(s) with {len({round(t, 2) for t in tau})} distinct tau (to 0.01): a curve "
            "needs at least 3 (more --fractions, or a larger pilot)"
        )
    points = ", ".join(f"{t:.3f} at {x}" for x, t in zip(n, tau))
    if np.polyfit(np.log(n), tau, 1)[0] <= 0 or tau[-1] <= tau[0]:
        return f"tau does not grow with data ({points} conversations); look at the recipe or the data first"
    if len(resampled) and np.percentile(resampled[:, -1] - resampled[:, 0], 5) <= 0:
        return (
            f"tau's growth ({points} conversations) is within the noise of the held-out samples: "
            "a larger pilot or more held-out samples"
        )
    return None


def resample_tau(hists: list[dict], seed: int = 0) -> np.ndarray:
    """[RESAMPLES, fractions]: each fraction's tau on resamplings of the held-out samples, the
    same resampling for every fraction (`hists`: each fraction's per-sample histograms)."""
    samples = sorted(set.intersection(*(set(h) for h in hists)))
    if not samples:
        return np.zeros((0, len(hists)))
    rng = np.random.default_rng(seed)
    picks = [[samples[i] for i in rng.integers(0, len(samples), len(samples))] for _ in range(RESAMPLES)]
    return np.array([[tau_of(h, pick) for h in hists] for pick in picks])


def refits(n: list[int], tau: list[float], resampled: np.ndarray, k: int) -> tuple[list[list], list[list]]:
    """The fits that make the band: without each point in turn (with more than 3 points), and on
    each resampling of the held-out samples."""
    left_out = [fit_forms(np.delete(n, i), np.delete(tau, i), k) for i in range(len(n))] if len(n) > 3 else []
    return left_out, [fit_forms(n, row, k) for row in resampled]


def tau_of(hists: dict, samples) -> float:
    """Replayed tau over `samples` (repeats count again) from per-sample histograms of drafts accepted."""
    return round_stats(torch.tensor(np.sum([hists[s] for s in samples], axis=0), dtype=torch.float64))[1]


def spread(
    value, fits: list[dict], left_out: list[list], resampled: list[list], floor: float = -math.inf
) -> list[float]:
    """[lo, hi] of value(fits) and of each form alone, over the refits: the leave-one-out
    extremes and the resamples' 5th-95th percentiles together, the points themselves inside
    (inf: a refit never gets there); lo no lower than `floor` unless the point is."""
    point, values = value(fits), []
    for pick in [lambda f: f] + [lambda f, i=i: [f[i]] for i in range(len(fits))]:  # the mean, then each form
        values += [value(pick(fits))] + [value(pick(f)) for f in left_out]
        if resampled:
            boot = [value(pick(f)) for f in resampled]
            values += [np.percentile(boot, 5, method="lower"), np.percentile(boot, 95, method="higher")]
    return [float(max(min(values), min(floor, point))), float(max(values))]


def forecast(points: list[dict], k: int, target_tau: float | None = None) -> dict:
    """The fit of `points` (each fraction's conversations, tau and per-sample histograms), its
    predictions at MULTIPLES of the pilot with their band, and the data for target_tau."""
    n, tau = [p["conversations"] for p in points], [p["tau"] for p in points]
    resampled_tau = resample_tau([p["test_rounds"] for p in points])
    if why := refusal(n, tau, resampled_tau):
        raise UserError(f"no forecast: {why}")
    fits = fit_forms(n, tau, k)
    left_out, resampled = refits(n, tau, resampled_tau, k)
    # more data does not lower tau: past the pilot, the band stays above the pilot's own tau (its 5th percentile)
    floor = float(np.percentile(resampled_tau[:, -1], 5)) if len(resampled_tau) else tau[-1]
    at = lambda x: lambda f: float(mean_curve(f, x))  # noqa: E731  (the prediction at x of some fits)
    out = {
        "fit": {"form": FORM, "forms": [{x: f[x] for x in ("c", "n0", "b", "ceiling")} for f in fits]},
        "fitted": mean_curve(fits, n).tolist(),
        "predictions": [
            {
                "multiple": m,
                "conversations": m * n[-1],
                "tau": at(m * n[-1])(fits),
                "by_form": [at(m * n[-1])([f]) for f in fits],
                "band": spread(at(m * n[-1]), fits, left_out, resampled, floor),
            }
            for m in MULTIPLES
        ],
        "band_fits": {"leave_one_out": len(left_out), "resamples": len(resampled), "floor": floor},
    }
    if len(n) > 3:  # the smaller fractions' fit against the pilot's own tau: how far an extrapolation held
        smaller = fit_forms(n[:-1], tau[:-1], k)
        out["check"] = {
            "conversations": n[-1],
            "measured": tau[-1],
            "predicted": at(n[-1])(smaller),
            "by_form": [at(n[-1])([f]) for f in smaller],
        }
    if target_tau is not None:
        need = lambda f: data_for(f, target_tau, REACH * n[-1]) or math.inf  # noqa: E731
        lo, hi = spread(need, fits, left_out, resampled)
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (None: not reached)
        out["target"] = {"tau": target_tau, "conversations": finite(need(fits)), "band": [finite(lo), finite(hi)]}
    return out


# ---------------------------------------------------------------------------- the report


def table(points: list[dict], result: dict, feature_minutes: float) -> str:
    """The fractions measured and the fit's predictions, as the terminal shows them."""
    k = len(points[0]["round_acceptance"])
    lines = [
        "fraction  conversations  supervised tokens  replayed tau  acceptance per position   fit    minutes",
    ]
    for p, fitted in zip(points, result["fitted"]):
        rates = " ".join(f"{x:.2f}" for x in p["round_acceptance"])
        lines.append(
            f"{p['label']:>8}  {p['conversations']:>13,}  {p['supervised_tokens']:>17,}  {p['tau']:>12.3f}  "
            f"{rates:<{5 * k + 8}}{fitted:.3f}  {p['minutes']:>7.1f}"
        )
    fits = result["fit"]["forms"]
    lines.append("\nfit: the mean of two curves, which differ in where tau levels off:")
    for f in fits:
        toward = f"towards k + 1 = {k + 1}" if f["ceiling"] else f"levels off at {f['c']:.3f} (fitted)"
        lines.append(f"  tau = 1 + {f['c'] - 1:.3f} (1 - (1 + n/{f['n0']:.4g})^-{f['b']:.3f}): {toward}")
    if check := result.get("check"):
        by_form = " and ".join(f"{x:.3f}" for x in check["by_form"])
        lines.append(
            f"check: the smaller fractions' fit predicts {check['predicted']:.3f} ({by_form}) at "
            f"{check['conversations']:,} conversations; measured {check['measured']:.3f}"
        )
    lines.append(f"\n{'data':>6}  {'conversations':>13}  {'predicted tau':>13}  {'band':>13}  minutes here")
    for p in result["predictions"]:
        lo, hi = p["band"]
        row = f"{p['multiple']:>5}x  {p['conversations']:>13,}  {p['tau']:>13.3f}  {lo:>6.3f}-{hi:<6.3f}"
        lines.append(f"{row}  {minutes_at(points, feature_minutes, p['conversations']):>12.0f}")
    if (more := data_for(fits, result["fitted"][-1] + 0.1, REACH * points[-1]["conversations"])) is not None:
        lines.append(
            f"tau {result['fitted'][-1] + 0.1:.3f}, +0.1 over the pilot's fit: about {more:,.0f} conversations in all, "
            f"{minutes_at(points, feature_minutes, more):,.0f} minutes here"
        )
    if target := result.get("target"):
        if target["conversations"] is None:
            lines.append(
                f"\ntau {target['tau']}: the fit does not reach it within {REACH}x the pilot's data "
                f"(it levels off at {float(np.mean([f['c'] for f in fits])):.3f})"
            )
        else:
            lo, hi = target["band"]
            lines.append(
                f"\ntau {target['tau']}: about {target['conversations']:,.0f} conversations "
                f"(band {lo:,.0f} to {'not reached' if hi is None else f'{hi:,.0f}'})"
            )
    lines.append(
        f"\nminutes: the feature pass {feature_minutes:.1f} for all fractions at once, then each fraction's training; "
        "a predicted size's: both scaled by conversations from the pilot's, on this hardware"
    )
    return "\n".join(lines)


def minutes_at(points: list[dict], feature_minutes: float, n: float) -> float:
    """The feature pass and training of n conversations at the pilot's minutes per conversation."""
    return n * (feature_minutes + points[-1]["minutes"]) / points[-1]["conversations"]


def plot(points: list[dict], result: dict, target_tau: float | None, path: Path) -> None:
    """forecast.png: the measured points, the fit and its two curves, its band, the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([p["conversations"] for p in points], float)
    xs = np.geomspace(n[0] / 2, n[-1] * max(MULTIPLES), 200)
    fits = result["fit"]["forms"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, mean_curve(fits, xs), label="fit (mean of the two)")
    for f in fits:
        style, label = (":", "towards k + 1") if f["ceiling"] else ("--", "levels off at a fitted c")
        ax.plot(xs, predict(f, xs), style, color="gray", label=label)
    lo, hi = [p["band"][0] for p in result["predictions"]], [p["band"][1] for p in result["predictions"]]
    at = [p["conversations"] for p in result["predictions"]]
    ax.fill_between([n[-1]] + at, [points[-1]["tau"]] + lo, [points[-1]["tau"]] + hi, alpha=0.2, label="band")
    ax.plot(n, [p["tau"] for p in points], "o", label="measured (replayed tau)")
    if target_tau is not None:
        ax.axhline(target_tau, linestyle="--", color="gray", label=f"target tau {target_tau}")
    ax.set_xscale("log")
    ax.set_xlabel("training conversations")
    ax.set_ylabel("replayed tau")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- the runs


def supervised_tokens(run, idx: list[int]) -> int:
    """Tokens that give a loss in these training samples: the answers', or with train_on 'all' every one."""
    rows = run.data.datasets["train"].select(idx)
    if run.cfg.train_on == "all":
        return sum(len(ids) for ids in rows["input_ids"])
    return int(sum(sum(mask) for mask in rows["loss_mask"]))


def features_minutes(out: Path, measured: float, rank: int) -> float:
    """The feature pass's minutes as the forecast's first run measured them (a resumed run finds
    the cache filled)."""
    path = out / "feature_pass.json"
    if path.exists():
        return json.loads(path.read_text())["minutes"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"minutes": measured})
    return measured


def recipe_key(run) -> str:
    """What a fraction's result depends on: the data of both splits, the training config, the
    DeepSpeed config and the ranks (a global batch is micro x accumulation x ranks), not where it
    is written or how it logs.  A result of another is redone."""
    cfg = {k: v for k, v in to_dict(run.cfg).items() if k not in NOT_RECIPE}
    key = json.dumps([run.data.key, run.data.keys, cfg, run.ds, run.world], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def label(fraction: float) -> str:
    return str(Fraction(fraction).limit_denominator(1000))


@cli
def main(argv=None) -> None:
    from .train import Run, training_parser

    parser = training_parser(__doc__)
    parser.add_argument(
        "--fractions", default=DEFAULT_FRACTIONS, help=f"of the training data, nested (default {DEFAULT_FRACTIONS})"
    )
    parser.add_argument(
        "--target-tau", type=number(float, 1.0), help="also: about how many conversations for this replayed tau"
    )
    args = parser.parse_args(argv)
    fractions = parse_fractions(args.fractions)
    run, subsets = Run.prepare(args, fractions)
    out = Path(run.cfg.output_dir)
    recipe = recipe_key(run)
    started = time.perf_counter()
    source = run.features()
    feature_minutes = features_minutes(out, (time.perf_counter() - started) / 60, run.rank)
    points = []
    for fraction, subset in zip(fractions, subsets):
        folder = out / f"fraction-{len(subset)}"
        done = folder / RESULT
        if done.exists() and (point := json.loads(done.read_text())).get("recipe") == recipe:
            points.append(point)
            log.info("%s: done, read back", done)
            continue
        began = time.perf_counter()
        trainer = run.train(source, subset, str(folder))
        minutes = (time.perf_counter() - began) / 60
        test_rounds = trainer.test_rounds or trainer.score()[1]  # none: resumed after its last epoch
        if run.rank == 0:
            rounds = torch.tensor(np.sum(list(test_rounds.values()), axis=0), dtype=torch.float64)
            _, tau, rates = round_stats(rounds)
            point = {
                "label": label(fraction),
                "fraction": fraction,
                "conversations": len(subset),
                "supervised_tokens": supervised_tokens(run, subset),
                "tau": tau,
                "round_acceptance": rates,
                "minutes": minutes,
                "recipe": recipe,
                "test_rounds": {str(k): v for k, v in test_rounds.items()},
            }
            write_json_atomic(done, point)
            points.append(point)
        del trainer
    if run.rank != 0:
        return
    report(points, run.cfg.ttt_steps, args.target_tau, feature_minutes, out)


def report(points: list[dict], k: int, target_tau: float | None, feature_minutes: float, out: Path) -> None:
    """forecast.json and forecast.png in `out`, and the table on the terminal; a pilot that
    gives no curve is said in one line (its points are kept in forecast.json)."""
    summary = {"points": [{x: p[x] for x in p if x != "test_rounds"} for p in points], "k": k}
    try:
        result = forecast(points, k, target_tau)
    except UserError as e:
        write_json_atomic(out / "forecast.json", summary | {"refused": str(e)})
        raise
    write_json_atomic(out / "forecast.json", summary | result | {"feature_pass_minutes": feature_minutes})
    plot(points, result, target_tau, out / "forecast.png")
    print(table(points, result, feature_minutes))
    print(f"\n{out / 'forecast.json'}, {out / 'forecast.png'}")


if __name__ == "__main__":
    main()
