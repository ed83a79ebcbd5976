"""Send the metrics records to TensorBoard or Weights & Biases (`--report_to`), besides metrics.jsonl.

metrics.jsonl stays the record of a run (log_plot.py and the model card read it); a
tracker only mirrors each record as scalars, named `<split>/<field>` and, for the
per-TTT-position lists, `<split>/<field>/<position>`.  Both packages are optional: they
are imported only when chosen, and a missing one is a one-line error before any work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPORTERS = ("none", "tensorboard", "wandb")
PINS = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}  # as in requirement.txt


def scalars(record: dict) -> dict[str, float]:
    """Every number of a metrics record as a named scalar; lists become one scalar per position."""
    split, out = record.get("split", "train"), {}
    for key, value in record.items():
        if isinstance(value, bool) or key in ("step", "split"):
            continue
        if isinstance(value, (int, float)):
            out[f"{split}/{key}"] = float(value)
        elif isinstance(value, list) and all(isinstance(x, (int, float)) for x in value):
            out.update({f"{split}/{key}/{i}": float(x) for i, x in enumerate(value)})
    return out


def require(kind: str) -> None:
    """Fail in one line, exit status 2, when the chosen tracker's package is not installed."""
    if kind == "none":
        return
    try:
        __import__(kind)
    except ImportError:
        print(f"main.py: --report_to {kind} needs the {kind} package: pip install {PINS[kind]}", file=sys.stderr)
        raise SystemExit(2) from None


class TensorBoard:
    """Event files under <output_dir>/tensorboard (`tensorboard --logdir` reads them)."""

    def __init__(self, out: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A W&B run (project $WANDB_PROJECT, default eagle3-train) kept under <output_dir>/wandb;
    WANDB_MODE=offline keeps it there for `wandb sync`."""

    def __init__(self, out: Path, config: dict):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "eagle3-train"), dir=str(out), name=out.name, config=config
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb}


def open_tracker(kind: str, out: Path, config: dict):
    """The tracker `kind` names, writing for the run in `out`; None for 'none'."""
    return TRACKERS[kind](out, config) if kind != "none" else None
