import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_env
from transformers import AutoModelForCausalLM

from traineagle3.decoding import greedy, speculative
from traineagle3.draft import Eagle3Draft
from traineagle3.evaluate import evaluate
from traineagle3.features import AuxHooks
from traineagle3.records import MT_BENCH, read_prompts
from traineagle3.vocab import VocabMap

PROMPTS = [{"id": "a", "turns": ["What is 2+2?", "And 3+3?"]}, {"id": "b", "turns": ["Name a colour."]}]


def setup(tiny_target, draft_vocab, seed=0):
    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float64).eval()
    target.lm_head.weight.data *= 30  # a confident target: varied greedy text, no near-ties
    vm = VocabMap(draft_vocab, target.config.vocab_size)
    torch.manual_seed(seed)
    draft = Eagle3Draft.from_target(
        target.config, vm, [1, 2, 3], target.get_input_embeddings().weight.data, dtype=torch.float64
    ).eval()
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_plain_greedy_with_a_random_draft(tiny_target, k):
    target, draft = setup(tiny_target, torch.arange(0, 49152, 7))
    hooks = AuxHooks(target, [1, 2, 3])
    for seed in range(3):
        prompt = torch.randint(3, 40000, (1, 6 + seed), generator=torch.Generator().manual_seed(seed))
        base = greedy(target, prompt, 24, eos=set())
        spec = speculative(target, hooks, draft, prompt, 24, k, eos=set())
        assert spec.tokens == base.tokens and len(base.tokens) == 24
        assert 1 + sum(a + 1 for a in spec.accepted) >= 24 and all(0 <= a <= k for a in spec.accepted)


def test_a_draft_that_always_agrees_reaches_tau_k_plus_1(tiny_target, smol_tokenizer):
    """Zero lm_heads: target and draft both always pick token 0, so every proposal is accepted."""
    target, draft = setup(tiny_target, torch.arange(0, 1000))
    target.lm_head.weight.data.zero_()
    draft.lm_head.weight.data.zero_()
    k = 3
    prompts = PROMPTS + [{"id": "c", "turns": ["請用三句話介紹台北。"]}]
    result = evaluate(target, smol_tokenizer, draft, prompts, k, max_new=17, device="cpu")
    assert result["total"]["tau"] == k + 1 and result["total"]["acceptance_per_position"] == [1.0] * k
    assert result["total"]["identical"] and [r["turns"] for r in result["prompts"]] == [2, 1, 1]
    by_script = result["total"]["by_script"]
    assert {name: s["prompts"] for name, s in by_script.items()} == {"cjk": 1, "latin": 2}
    assert by_script["cjk"]["rounds"] == 4 and by_script["cjk"]["tau"] == k + 1  # 17 tokens: 1, then 4 rounds of 4


def test_forced_decoding_counts_acceptance_along_another_decoders_output(tiny_target):
    """A server's output replayed: the verified tokens are the forced ones, whatever the target says."""
    target, draft = setup(tiny_target, torch.arange(0, 1000))
    hooks = AuxHooks(target, [1, 2, 3])
    prompt = torch.randint(3, 40000, (1, 6), generator=torch.Generator().manual_seed(0))
    base = greedy(target, prompt, 24, eos=set())
    spec = speculative(target, hooks, draft, prompt, 24, 3, eos=set())
    again = speculative(target, hooks, draft, prompt, 24, 3, eos=set(), forced=base.tokens)
    assert again.tokens == base.tokens and again.accepted == spec.accepted
    target, draft = setup(tiny_target, torch.arange(1, 1001))  # draft token 0 is the target's token 1
    target.lm_head.weight.data.zero_()  # the target always says 0
    draft.lm_head.weight.data.zero_()  # the draft always proposes 1
    forced = [5, 1, 1, 1, 1, 1, 1, 1, 7, 1]
    out = speculative(target, AuxHooks(target, [1, 2, 3]), draft, prompt, 50, 3, eos=set(), forced=forced)
    # the last round checks its guesses past the forced end with the target (1, then 0s): as a server at max_tokens
    assert out.tokens == forced and out.accepted == [3, 3, 1]


