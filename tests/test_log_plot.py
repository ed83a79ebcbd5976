import json

import pytest

from log_plot import read_metrics
from traineagle3.cli import UserError


def test_last_record_of_a_step_wins_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 2, "split": "train", "loss": [2.0], "acc": [0.1]},
        {"step": 1, "split": "train", "loss": [3.0], "acc": [0.0]},
        {"step": 2, "split": "train", "loss": [1.5], "acc": [0.2]},  # logged again after a resume
        {"step": 2, "split": "test", "loss": [1.7], "acc": [0.15]},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = read_metrics(path)
    assert [r["loss"][0] for r in m["train"]] == [3.0, 1.5] and len(m["test"]) == 1
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(UserError, match="metrics.jsonl: line 5 is not a metrics record"):
        read_metrics(path)


def test_the_replayed_tau_of_the_test_split_gets_its_own_row(tmp_path):
    from log_plot import figure

    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    train = [{"step": s, "epoch": 1, "split": "train", "loss": [3.0, 3.5], "acc": [0.2, 0.1]} for s in (10, 20)]
    test = [
        {
            "step": s,
            "epoch": e,
            "split": "test",
            "loss": [2.9, 3.4],
            "acc": [0.3, 0.2],
            "tau": t,
            "round_acceptance": [t - 1.1, 0.1],
        }
        for s, e, t in ((20, 1, 1.4), (40, 2, 1.55))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in train + test))
    fig = figure([path], x="epoch")
    tau_ax, rates_ax = fig.axes[4], fig.axes[5]
    assert "tau" in tau_ax.get_title()
    assert list(tau_ax.lines[0].get_xdata()) == [1, 2] and list(tau_ax.lines[0].get_ydata()) == [1.4, 1.55]
    assert [list(line.get_ydata()) for line in rates_ax.lines] == [
        [pytest.approx(0.3), pytest.approx(0.45)],
        [0.1, 0.1],
    ]

    for rec in test:  # an older run without the replay keeps the two rows
        del rec["tau"], rec["round_acceptance"]
    path.write_text("".join(json.dumps(r) + "\n" for r in train + test))
    assert len(figure([path]).axes) == 4

    other = tmp_path / "other" / "run" / "metrics.jsonl"  # two runs in folders of one name stay apart
    other.parent.mkdir(parents=True)
    other.write_text(path.read_text())
    labels = figure([path, other]).axes[0].get_legend_handles_labels()[1]
    assert labels[0] == f"{tmp_path.name}/run pos 0" and labels[2] == "other/run pos 0"
