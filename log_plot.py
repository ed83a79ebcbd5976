"""Plot training logs: loss and accuracy per TTT position, train and test, runs overlaid.

    python log_plot.py outputs/run-a/metrics.jsonl outputs/run-b/metrics.jsonl -o log_plot.png

Reads the metrics.jsonl that traineagle3/llama/main.py writes.  Colour = TTT position,
line style = run.  Test records that carry the replayed decoding (`tau`, `round_acceptance`)
get a third row: the held-out tau that serving should reproduce.  A resumed run may have
logged a step twice; the last line wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from traineagle3.cli import Parser, UserError, cli  # noqa: E402

STYLES = ["-", "--", ":", "-."]
CMAP = plt.get_cmap("viridis")


def colour(k: int, positions: int):
    """TTT position k of `positions`, the same colour in every panel."""
    return CMAP(k / max(positions - 1, 1))


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} sorted by step, one record per (split, step)."""
    by_key = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_key[(rec["split"], rec["step"])] = rec
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{path}: line {n} is not a metrics record ({e})") from None
    out = {"train": [], "test": []}
    for (split, _), rec in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        out.setdefault(split, []).append(rec)
    return out


def figure(paths: list[Path], x: str = "step") -> plt.Figure:
    """Loss and accuracy per TTT position (train | test); a third row with the test split's
    replayed tau and per-position acceptance when the runs logged them (the served numbers)."""
    runs = {path: read_metrics(path) for path in paths}
    names = [path.parent.name for path in paths]
    replayed = any("tau" in rec for m in runs.values() for rec in m.get("test", []))
    fig, axes = plt.subplots(3 if replayed else 2, 2, figsize=(13, 12 if replayed else 8), sharex=True)
    for r, (path, m) in enumerate(runs.items()):
        # the demo's runs all sit in <out>/train/: name those by their output folder too
        label = (path.parent.name if names.count(path.parent.name) == 1 else "/".join(path.parent.parts[-2:])) or str(
            path
        )
        style = STYLES[r % len(STYLES)]
        for col, split in enumerate(["train", "test"]):
            recs = m.get(split, [])
            if not recs:
                continue
            positions = len(recs[0]["loss"])
            xs = [rec[x] for rec in recs]
            for k in range(positions):
                kw = dict(
                    color=colour(k, positions), marker="o", markersize=3, label=f"{label} pos {k}"
                )  # one test point per epoch shows too
                axes[0, col].plot(xs, [rec["loss"][k] for rec in recs], style, **kw)
                axes[1, col].plot(xs, [rec["acc"][k] for rec in recs], style, **kw)
        decoded = [rec for rec in m.get("test", []) if "tau" in rec]
        if decoded:
            xs = [rec[x] for rec in decoded]
            axes[2, 0].plot(xs, [rec["tau"] for rec in decoded], style, color="black", marker="o", label=label)
            positions = len(decoded[0]["round_acceptance"])
            for k in range(positions):
                axes[2, 1].plot(
                    xs,
                    [rec["round_acceptance"][k] for rec in decoded],
                    style,
                    marker="o",
                    color=colour(k, positions),
                    label=f"{label} pos {k}",
                )
    for col, split in enumerate(["train", "test"]):
        axes[0, col].set_title(f"{split} loss")
        axes[1, col].set_title(f"{split} accuracy (draft top-1 == target top-1)")
    if replayed:
        axes[2, 0].set_title("test tau (greedy decoding of the answers replayed, as served)")
        axes[2, 1].set_title("test acceptance per position in those rounds")
        axes[2, 0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(x)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    return fig


def plot(paths: list[Path], out: Path, x: str = "step") -> None:
    fig = figure(paths, x)
    fig.savefig(out, dpi=110)
    plt.close(fig)


@cli
def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files, one per run")
    p.add_argument("-o", "--output", type=Path, default=Path("log_plot.png"))
    p.add_argument("--x", choices=["step", "epoch"], default="step", help="x axis")
    args = p.parse_args(argv)
    for m in args.metrics:
        if not m.is_file():
            raise UserError(f"{m}: no such metrics file")
    plot(args.metrics, args.output, args.x)
    print(args.output)


if __name__ == "__main__":
    main()
