import json
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import ROOT, export_random_draft, run_env
from stand_in import stand_in
from test_evaluate import setup
from test_tree import FULL, Hinted, prompt_of

from traineagle3.advise import (
    answer_prompts,
    chain_rounds,
    draft_vocab,
    engine_costs,
    parse_trees,
    predict,
    recommend,
)
from traineagle3.cli import UserError
from traineagle3.decoding import greedy, speculative
from traineagle3.features import AuxHooks, TargetFeatures
from traineagle3.serving import EagleClock, EngineClock


def test_one_unroll_gives_the_rounds_of_chain_drafting_for_every_k(tiny_target):
    """The replayed rounds of each k are the offline evaluator's, round for round (its last round
    may accept guesses past the answer's end, which the replay cannot see)."""
    target, draft = setup(tiny_target, FULL)
    hooks = AuxHooks(target, [1, 2, 3])
    seen = set()
    for seed in range(3):
        prompt = prompt_of(seed)
        answer = greedy(target, prompt, 40, eos=set()).tokens
        d = Hinted(draft, prompt[0].tolist() + answer + [0] * 10, 6.0, lambda p: p % 5 != 0)
        d.config = draft.config
        features = TargetFeatures(target, [1, 2, 3], draft_vocab(draft, target.config.vocab_size))
        replayed = chain_rounds(features, d, prompt[0].tolist(), answer, 5)
        features.hooks.remove()
        for k in range(1, 6):
            decoded = speculative(target, hooks, d, prompt, 40, k, eos=set()).accepted
            assert replayed[k][:-1] == decoded[: len(replayed[k]) - 1], k
            assert len(decoded) - 1 <= len(replayed[k]) <= len(decoded)
            seen |= set(decoded[:-1])
    assert {0, 1, 2, 3} <= seen  # rounds of every kind were compared


def costs(t: dict, d: dict) -> dict:
    return {"target": t, "draft": d}


def test_predicted_speedup_is_tau_times_the_plain_step_over_the_round():
    chains = {1: {"tau": 1.5}, 3: {"tau": 2.0}}
    trees = {(2, 3, 6): {"tau": 2.7}}
    c1 = costs({1: 10.0, 2: 11.0, 4: 12.0, 6: 14.0}, {1: 1.0, 2: 1.5})
    c16 = costs({1: 10.0, 2: 19.0, 4: 36.0, 6: 55.0}, {1: 2.0, 2: 3.0})
    rows = {(r["setting"], r["concurrency"]): r for r in predict(chains, trees, {1: c1, 16: c16})}
    assert rows["chain k=1", 1]["speedup"] == pytest.approx(1.5 * 10 / (11 + 1), abs=1e-3)
    assert rows["chain k=3", 1]["speedup"] == pytest.approx(2.0 * 10 / (12 + 3), abs=1e-3)
    assert rows["tree topk=2 depth=3 N=6", 1]["speedup"] == pytest.approx(2.7 * 10 / (14 + 1 + 2 * 1.5), abs=1e-3)
    assert rows["chain k=3", 16]["speedup"] == pytest.approx(2.0 * 10 / (36 + 6), abs=1e-3)
    vllm, sglang = recommend(list(rows.values()), "vllm"), recommend(list(rows.values()), "sglang")
    assert vllm["best"][1]["setting"] == "chain k=3" and '"num_speculative_tokens": 3' in vllm["best"][1]["flags"]
    assert sglang["best"][1]["setting"] == "tree topk=2 depth=3 N=6"
    assert sglang["best"][1]["flags"].endswith("--speculative-eagle-topk 2 --speculative-num-draft-tokens 6")
    assert vllm["stops_paying_at"] == 16 and sglang["stops_paying_at"] == 16
    rows_fast = predict(chains, trees, {1: c1})
    assert recommend(rows_fast, "vllm")["stops_paying_at"] is None


def test_tree_flag_is_checked():
    assert parse_trees("2,3,6 4,5,16") == [(2, 3, 6), (4, 5, 16)]
    for bad in ["2,3", "a,b,c", "2,3,1"]:
        with pytest.raises(Exception, match="topk,depth,N"):
            parse_trees(bad)


def test_advise_cli_on_a_tiny_target(tiny_target, tmp_path, chat_jsonl):
    import subprocess
    import sys

    draft = export_random_draft(tiny_target, tmp_path, [1, 2, 3])["vllm"]
    out = tmp_path / "advise.json"
    args = ["--target", str(tiny_target), "--draft", str(draft), "--prompts", str(chat_jsonl), "--num-prompts", "2"]
    args += ["--max-new-tokens", "8", "--trees", "2,2,4", "--tree-prompts", "1", "--repeats", "1"]
    args += ["--concurrency", "1 2", "--dtype", "float32", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "traineagle3.advise", *args], cwd=ROOT, env=run_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert sorted(result["chains"]) == [str(k) for k in range(1, 8)]
    assert [t["tree"] for t in result["trees"]] == [[2, 2, 4]]
    assert len(result["predictions"]) == 2 * 8 and all(r["speedup"] > 0 for r in result["predictions"])
    assert set(result["recommendation"]) == {"vllm", "sglang"}
    assert "| chain k=7 |" in run.stdout and "sglang, concurrency 2:" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "traineagle3.advise", *args[:-2], "--concurrency", "0 4"],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--concurrency takes whole numbers" in bad.stderr


