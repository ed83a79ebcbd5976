"""--report_to: metrics records reach TensorBoard's event files and a W&B offline run."""

import argparse
import json
import sys
import time

import pytest

from traineagle3.config import add_arguments, from_args
from traineagle3.metrics import MetricsLog
from traineagle3.tracking import open_tracker, require, scalars

RECORDS = [
    {
        "step": 1,
        "epoch": 0.5,
        "split": "train",
        "lr": 1e-4,
        "loss": [2.5, 3.0],
        "acc": [0.25, 0.125],
        "acceptance": [0.25, 0.0625],
        "tokens_per_s": 900.0,
        "peak_rss_gib": 1.5,
    },
    {
        "step": 2,
        "epoch": 1.0,
        "split": "train",
        "lr": 2e-4,
        "loss": [2.0, 2.75],
        "acc": [0.5, 0.25],
        "acceptance": [0.375, 0.125],
        "tokens_per_s": 950.0,
        "peak_rss_gib": 1.75,
    },
    {"step": 2, "epoch": 1.0, "split": "test", "loss": [2.25, 2.5], "tau": 1.625, "round_acceptance": [0.5, 0.125]},
]


def log_records(kind, out):
    log = MetricsLog(out / "metrics.jsonl", True, open_tracker(kind, out, {"report_to": kind}))
    for r in RECORDS:
        log.write(**r)
    log.close()


def test_scalars_name_each_position_and_skip_text():
    s = scalars(RECORDS[2] | {"time": "2026-12-02T00:00:00+00:00"})
    assert s == {
        "test/epoch": 1.0,
        "test/loss/0": 2.25,
        "test/loss/1": 2.5,
        "test/tau": 1.625,
        "test/round_acceptance/0": 0.5,
        "test/round_acceptance/1": 0.125,
    }


def test_tensorboard_reader_gets_the_scalars_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_records("tensorboard", tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert got["train/loss/1"] == [(1, 3.0), (2, 2.75)] and got["train/acceptance/0"] == [(1, 0.25), (2, 0.375)]
    assert got["test/tau"] == [(2, 1.625)] and got["test/round_acceptance/1"] == [(2, 0.125)]
    assert [v for _, v in got["train/lr"]] == pytest.approx([1e-4, 2e-4])
    assert got["train/tokens_per_s"] == [(1, 900.0), (2, 950.0)] and got["train/peak_rss_gib"][-1] == (2, 1.75)
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "time"} for r in jsonl] == RECORDS  # the JSONL stays


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_records("wandb", tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    tags = [tag.encode() for tag in ("train/loss/1", "test/tau", "train/tokens_per_s")]
    deadline = time.monotonic() + 30  # W&B's service process may still be writing after finish() returns
    while not all(tag in runs[0].read_bytes() for tag in tags) and time.monotonic() < deadline:
        time.sleep(0.2)
    data = runs[0].read_bytes()  # W&B's own record format: the keys are stored as they are
    assert all(tag in data for tag in tags)


def test_a_missing_package_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(SystemExit) as e:
        require("wandb")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install wandb==" in err
    require("none")


def test_report_to_is_a_config_field_checked_on_parse():
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert from_args(p.parse_args(["--report_to", "tensorboard"])).report_to == "tensorboard"
    with pytest.raises(ValueError, match="report_to"):
        from_args(p.parse_args(["--report_to", "mlflow"]))
