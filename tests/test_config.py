import argparse
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_env
from traineagle3.config import add_arguments, from_args


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(argv))


def test_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_length": 1024, "ttt_steps": 5, "aux_layers": [1, 2, 3]}))
    cfg = parse(["--config", str(path), "--ttt_steps", "3", "--resume", "--test_data", "none"])
    assert (cfg.max_length, cfg.ttt_steps, cfg.aux_layers, cfg.resume, cfg.test_data) == (1024, 3, [1, 2, 3], True, None)
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


def test_main_help_documents_every_option():
    out = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT / "traineagle3" / "llama", env=run_env(),
                         capture_output=True, text=True, check=True).stdout
    for flag in ["--deepspeed_config", "--train_data", "--draft_vocab_size", "--aux_layer_numbering", "--resume", "--ttt_steps"]:
        assert flag in out