def test_draft_vocab_round_trips_d2t(tiny_target):
    _, draft = setup(tiny_target, torch.arange(0, 49152, 7))
    vm = draft_vocab(draft, 49152)
    assert torch.equal(vm.draft_ids, torch.arange(0, 49152, 7)) and torch.equal(vm.d2t, draft.d2t.cpu())


def test_advice_check_compares_the_prediction_with_each_served_k(tmp_path):
    from benchmark.advice_check import main as advice_check

    speedups = {1: 1.10, 2: 1.25, 3: 1.20}
    for k, s in speedups.items():
        (tmp_path / f"k{k}").mkdir()
        rows = [
            {"server": "baseline", "concurrency": 1, "speedup": 1.0, "acceptance_length": None},
            {"server": "eagle3", "concurrency": 1, "speedup": s, "acceptance_length": 1 + 0.3 * k},
        ]
        (tmp_path / f"k{k}" / "compare.json").write_text(json.dumps(rows))
    predictions = [{"setting": f"chain k={k}", "k": k, "concurrency": 1, "tau": 1.0, "speedup": 1.2} for k in (1, 2, 3)]
    advice = {"predictions": predictions, "recommendation": {"vllm": {"best": {"1": {"setting": "chain k=3"}}}}}
    (tmp_path / "advise.json").write_text(json.dumps(advice))
    assert advice_check([str(tmp_path / "advise.json"), str(tmp_path)]) == 0
    result = json.loads((tmp_path / "advice_check.json").read_text())
    assert [round(r["error"], 4) for r in result["rows"]] == [round(1.2 / s - 1, 4) for s in speedups.values()]
    verdict = result["recommendation"]["1"]
    assert verdict["recommended_k"] == 3 and verdict["served_best_k"] == 2
    assert verdict["behind_best"] == pytest.approx(1 - 1.20 / 1.25)
    assert "k=3, served best k=2 (4.0% behind" in (tmp_path / "advice_check.md").read_text()
    assert advice_check([str(tmp_path / "advise.json"), str(tmp_path / "none")]) == 1
    # a second sweep of the same prompts: averaged per k
    again = tmp_path / "again"
    (again / "k2").mkdir(parents=True)
    rows = [{"server": "eagle3", "concurrency": 1, "speedup": 1.35, "acceptance_length": 1.7}]
    (again / "k2" / "compare.json").write_text(json.dumps(rows))
    out = ["--out", str(tmp_path / "both")]
    assert advice_check([str(tmp_path / "advise.json"), str(tmp_path), str(again), *out]) == 0
    both = json.loads((tmp_path / "both" / "advice_check.json").read_text())
    k2 = both["rows"][1]
    assert k2["speedup_served"] == pytest.approx(1.30) and k2["speedup_per_sweep"] == [1.25, 1.35]
    assert k2["tau_served"] == pytest.approx(1.65) and both["rows"][0]["speedup_served"] == 1.10
    assert "| 1.30x (1.25 1.35) |" in (tmp_path / "both" / "advice_check.md").read_text()


USERS = [list(range(1000, 1012)), list(range(2000, 2020)), list(range(3000, 3015))]  # prompts' ids, as rendered


