"""The efficient TTT formulation (merged attention, block-wise loss) against the reference one.

Tolerances: fp64 1e-10; fp32 rtol 1e-4 / atol 1e-5 (the two sum in different orders);
bf16 is compared with an fp64 evaluation of the same bf16 inputs: every output and
gradient must be within 3x the error the reference formulation itself makes in bf16.
"""

import math

import pytest
import torch
from transformers import LlamaConfig

from traineagle3 import merged_attention, teacher_loss
from traineagle3.draft import Eagle3Draft
from traineagle3.merged_attention import merged_ttt_attention
from traineagle3.teacher_loss import LOSS_TYPES, plain_teacher_ce, teacher_ce
from traineagle3.ttt import ttt_attention, ttt_unroll
from traineagle3.vocab import VocabMap

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def attention_inputs(steps, L, heads, kv_heads, d=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as the model makes it: a [B, L, heads, d] projection viewed as [B, heads, L, d]
    q = torch.randn(B, L, heads, d, generator=g).transpose(1, 2)
    keys = [torch.randn(B, kv_heads, L, d, generator=g) for _ in range(steps)]
    values = [torch.randn(B, kv_heads, L, d, generator=g) for _ in range(steps)]
    return q, keys, values, torch.randn(B, heads, L, d, generator=g)


def attention_and_grads(fn, q, keys, values, grad_out, dtype, device, **kw):
    """Output and the gradients of q and of every step's keys and values, in float64."""
    leaves = [x.detach().to(device, dtype).requires_grad_() for x in [q, *keys, *values]]
    n = len(keys)
    out = fn(leaves[0], leaves[1 : 1 + n], leaves[1 + n :], 1 / math.sqrt(q.shape[-1]), **kw)
    out.backward(grad_out.to(device, dtype))
    return [out.double().cpu()] + [x.grad.double().cpu() for x in leaves]


def kernels(device):
    return ["cpu-flash", "blocked"] if device == "cpu" else [None, "blocked"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("L,heads,kv_heads", [(1, 4, 2), (7, 4, 4), (300, 4, 2), (513, 4, 1)])
def test_merged_attention_and_grads_equal_reference(device, dtype, steps, L, heads, kv_heads):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("no fused fp64 kernel on CUDA")
    inputs = attention_inputs(steps, L, heads, kv_heads)
    want = attention_and_grads(ttt_attention, *inputs, dtype, device)
    for kernel in kernels(device):
        got = attention_and_grads(merged_ttt_attention, *inputs, dtype, device, kernel=kernel)
        for name, g, w in zip(
            ["out", "q"] + [f"k{i}" for i in range(steps)] + [f"v{i}" for i in range(steps)], got, want
        ):
            torch.testing.assert_close(g, w, **TOL[dtype], msg=f"{kernel}: {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("L", [7, 300])
def test_bf16_merged_attention_is_as_accurate_as_reference(device, steps, L):
    q, keys, values, grad_out = attention_inputs(steps, L, 4, 2)
    q, grad_out, keys, values = (
        q.bfloat16().double(),
        grad_out.bfloat16().double(),
        [k.bfloat16().double() for k in keys],
        [v.bfloat16().double() for v in values],
    )
    exact = attention_and_grads(ttt_attention, q, keys, values, grad_out, torch.float64, "cpu")
    ref = attention_and_grads(ttt_attention, q, keys, values, grad_out, torch.bfloat16, device)
    for kernel in kernels(device):
        got = attention_and_grads(
            merged_ttt_attention, q, keys, values, grad_out, torch.bfloat16, device, kernel=kernel
        )
        for i, (g, r, e) in enumerate(zip(got, ref, exact)):
            ours, theirs = (g - e).abs().max().item(), (r - e).abs().max().item()
            assert ours <= 3 * theirs, f"{kernel} tensor {i}: error {ours:.4f} vs reference's {theirs:.4f}"


def test_merged_attention_keeps_no_L_by_L_tensor_for_backward():
    B, H, KV, L, d = 1, 4, 2, 256, 8
    q, keys, values, _ = attention_inputs(3, L, H, KV, d=d, B=B)
    leaves = [x.requires_grad_() for x in [q, *keys, *values]]
    for fn, biggest_allowed in [(merged_ttt_attention, B * H * L * d), (ttt_attention, None)]:
        sizes: list[int] = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(leaves[0], leaves[1:4], leaves[4:], 0.3)
        if biggest_allowed is None:  # the reference keeps the softmax over L x (L+k) scores
            assert max(sizes) >= B * H * L * L
        else:
            assert max(sizes) <= biggest_allowed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_blockwise_teacher_ce_equals_plain(device, dtype, loss_type, monkeypatch):
    monkeypatch.setattr(
        teacher_loss, "BLOCK_ELEMENTS", 3 * 50
    )  # blocks of 3 positions: 5 blocks per row, the last partial
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(2, 13, 50, generator=g)).to(device, dtype)
    teacher = (4 * torch.randn(2, 13, 50, generator=g)).to(device, dtype)
    weight = (torch.rand(2, 13, generator=g) > 0.3).float().to(device) / 9
    results = []
    for fn in (plain_teacher_ce, teacher_ce):
        x = logits.detach().requires_grad_()
        loss = fn(x, teacher, weight, loss_type)
        loss.backward()
        results.append((loss.float(), x.grad.float()))
    (want_loss, want_grad), (loss, grad) = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, **tol)
    assert (grad[weight == 0] == 0).all() and (grad[weight > 0] != 0).any()


def test_lk_losses_are_minus_log_acceptance_and_its_blend_with_kl():
    g = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(1, 5, 7, generator=g), 2 * torch.randn(1, 5, 7, generator=g)
    weight = torch.ones(1, 5)
    p, q = teacher.softmax(-1), logits.softmax(-1)
    alpha = torch.where(p < q, p, q).sum(-1)  # the chance that a token sampled from q is accepted
    kl = (p * (p / q).log()).sum(-1)
    lam = (-3 * alpha).exp()
    torch.testing.assert_close(teacher_ce(logits, teacher, weight, "lk_nla"), -alpha.log().sum())
    hybrid = (lam * kl + (1 - lam) * (1 - alpha)).sum()
    torch.testing.assert_close(teacher_ce(logits, teacher, weight, "lk_hybrid"), hybrid)
    for loss_type in ("lk_nla", "lk_hybrid"):  # a draft equal to the target: nothing left to gain
        assert abs(float(teacher_ce(teacher, teacher, weight, loss_type))) < 1e-5
    x = logits.clone().requires_grad_()  # a small step down the gradient raises every position's alpha
    teacher_ce(x, teacher, weight, "lk_nla").backward()
    stepped = (logits - 0.05 * x.grad).softmax(-1)
    assert (torch.minimum(p, stepped).sum(-1) > alpha).all()


def small_draft(seed=0):
    target = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return Eagle3Draft.from_target(target, VocabMap(torch.arange(120), target.vocab_size), [1, 2, 3])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_unroll_losses_and_grads_equal_with_either_formulation(loss_type):
    draft = small_draft()
    g = torch.Generator().manual_seed(2)
    B, L = 3, 40
    aux = torch.randn(B, L, 3 * 64, generator=g)
    ids = torch.randint(0, 300, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.2).long()
    teacher = 3 * torch.randn(B, L, 120, generator=g)
    ok = torch.rand(B, L, generator=g) > 0.1
    runs = {}
    for impl in ("reference", "efficient"):
        draft.zero_grad()
        r = ttt_unroll(draft, aux, ids, mask, teacher, ok, steps=4, loss_type=loss_type, impl=impl)
        r.loss.backward()
        runs[impl] = r, {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}
    (ref, ref_grads), (eff, eff_grads) = runs["reference"], runs["efficient"]
    torch.testing.assert_close(eff.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(eff.step_loss), torch.stack(ref.step_loss), rtol=1e-5, atol=1e-6)
    assert [int(x) for x in eff.correct] == [int(x) for x in ref.correct]
    assert [int(x) for x in eff.count] == [int(x) for x in ref.count] and int(ref.count[-1]) > 0
    for name, grad in ref_grads.items():
        torch.testing.assert_close(eff_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_formulation_or_kernel_is_refused():
    draft = small_draft()
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="impl"):
        ttt_unroll(draft, torch.zeros(1, 8, 192), ids, ids, torch.zeros(1, 8, 120), ids > 0, impl="fast")
    q, keys, values, _ = attention_inputs(1, 4, 4, 2)
    with pytest.raises(ValueError, match="kernel"):
        merged_ttt_attention(q, keys, values, 0.25, kernel="magic")


def test_kernel_choice():
    assert merged_attention.pick_kernel(torch.zeros(1, 1, 1, 8)) == "cpu-flash"
    assert merged_attention.pick_kernel(torch.zeros(1, 1, 1, 8, device="meta")) == "blocked"
