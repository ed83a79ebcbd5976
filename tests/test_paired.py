"""traineagle3.paired: the paired gap and its interval, and the command against stand-in vLLM servers
(one per draft, counting drafts and accepted tokens in /metrics as vLLM does), read back on a rerun."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
from stand_in import stand_in

from traineagle3 import paired
from traineagle3.cli import UserError


def rows(accepted_per_prompt, drafts=10, k=3, ids=None):
    """One row per prompt: `drafts` drafting rounds, the accepted tokens spread over k positions."""
    out = []
    for i, acc in enumerate(accepted_per_prompt):
        per_pos = [min(acc, drafts)] + [max(acc - drafts, 0)] + [0] * (k - 2)
        out.append(
            {
                "id": (ids or list(range(len(accepted_per_prompt))))[i],
                "output": [1, 2],
                "drafts": drafts,
                "accepted": per_pos,
            }
        )
    return out


def test_gap_and_its_interval():
    rng = np.random.default_rng(0)
    base = rng.integers(2, 9, 20).tolist()  # prompts differ a lot from each other
    same = paired.paired_gap(rows(base), rows(base))
    assert same["gap"] == 0 and same["interval"] == [0, 0] and same["ahead"] == same["behind"] == 0
    better = paired.paired_gap(rows(base), rows([a + 2 for a in base]))  # +2 of 10 drafts on every prompt
    assert better["gap"] == pytest.approx(0.2) and 0 < better["interval"][0] <= 0.2 <= better["interval"][1]
    assert better["ahead"] == 20 and better["outputs_differ"] == 0
    noise = [a + d for a, d in zip(base, rng.choice([-1, 1], 20))]  # as often behind as ahead
    mixed = paired.paired_gap(rows(base), rows(noise))
    assert (
        mixed["interval"][0] < mixed["gap"] < mixed["interval"][1] and mixed["interval"][0] < 0 < mixed["interval"][1]
    )
    with pytest.raises(ValueError, match="same prompts"):
        paired.paired_gap(rows(base), rows(base, ids=list(range(1, 21))))


def test_named_flags():
    assert paired.named("ours=out/vllm") == ("ours", "out/vllm")
    assert paired.named("out/exported/vllm/") == ("vllm", "out/exported/vllm/")
    with pytest.raises(UserError, match="distinct"):
        paired.parse_args(["--target", "t", "--draft", "a=x", "--draft", "a=y", "--prompts", "p"])
    with pytest.raises(UserError, match="two or more"):
        paired.parse_args(["--target", "t", "--draft", "a=x", "--prompts", "p"])


def engine(accepted: int, k: int = 3):
    """A stand-in vLLM server whose draft has `accepted` of each request's 10 drafts right at position 0."""
    counts = {"done": 0, "drafts": 0, "acc": [0] * k}

    def answer(path, body):
        if path == "/v1/models":
            return {"data": [{"id": "paired", "max_model_len": 2048}]}
        if path == "/v1/chat/completions":
            counts["done"] += 1
            counts["drafts"] += 10
            counts["acc"][0] += accepted + len(body["messages"][0]["content"]) % 2  # prompts differ a little
            return {"choices": [{"token_ids": [5, 6, 7]}]}
        if path == "/metrics":
            lines = [
                f'vllm:request_success_total{{finished_reason="stop"}} {counts["done"]}',
                f'vllm:spec_decode_num_drafts_total{{model_name="paired"}} {counts["drafts"]}',
            ]
            lines += [
                f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="paired",position="{i}"}} {a}'
                for i, a in enumerate(counts["acc"])
            ]
            return "\n".join(lines).encode()
        raise AssertionError(path)

    return answer


def test_command_serves_each_draft_once_and_reads_back(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "turns": ["q" * (i + 1)]}) + "\n" for i in range(6)))
    drafts = {}
    for name in ("ours", "peer"):
        drafts[name] = tmp_path / name
        drafts[name].mkdir()
        (drafts[name] / "config.json").write_text(json.dumps({"name": name}))
    launches = []

    @contextmanager
    def launched(engine_name, target, *, draft, **kw):
        launches.append(draft.name)
        with stand_in(engine(accepted={"ours": 3, "peer": 5}[draft.name])) as (url, _):
            yield url

    monkeypatch.setattr(paired, "launched", launched)
    argv = [
        "--target",
        str(tmp_path),
        "--prompts",
        f"q={prompts}",
        "--out",
        str(tmp_path / "out"),
        "--dtype",
        "float32",
    ]
    argv += ["--draft", f"ours={drafts['ours']}", "--draft", f"peer={drafts['peer']}", "--num-prompts", "6"]
    paired.main(argv)
    result = json.loads((tmp_path / "out" / "paired.json").read_text())["results"]["q"]
    # ours: 3 or 4 of 10 drafts accepted per prompt, peer 5 or 6: tau 1.35 against 1.55
    assert result["ours"]["tau"] == pytest.approx(1.35) and result["peer"]["tau"] == pytest.approx(1.55)
    gap = result["peer"]["vs_first"]
    assert gap["gap"] == pytest.approx(0.2) and gap["interval"] == pytest.approx([0.2, 0.2]) and gap["ahead"] == 6
    assert launches == ["ours", "peer"] and "+0.200 (95% +0.200 to +0.200), ahead on 6" in capsys.readouterr().out
    paired.main(argv)  # both read back: no server
    assert launches == ["ours", "peer"] and capsys.readouterr().out.count("served before, read back") == 2
    (drafts["peer"] / "config.json").write_text(json.dumps({"name": "peer", "changed": True}))
    paired.main(argv)  # a changed draft is served again, the other read back
    assert launches == ["ours", "peer", "peer"]


def test_too_few_prompts_or_no_draft_folder_is_one_line(tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")
    argv = ["--target", "t", "--draft", f"a={tmp_path}", "--draft", f"b={tmp_path}", "--prompts", str(prompts)]
    with pytest.raises(UserError, match="1 usable prompts"):
        paired.main.__wrapped__(argv)
    prompts.write_text(prompts.read_text() * 3)
    with pytest.raises(UserError, match="no config.json"):
        paired.main.__wrapped__(argv)
