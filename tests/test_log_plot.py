import json

import pytest

from log_plot import read_metrics


def test_last_record_of_a_step_wins_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 2, "split": "train", "loss": [2.0], "acc": [0.1]},
             {"step": 1, "split": "train", "loss": [3.0], "acc": [0.0]},
             {"step": 2, "split": "train", "loss": [1.5], "acc": [0.2]},  # logged again after a resume
             {"step": 2, "split": "test", "loss": [1.7], "acc": [0.15]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = read_metrics(path)
    assert [r["loss"][0] for r in m["train"]] == [3.0, 1.5] and len(m["test"]) == 1
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(SystemExit, match="line 5"):
        read_metrics(path)
