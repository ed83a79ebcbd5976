import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from traineagle3.draft import OPTIONS, Eagle3Draft, KVCache
from traineagle3.features import TargetFeatures
from traineagle3.ttt import ttt_attention
from traineagle3.vocab import VocabMap


def slow_reference_attention(q, keys, values, scale):
    """Query t of step k attends to step-0 keys 0..t and to key t of steps 1..k: one loop per query."""
    B, H, L, d = q.shape
    rep = H // keys[0].shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            g = h // rep
            for t in range(L):
                ks = [keys[0][b, g, j] for j in range(t + 1)] + [k[b, g, t] for k in keys[1:]]
                vs = [values[0][b, g, j] for j in range(t + 1)] + [v[b, g, t] for v in values[1:]]
                w = torch.softmax(torch.stack([q[b, h, t] @ k for k in ks]) * scale, 0)
                out[b, h, t] = sum(wi * vi for wi, vi in zip(w, vs))
    return out


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ttt_attention_matches_slow_reference(steps):
    torch.manual_seed(steps)
    B, H, KV, L, d = 2, 4, 2, 7, 8
    q = torch.randn(B, H, L, d, dtype=torch.float64)
    keys = [torch.randn(B, KV, L, d, dtype=torch.float64) for _ in range(steps)]
    values = [torch.randn(B, KV, L, d, dtype=torch.float64) for _ in range(steps)]
    got = ttt_attention(q, keys, values, 1 / math.sqrt(d))
    torch.testing.assert_close(got, slow_reference_attention(q, keys, values, 1 / math.sqrt(d)), rtol=1e-9, atol=1e-9)


def tiny_draft(target, vocab, seed=0, options=None):
    torch.manual_seed(seed)
    return Eagle3Draft.from_target(
        target.config, vocab, [1, 2, 3], target.get_input_embeddings().weight.data, overrides=options
    )


def rms(x, weight, eps=1e-6):
    """RMSNorm as the engines compute it: in float32 whatever the input's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def serve_fc(draft, aux):
    """The target's features into the first hidden state as vLLM's combine_hidden_states does:
    norm_before_fc's one norm over the 3H concat, then fc_norm's one per H chunk, then fc."""
    cfg = draft.config
    if cfg.norm_before_fc:
        aux = rms(aux, draft.input_norm.weight)
    if cfg.fc_norm:
        aux = torch.cat([rms(x, n.weight) for n, x in zip(draft.fc_norm, aux.chunk(3, -1))], -1)
    return aux @ draft.fc.weight.T


def serve_step(draft, token, hidden, pos, K, V):
    """One decode step as an engine runs it: a single new token attending to its KV cache;
    norm_before_residual: the residual is the normalised hidden; norm_output: the next step
    gets the final norm's output."""
    layer, attn, cfg = draft.midlayer, draft.midlayer.self_attn, draft.config
    normed = rms(hidden, layer.hidden_norm.weight)
    x = torch.cat([rms(draft.embed_tokens(token), layer.input_layernorm.weight), normed], -1)
    q = attn.q_proj(x).view(1, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = draft._rope[0](hidden, torch.tensor([[pos]]))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    K.append(k)
    V.append(v)
    rep = attn.num_heads // attn.num_kv_heads
    Kc, Vc = torch.cat(K, 2).repeat_interleave(rep, 1), torch.cat(V, 2).repeat_interleave(rep, 1)
    a = torch.softmax(q @ Kc.transpose(-1, -2) / math.sqrt(attn.head_dim), -1) @ Vc
    residual = normed if cfg.norm_before_residual else hidden
    hidden = residual + attn.o_proj(a.transpose(1, 2).reshape(1, 1, -1))
    hidden = hidden + layer.mlp(rms(hidden, layer.post_attention_layernorm.weight))
    out = rms(hidden, draft.norm.weight)
    return draft.lm_head(out), out if cfg.norm_output else hidden


OPTION_SETS = [
    {},
    {"fc_norm": True},
    {"norm_before_fc": True},
    {"norm_output": True},
    {"norm_before_residual": True},
    {"fc_norm": True, "norm_output": True},
    {name: True for name in OPTIONS},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) or "eagle3")
def test_ttt_logits_equal_what_a_serving_engine_computes(tiny_target, options):
    """Every TTT step at index t equals chain drafting after verified position t (tokens forced),
    with each EAGLE-3.1 option and all together."""
    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float64)
    vm = VocabMap(torch.arange(0, 2000), target.config.vocab_size)
    draft = tiny_draft(target, vm, options=options).double()
    with torch.no_grad():  # norms away from one, so that a norm skipped or misplaced shows
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    L, steps = 12, 4
    ids = torch.randint(0, 2000, (1, L))
    f = TargetFeatures(target, [1, 2, 3], vm)(ids)
    captured = []
    draft.lm_head.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        draft(f.aux_hidden, ids, torch.ones_like(ids), f.teacher, f.teacher_ok, steps=steps)
        ttt_logits = captured[:steps]
        fused = serve_fc(draft, f.aux_hidden)
        torch.testing.assert_close(draft.fc(f.aux_hidden), fused, rtol=1e-9, atol=1e-9)
        for t in [0, 3, L - steps - 2]:
            K, V = [], []
            for j in range(t + 1):  # the verified prefix: step-0 entries at positions 0..t
                logits, hidden = serve_step(draft, ids[:, j + 1 : j + 2], fused[:, j : j + 1], j, K, V)
            # the evaluator's decode path: the whole prefix at once into a KV cache, then the chain
            kv = KVCache()
            dec_logits, dec_hidden = draft.step(ids[:, 1 : t + 2], fused[:, : t + 1], torch.arange(t + 1)[None], kv)
            dec_logits, dec_hidden = dec_logits[:, -1:], dec_hidden[:, -1:]
            for k in range(steps):
                torch.testing.assert_close(logits[0, 0], ttt_logits[k][0, t], rtol=1e-7, atol=1e-7)
                torch.testing.assert_close(dec_logits[0, 0], ttt_logits[k][0, t], rtol=1e-7, atol=1e-7)
                if k + 1 < steps:
                    token = ids[:, t + 2 + k : t + 3 + k]
                    logits, hidden = serve_step(draft, token, hidden, t + 1 + k, K, V)
                    dec_logits, dec_hidden = draft.step(token, dec_hidden, torch.tensor([[t + 1 + k]]), kv)


