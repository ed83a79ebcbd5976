import argparse
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_env

from traineagle3.cli import UserError
from traineagle3.config import add_arguments, from_args


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(argv))


def test_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_length": 1024, "ttt_steps": 5, "aux_layers": [1, 2, 3]}))
    cfg = parse(["--config", str(path), "--ttt_steps", "3", "--resume", "--test_data", "none"])
    assert (cfg.max_length, cfg.ttt_steps, cfg.aux_layers, cfg.resume, cfg.test_data) == (
        1024,
        3,
        [1, 2, 3],
        True,
        None,
    )
    assert parse(["--aux_layers", "2,8,13", "--progress", "false"]).aux_layers == [2, 8, 13]
    assert parse([]).draft_vocab_size == 32000


def test_unknown_or_invalid_fields_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_lenght": 1024}))
    with pytest.raises(ValueError, match="max_lenght"):
        parse(["--config", str(path)])
    with pytest.raises(ValueError, match="too_long"):
        parse(["--too_long", "cut"])
    with pytest.raises(ValueError, match="draft_init"):
        parse(["--draft_init", "zeros"])
    with pytest.raises(ValueError, match="train_on"):
        parse(["--train_on", "prompts"])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"max_length": "1024"}, "max_length must be int, not '1024'"),
        ({"aux_layers": [1, 2.5, 3]}, "aux_layers must be list[int] | None"),
        ({"resume": 1}, "resume must be bool, not 1"),
        ({"loss_type": "kl"}, "loss_type must be one of soft, hard, lk_nla, lk_hybrid, not 'kl'"),
        ({"ttt_steps": 0}, "ttt_steps must be at least 1, not 0"),
        ({"test_fraction": 1.0}, "test_fraction must be below 1"),
    ],
)
def test_a_wrong_value_in_the_config_file_names_the_file(tmp_path, fields, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(UserError) as e:
        parse(["--config", str(path)])
    assert str(e.value).startswith(f"{path}: {message}")


def test_a_wrong_flag_value_names_the_flag():
    with pytest.raises(UserError, match="^--epochs: epochs must be at least 1, not 0$"):
        parse(["--epochs", "0"])
    assert parse(["--max_steps", "none"]).max_steps is None


def test_main_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "main.py", "--help"],
        cwd=ROOT / "traineagle3" / "llama",
        env=run_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in [
        "--deepspeed_config",
        "--train_data",
        "--draft_vocab_size",
        "--aux_layer_numbering",
        "--resume",
        "--ttt_steps",
    ]:
        assert flag in out
