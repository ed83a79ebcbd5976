import pytest
import torch
from test_evaluate import setup

from traineagle3.decoding import greedy, speculative, tree_speculative
from traineagle3.features import AuxHooks
from traineagle3.tree import Tree, accept, ancestor_mask, target_mask

FULL = torch.arange(0, 49152)


class Hinted:
    """A real draft whose logits are pushed toward a known text: the entry at position p (token
    p+1) gets `boost` on text[p+2] where `where(p)`.  A large boost everywhere makes an oracle;
    a moderate one on some positions makes a draft that is right sometimes, not always first."""

    def __init__(self, draft, text: list[int], boost: float, where=lambda p: True):
        self.draft, self.text, self.boost, self.where = draft, text, boost, where
        self.d2t, self.fc = draft.d2t, draft.fc

    def step(self, ids, hidden, pos, cache):
        logits, h = self.draft.step(ids, hidden, pos, cache)
        logits = logits.clone()
        for i, p in enumerate(pos[0].tolist()):
            if p + 2 < len(self.text) and self.where(p):
                logits[0, i, self.text[p + 2]] += self.boost
        return logits, h


def prompt_of(seed, length=6):
    return torch.randint(3, 40000, (1, length + seed), generator=torch.Generator().manual_seed(seed))


def hinted(target, draft, prompt, boost, where=lambda p: True, n=48):
    text = prompt[0].tolist() + greedy(target, prompt, n, eos=set()).tokens
    return Hinted(draft, text, boost, where)


@pytest.mark.parametrize("topk,depth,num", [(1, 3, 4), (2, 3, 6), (4, 4, 10), (3, 5, 16)])
def test_tree_greedy_equals_plain_greedy(tiny_target, topk, depth, num):
    target, draft = setup(tiny_target, FULL)
    _, part = setup(tiny_target, torch.arange(0, 49152, 7), seed=1)
    hooks = AuxHooks(target, [1, 2, 3])
    rounds = []
    for seed in range(2):
        prompt = prompt_of(seed)
        text = prompt[0].tolist() + greedy(target, prompt, 30 + depth + 2, eos=set()).tokens
        eos = {text[prompt.shape[1] + 20]} if seed == 1 else set()  # an EOS mid-answer ends both the same way
        base = greedy(target, prompt, 30, eos=eos)
        # a sometimes-right draft (boost 6: the right token often among the top K, not always first)
        for d in [part, Hinted(draft, text, 6.0, lambda p: p % 4 != 0)]:
            spec = tree_speculative(target, hooks, d, prompt, 30, topk, depth, num, eos)
            assert spec.tokens == base.tokens
            assert all(0 <= a <= depth for a in spec.accepted) and 1 + sum(a + 1 for a in spec.accepted) >= len(
                base.tokens
            )
            rounds += spec.accepted
    assert len(base.tokens) <= 21 and max(rounds) >= 2 and min(rounds) == 0  # the drafts were tested both ways


@pytest.mark.parametrize("topk,depth,num", [(1, 3, 4), (2, 4, 8), (3, 3, 12)])
def test_an_always_agreeing_draft_reaches_tau_depth_plus_1(tiny_target, topk, depth, num):
    target, draft = setup(tiny_target, FULL)
    hooks = AuxHooks(target, [1, 2, 3])
    for seed in range(2):
        prompt = prompt_of(seed)
        oracle = hinted(target, draft, prompt, 100.0)
        max_new = 1 + 6 * (depth + 1)  # the prefill's token, then 6 full rounds
        spec = tree_speculative(target, hooks, oracle, prompt, max_new, topk, depth, num, eos=set())
        assert spec.tokens == greedy(target, prompt, max_new, eos=set()).tokens
        assert spec.accepted == [depth] * 6


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_topk_1_is_chain_drafting(tiny_target, depth):
    target, draft = setup(tiny_target, FULL)
    hooks = AuxHooks(target, [1, 2, 3])
    for seed in range(2):
        prompt = prompt_of(seed)
        d = hinted(target, draft, prompt, 100.0, lambda p: p % 5 != 2)  # right 4 positions in 5
        chain = speculative(target, hooks, d, prompt, 40, depth, eos=set())
        tree = tree_speculative(target, hooks, d, prompt, 40, 1, depth, depth + 1, eos=set())
        assert tree.tokens == chain.tokens and tree.accepted == chain.accepted
        assert len(set(chain.accepted)) > 1 or depth == 1


def test_tree_masks_and_acceptance_on_a_hand_built_tree():
    #        0
    #      1   2
    #     3 4   5
    #     6
    parents = [-1, 0, 0, 1, 1, 2, 3]
    allowed = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 2, 5], 6: [0, 1, 3, 6]}
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for i, js in allowed.items():
        expected[i, js] = True
    assert torch.equal(ancestor_mask(parents), expected)
    mask = target_mask(parents, 3, torch.float32)
    assert mask.shape == (1, 1, 7, 10) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0, :, :3], torch.zeros(7, 3))  # everyone sees the prefix
    assert torch.equal(mask[0, 0, :, 3:] == 0, expected)
    assert (mask[0, 0, :, 3:][~expected] == torch.finfo(torch.float32).min).all()
    tree = Tree([10, 11, 12, 13, 14, 15, 16], parents, [0, 1, 1, 2, 2, 2, 3])
    # the target picks 11 after the root, 14 after 11 (not 13), anything else after 14
    assert accept(tree, [11, 14, 0, 0, 99, 0, 0]) == [0, 1, 4]
    assert accept(tree, [12, 0, 15, 0, 0, 7, 0]) == [0, 2, 5]
    assert accept(tree, [11, 13, 0, 16, 0, 0, 0]) == [0, 1, 3, 6]
    assert accept(tree, [99] * 7) == [0]


def test_evaluate_with_a_tree_reports_per_depth(tiny_target, smol_tokenizer):
    from test_evaluate import PROMPTS

    from traineagle3.evaluate import evaluate, table

    target, draft = setup(tiny_target, torch.arange(0, 2000))
    result = evaluate(target, smol_tokenizer, draft, PROMPTS, 7, max_new=10, device="cpu", tree=(2, 3, 6))
    t = result["total"]
    assert t["identical"] and t["k"] == 3 and len(t["acceptance_per_position"]) == 3
    assert t["tree"] == {"topk": 2, "depth": 3, "num_draft_tokens": 6}
    assert "tree topk 2 depth 3 N 6" in table(result)


def test_cli_wants_all_three_tree_flags(tmp_path, capsys):
    from traineagle3.evaluate import main

    with pytest.raises(SystemExit):
        main(["--target", "x", "--draft", "y", "--prompts", "z", "--topk", "2", "--depth", "3"])
    assert "needs all of --topk, --depth and --num-draft-tokens" in capsys.readouterr().err