def test_loss_falls_when_overfitting_8_samples(tiny_target):
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    target.lm_head.weight.data *= 30  # a confident teacher, so there is something to fit
    ids = torch.randint(0, 500, (8, 32))
    mask = torch.ones_like(ids)
    vm = VocabMap(torch.arange(512), target.config.vocab_size)
    feats = TargetFeatures(target, [1, 2, 3], vm)(ids)
    draft = tiny_draft(target, vm)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(60):
        r = draft(feats.aux_hidden, ids, mask, feats.teacher, feats.teacher_ok, steps=3)
        opt.zero_grad()
        r.loss.backward()
        opt.step()
        history.append((r.loss.item(), (r.correct[0] / r.count[0]).item()))
    assert history[-1][0] < 0.3 * history[0][0]
    assert history[-1][1] > 0.9 > history[0][1]


def test_acceptance_counts_chains_of_right_steps_as_an_engine_accepts():
    """accepted[k] = positions t whose steps 0..k all match the target (step k at t predicts
    x[t+2+k]); correct[k] counts step k alone; `scored` counts a position whose target token is
    outside the draft vocabulary (a sure rejection when serving), `count` does not.  Checked
    against a plain loop."""
    from traineagle3.ttt import ttt_unroll

    torch.manual_seed(0)
    B, L, V, steps = 2, 12, 5, 3
    teacher_top = torch.randint(0, V, (B, L))
    guesses = [
        torch.where(torch.rand(B, L) < 0.6, teacher_top.roll(-1 - k, 1), (teacher_top.roll(-1 - k, 1) + 1) % V)
        for k in range(steps)
    ]  # step k at t is right where guesses[k][t] == teacher_top[t+1+k]
    loss_mask = (torch.rand(B, L) < 0.8).long()
    teacher_ok = torch.rand(B, L) < 0.9

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.k = 0

        def fc(self, aux):
            return aux

        def step(self, ids, hidden, positions, cache):
            logits = torch.nn.functional.one_hot(guesses[self.k], V).float() + self.w
            self.k += 1
            return logits, hidden

    r = ttt_unroll(
        Scripted(),
        torch.zeros(B, L, 4),
        torch.zeros(B, L, dtype=torch.long),
        loss_mask,
        torch.nn.functional.one_hot(teacher_top, V).float(),
        teacher_ok,
        steps=steps,
        loss_type="hard",
    )

    def right(b, t, k):
        return (
            t + 2 + k < L
            and loss_mask[b, t + 2 + k] > 0
            and bool(teacher_ok[b, t + 1 + k])
            and guesses[k][b, t] == teacher_top[b, t + 1 + k]
        )

    scored = [(b, t) for b in range(B) for t in range(L - 2) if loss_mask[b, t + 2] > 0]  # in the vocabulary or not
    for k in range(steps):
        assert int(r.correct[k]) == sum(right(b, t, k) for b in range(B) for t in range(L - 2))
        assert int(r.accepted[k]) == sum(all(right(b, t, j) for j in range(k + 1)) for b, t in scored)
    assert int(r.count[0]) == sum(bool(teacher_ok[b, t + 1]) for b, t in scored) < int(r.scored) == len(scored)
    assert 0 < int(r.accepted[-1]) < int(r.accepted[0]) < int(r.correct[0]) + 1


def test_replay_rounds_jumps_past_accepted_tokens_within_each_answer():
    """Two answers [3, 9) and [11, 14): rounds from 2, 2+run+1, ... while the round drafts
    an answer token; positions outside the answers are never a round's start."""
    from traineagle3.acceptance import replay_rounds

    run = [3, 3, 1, 3, 0, 2, 0, 0, 3, 3, 1, 3, 3, 0]
    answer = [i in range(3, 9) or i in range(11, 14) for i in range(16)]
    # answer 1: t=2 (run 1) -> t=4 (0) -> t=5 (2) -> t=8: 8+2 >= 9, stop.  answer 2: t=10 (1) -> t=12: stop
    assert replay_rounds(run, answer, 3) == [1, 0, 2, 1]
    assert replay_rounds(run, answer, 1) == [1, 0, 1, 1]  # capped at k: t=2, 4, 5; t=10


def test_round_stats_and_the_offline_evaluator_count_rounds_alike():
    """Rounds accepting 0, 0, 1, 3 drafts (k = 3): tau 2 = 8 tokens / 4 rounds; P(> i accepted)."""
    from traineagle3.acceptance import round_stats, summarize

    rounds, tau, rates = round_stats(torch.tensor([2.0, 1.0, 0.0, 1.0]))
    assert (rounds, tau) == (4, 2.0) and rates == [0.5, 0.25, 0.25]
    assert summarize([0, 3, 1, 0], 3) == {"rounds": 4, "tau": 2.0, "acceptance_per_position": [0.5, 0.25, 0.25]}
    assert summarize([], 2) == {"rounds": 0, "tau": 0.0, "acceptance_per_position": [0.0, 0.0]}
