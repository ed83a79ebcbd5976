"""A user's mistake ends the training entry point `main.py` with one line naming the file (or
flag) on stderr and exit status 2, before DeepSpeed and the models load; under the deepspeed
launcher too, whose own exit status is then 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_env

MAIN = Path(__file__).resolve().parents[1] / "traineagle3" / "llama" / "main.py"
CHAT = {"id": "a", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
# run in a folder holding these files; a case's flags come after these and override them
FILES = {
    "ds.json": json.dumps({"train_micro_batch_size_per_gpu": 2}),
    "good.jsonl": json.dumps(CHAT) + "\n",
    "bad.jsonl": "{not json\n",
    "typo.json": json.dumps({"max_lenght": 512}),
    "half.json": '{"ttt_steps": ',
    "option.json": json.dumps({"fc_norm": "false"}),
    "muon.json": json.dumps(
        {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5, "optimizer": {"type": "Muon", "params": {}}}
    ),
}
BASE = [
    "--deepspeed_config",
    "ds.json",
    "--train_data",
    "good.jsonl",
    "--output_dir",
    "out",
    "--cache_dir",
    "cache",
    "--num_proc",
    "1",
    "--progress",
    "false",
]

EARLY = {  # all found before the process group, the data and the models
    "bad flag value": (["--max_length", "x"], "error: argument --max_length: invalid int value: 'x' (see --help)"),
    "bad choice": (["--too_long", "cut"], "error: --too_long: too_long must be one of truncate, drop, not 'cut'"),
    "missing --config": (["--config", "nope.json"], "error: nope.json: No such file or directory"),
    "unknown config field": (["--config", "typo.json"], "error: typo.json: 'max_lenght' is not a config field"),
    "missing DeepSpeed config": (["--deepspeed_config", "nope.json"], "error: nope.json: No such file or directory"),
    "DeepSpeed config not JSON": (["--deepspeed_config", "half.json"], "error: half.json: not valid JSON"),
    "missing target folder": (["--target", "./nope"], "error: ./nope: no such model folder"),
    "folder with no model": (["--target", "empty"], "error: empty: no config.json: not a model folder"),
    "missing train_data": (["--train_data", "nope.jsonl"], "error: nope.jsonl: no such file"),
    "Muon with gradient clipping": (
        ["--deepspeed_config", "muon.json"],
        "error: muon.json: gradient_clipping 0.5 with the Muon optimizer clips Muon's orthogonalized updates",
    ),
    "draft_config not JSON": (["--draft_config", "half.json"], "error: half.json: not valid JSON"),
    "draft option not a boolean": (
        ["--draft_config", "option.json"],
        "error: option.json: fc_norm must be true or false, not 'false'",
    ),
}


@pytest.fixture
def folder(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "empty").mkdir()
    return tmp_path


def train(folder, *flags, launcher=None):
    cmd = [*(launcher or [sys.executable]), str(MAIN), *BASE, *map(str, flags)]
    return subprocess.run(cmd, cwd=folder, env=run_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("case", EARLY)
def test_a_mistake_found_before_any_work_is_one_line(folder, case):
    flags, expected = EARLY[case]
    r = train(folder, *flags)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(expected), r.stderr[-3000:]
    assert not (folder / "out").exists() and not (folder / "cache").exists()


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            "bad.jsonl",
            "error: bad.jsonl: kept 0 records; skipped 1 (invalid JSON; e.g. record 0): no usable conversations",
        ),
        ("good.jsonl", "error: good.jsonl: 1 training samples do not fill one global batch of 2"),
    ],
)
def test_a_mistake_in_the_data_ends_in_one_line_before_the_models_load(folder, tiny_target, data, expected):
    """Found once the target's tokenizer has read the data: the log lines come first, then the error."""
    r = train(folder, "--target", tiny_target, "--train_data", data, "--test_fraction", 0)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1].startswith(expected) and "loading the target" not in r.stderr
    assert not (folder / "out").exists()


def test_under_the_launcher_every_rank_ends_in_the_line_and_the_launcher_in_status_2(folder, tiny_target):
    """The first rank reads the data alone: the others learn its mistake instead of losing their peer."""
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29547"]
    r = train(folder, "--target", tiny_target, "--train_data", "bad.jsonl", launcher=deepspeed)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (
        errors
        == ["error: bad.jsonl: kept 0 records; skipped 1 (invalid JSON; e.g. record 0): no usable conversations"] * 2
    )