def test_prompt_files_mt_bench_and_sharegpt(tmp_path):
    mt = read_prompts(str(MT_BENCH))
    assert len(mt) == 80 and all(len(p["turns"]) == 2 for p in mt)
    first = read_prompts(str(MT_BENCH), 3, max_turns=1)
    assert [p["turns"] for p in first] == [p["turns"][:1] for p in mt[:3]]
    path = tmp_path / "chats.json"
    path.write_text(
        json.dumps(
            [
                {"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                {"conversations": [{"from": "robot", "value": "?"}]},
            ]
        )
    )
    assert read_prompts(str(path)) == [{"id": "x", "turns": ["hi"]}]


def test_cli_prints_table_and_writes_json(tiny_target, tmp_path):
    target, draft = setup(tiny_target, torch.arange(0, 2000))
    from traineagle3.checkpoint import save_draft_folder

    save_draft_folder(draft.float().state_dict(), draft.config, tmp_path / "draft")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "eval.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "traineagle3.evaluate",
            "--target",
            str(tiny_target),
            "--draft",
            str(tmp_path / "draft"),
            "--prompts",
            str(prompts),
            "--num-speculative-tokens",
            "2",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
            "--dtype",
            "float32",
        ],  # exact: bf16 verifying k tokens at once may flip a near-tie
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| tau |" in r.stdout.replace(" tau ", " tau ") and "lossless" in r.stdout
    assert [line.split(",")[0] for line in r.stdout.splitlines() if line.startswith("eval: prompt")] == [
        "eval: prompt 1/2",
        "eval: prompt 2/2",
    ]
    result = json.loads(out.read_text())
    assert result["total"]["prompts"] == 2 and len(result["total"]["acceptance_per_position"]) == 2
    assert result["total"]["identical"] is True


def test_replaying_ttt_on_a_greedy_answer_gives_the_rounds_speculative_decoding_takes(tiny_target):
    """The held-out tau: TTT run on the target's own greedy answer, replayed as rounds
    (acceptance.replay_rounds), must accept what chain drafting really accepts, round by round.
    A draft half-trained on that answer makes the rounds varied (some 0, some k)."""
    from traineagle3.acceptance import decode_rounds, replay_rounds
    from traineagle3.features import TargetFeatures

    target, draft = setup(tiny_target, torch.arange(0, 49152))
    vm = VocabMap(torch.arange(0, 49152), target.config.vocab_size)
    k, n_new = 3, 40
    prompt = torch.randint(3, 40000, (1, 7), generator=torch.Generator().manual_seed(1))
    answer = greedy(target, prompt, n_new, eos=set()).tokens
    ids = torch.cat([prompt, torch.tensor([answer])], 1)
    mask = torch.cat([torch.zeros_like(prompt), torch.ones(1, n_new, dtype=torch.long)], 1)
    f = TargetFeatures(target, [1, 2, 3], vm)(ids)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        r = draft(f.aux_hidden, ids, torch.ones_like(ids), f.teacher, f.teacher_ok, steps=k)
        opt.zero_grad()
        r.loss.backward()
        opt.step()
    draft.eval()
    with torch.no_grad():
        run = draft(f.aux_hidden, ids, mask, f.teacher, f.teacher_ok, steps=k).run
    replayed = replay_rounds(run[0].tolist(), mask[0].bool().tolist(), k)
    spec = speculative(target, AuxHooks(target, [1, 2, 3]), draft, prompt, n_new, k, eos=set())
    assert spec.tokens == answer
    assert len(replayed) == len(spec.accepted) and min(replayed) == 0 and max(replayed) == k
    # the last round may accept guesses past the answer's end, which the replay cannot see
    assert replayed[:-1] == spec.accepted[:-1] and replayed[-1] <= spec.accepted[-1]
    hist = decode_rounds(run, mask, k)
    assert hist.tolist() == [replayed.count(a) for a in range(k + 1)]