@contextmanager
def stand_in_engine(
    per_token: float, per_new_prompt_token: float, ignores_ignore_eos: bool = False, eagle_round: float | None = None
):
    """An OpenAI completions server whose request takes per_new_prompt_token for each prompt token
    past a prefix it has seen (its prefix cache: the first 8 tokens) plus per_token per generated token;
    with `eagle_round`, a vLLM EAGLE-3 server (k = 3) whose rounds take that long and yield 2 tokens
    each, counted in /metrics as vLLM does."""
    seen, counts = set(), {"drafts": 0, "done": 0}
    asked = []  # the prompts of the timed requests, in order

    def answer(path: str, body: dict | None):
        if path == "/metrics":
            labels = 'engine="0",model_name="stand-in"'
            text = f"vllm:spec_decode_num_drafts_total{{{labels}}} {counts['drafts']}.0\n"
            text += "".join(
                f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="{i}"}} 0.0\n'
                for i in range(3 if eagle_round else 0)
            )
            return (
                text + f'vllm:request_success_total{{{labels},finished_reason="length"}} {counts["done"]}.0\n'
            ).encode()
        if body is None:
            return {"data": [{"id": "stand-in"}]}
        prompt, n = body["prompt"], body["max_tokens"]
        asked.append(prompt)
        new = len(prompt) - 8 if tuple(prompt[:8]) in seen else len(prompt)
        seen.add(tuple(prompt[:8]))
        rounds = (n // 2) if eagle_round else 0  # after the prefill's token, 2 per round
        time.sleep(new * per_new_prompt_token + (rounds * eagle_round if eagle_round else n * per_token))
        counts["drafts"] += rounds
        counts["done"] += 1
        return {"usage": {"completion_tokens": 1 if ignores_ignore_eos else n}}

    with stand_in(answer) as (url, _):
        yield url + "/v1", asked


def test_the_engine_clock_times_a_decoding_step_and_the_extra_tokens_of_a_pass():
    """Sleeps long enough (30-50 ms a token) and medians of 3 that a loaded machine's jitter stays small."""
    with stand_in_engine(per_token=0.05, per_new_prompt_token=0.03) as (url, asked):
        clock = EngineClock(url, vocab=49152, context=8, prompts=USERS)
        assert clock.server.model == "stand-in"
        assert clock.step(batch=2, repeats=3, tokens=7) == pytest.approx(0.05, rel=0.2)
        assert {tuple(p) for p in asked} == {tuple(p) for p in USERS}  # the step is timed on the user's prompts
        extra = clock.extra(batch=2, sizes=[1, 3, 6], repeats=3)
        assert extra[1] == 0 and extra[3] == pytest.approx(0.06, abs=0.015)
        assert extra[6] == pytest.approx(0.15, abs=0.02)
        offline = {"target": {1: 0.1, 3: 0.12, 6: 0.15}, "draft": {1: 0.01}}
        costs = engine_costs(clock, offline, 1, [1, 3, 6], 3)
        step = costs["target"][1]
        assert step == pytest.approx(0.05, rel=0.2) and costs["draft"][1] == pytest.approx(0.1 * step)
        assert costs["target"][6] - step == pytest.approx(0.15, abs=0.02)
    with stand_in_engine(per_token=0.001, per_new_prompt_token=0.0, ignores_ignore_eos=True) as (url, _):
        with pytest.raises(UserError, match="generated 1 tokens, not 33 .is ignore_eos honoured"):
            EngineClock(url, vocab=49152, context=8, prompts=USERS).step(batch=1, repeats=1)


def test_with_a_server_the_answers_are_the_servers_in_its_rendering(tiny_target, smol_tokenizer):
    class Served:
        def tokenize(self, messages):
            return [7, 8, len(messages[0]["content"])]

        def greedy(self, messages, prompt_ids, max_tokens):
            return [prompt_ids[-1]] * max_tokens

    target, _ = setup(tiny_target, FULL)
    prompts = [{"id": 0, "turns": ["abc"]}, {"id": 1, "turns": ["hello"]}]
    served = answer_prompts(target, smol_tokenizer, prompts, 2, "cpu", Served())
    assert served == [([7, 8, 3], [3, 3]), ([7, 8, 5], [5, 5])]
    here = answer_prompts(target, smol_tokenizer, prompts[:1], 4, "cpu")  # without one: the template and HF greedy
    text = smol_tokenizer.decode(here[0][0])
    assert text.endswith("<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n") and len(here[0][1]) == 4


def test_with_an_eagle_server_a_draft_step_is_its_round_less_the_verification_pass():
    with (
        stand_in_engine(per_token=0.05, per_new_prompt_token=0.03) as (plain, _),
        stand_in_engine(per_token=0.05, per_new_prompt_token=0.03, eagle_round=0.2) as (spec, asked),
    ):
        clock, eagle = EngineClock(plain, 49152, 8, USERS), EagleClock(spec, 49152, 8, USERS)
        assert eagle.k == 3
        assert eagle.step(batch=2, repeats=3, tokens=7) == pytest.approx(0.2, abs=0.015)
        assert {tuple(p) for p in asked} == {tuple(p) for p in USERS}
        offline = {"target": {1: 0.1, 4: 0.12}, "draft": {1: 0.01, 2: 0.015}}
        costs = engine_costs(clock, offline, 2, [1, 4], 3, eagle)
        # round 0.2 = a pass of 4 tokens (0.05 + 3 x 0.03) + 3 draft steps
        assert costs["draft"][1] == pytest.approx(0.02, abs=0.008)
        assert costs["draft"][2] == pytest.approx(1.5 * costs["draft"][1])
    with stand_in_engine(per_token=0.001, per_new_prompt_token=0.0) as (plain, _):
        with pytest.raises(UserError, match="no speculative decoding in /metrics"):
            EagleClock(plain, 49152, 8, USERS)
