"""TTT attention in O(L) memory: a fused causal kernel for step 0, the rest merged by log-sum-exp.

`ttt.ttt_attention` (the reference) builds each step's B x heads x L x (L+k) score
matrix and keeps its fp32 softmax for backward.  Here the step-0 keys go through a
fused causal attention kernel (flash attention on CUDA and on the CPU) that returns its
output o0 and log-sum-exp lse0 and keeps neither scores nor probabilities; the keys of
steps 1..k add one score per query, s_i = q . k_i (same position), merged in fp32:

    M   = logsumexp(lse0, s_1, .., s_k)
    out = exp(lse0 - M) o0 + sum_i exp(s_i - M) v_i

Backward needs no gradient through lse0.  The joint softmax restricted to the step-0
keys is exp(q.k0_j - M), so the kernel's own backward, called with the merged output
and M in place of its o0 and lse0, returns exactly the step-0 share of dq and all of
dk0, dv0: the rowsum(dO * O) it subtracts is then the merged one, as the joint softmax
requires.  The diagonal terms' gradients are per-position products.  Saved per step:
q, the output and M, besides the keys and values the steps share.
"""

from __future__ import annotations

import torch

BLOCK = 256  # query rows per block of the portable kernel


def pick_kernel(q: torch.Tensor) -> str:
    """The fused kernel for q's device and dtype; 'blocked' (portable) otherwise."""
    if q.device.type == "cpu":
        return "cpu-flash"
    if (
        q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
    ):
        return "cuda-flash"
    return "blocked"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, heads, ...] -> [B, kv_heads, rep, ...]: GQA without repeating keys/values."""
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads))


# ---- step 0: causal attention over the step-0 keys, with its log-sum-exp ----------------


def causal_forward(kernel: str, q, k, v, scale: float):
    """(out, lse, state for backward); k/v may have fewer heads than q (GQA)."""
    if kernel == "cpu-flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse, ()
    if kernel == "cuda-flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    if kernel == "blocked":
        return (*_blocked_forward(q, k, v, scale), ())
    raise ValueError(f"unknown attention kernel {kernel!r}")


def causal_backward(kernel: str, grad_out, q, k, v, out, lse, state, scale: float):
    """(dq, dk, dv) of the kernel's attention, for the given softmax normaliser `lse`."""
    if kernel == "cpu-flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, True, scale=scale
        )
    if kernel == "cuda-flash":
        cum_q, cum_k, max_q, max_k, seed, offset = state
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
        )
    return _blocked_backward(grad_out, q, k, v, out, lse, scale)


def _block_scores(qg, k, a: int, b: int, scale: float, ct):
    """Scores of query rows a..b-1 against keys 0..b-1, causal: [B, kv, rep, b-a, b]."""
    s = torch.einsum("bgrqd,bgkd->bgrqk", qg[:, :, :, a:b].to(ct), k[:, :, :b].to(ct)) * scale
    future = torch.arange(b, device=s.device)[None, :] > torch.arange(a, b, device=s.device)[:, None]
    return s.masked_fill(future, float("-inf"))


def _blocked_forward(q, k, v, scale: float):
    """Portable causal attention, BLOCK query rows at a time: O(BLOCK x L) scratch memory."""
    ct, L = _compute_dtype(q.dtype), q.shape[2]
    qg = _grouped(q, k.shape[1])
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=ct)
    og, lg = _grouped(out, k.shape[1]), _grouped(lse, k.shape[1])
    for a in range(0, L, BLOCK):
        b = min(a + BLOCK, L)
        s = _block_scores(qg, k, a, b, scale, ct)
        lg[..., a:b] = s.logsumexp(-1)
        og[:, :, :, a:b] = torch.einsum("bgrqk,bgkd->bgrqd", (s - lg[..., a:b, None]).exp(), v[:, :, :b].to(ct))
    return out, lse


def _blocked_backward(grad_out, q, k, v, out, lse, scale: float):
    ct, L = _compute_dtype(q.dtype), q.shape[2]
    qg, dog = _grouped(q, k.shape[1]), _grouped(grad_out.to(ct), k.shape[1])
    rowdot = _grouped((grad_out.to(ct) * out.to(ct)).sum(-1), k.shape[1])
    lg = _grouped(lse.to(ct), k.shape[1])
    dq = torch.empty_like(q)
    dk, dv = torch.zeros(k.shape, dtype=ct, device=k.device), torch.zeros(v.shape, dtype=ct, device=v.device)
    dqg = _grouped(dq, k.shape[1])
    for a in range(0, L, BLOCK):
        b = min(a + BLOCK, L)
        p = (_block_scores(qg, k, a, b, scale, ct) - lg[..., a:b, None]).exp()
        do = dog[:, :, :, a:b]
        dv[:, :, :b] += torch.einsum("bgrqk,bgrqd->bgkd", p, do)
        ds = p * (torch.einsum("bgrqd,bgkd->bgrqk", do, v[:, :, :b].to(ct)) - rowdot[..., a:b, None]) * scale
        dqg[:, :, :, a:b] = torch.einsum("bgrqk,bgkd->bgrqd", ds, k[:, :, :b].to(ct))
        dk[:, :, :b] += torch.einsum("bgrqk,bgrqd->bgkd", ds, qg[:, :, :, a:b].to(ct))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ---- steps 1..k: one score per query, merged with step 0 by log-sum-exp ------------------


def _diagonal_score(q, key, scale: float, ct) -> torch.Tensor:
    """s[b, h, t] = q[b, h, t] . key[b, kv(h), t] * scale, in fp32 (or wider)."""
    return (_grouped(q.to(ct), key.shape[1]) * key.to(ct)[:, :, None]).sum(-1).flatten(1, 2) * scale


class _MergedTTTAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: str, scale: float, n_steps: int, q, *kv):
        keys, values = kv[:n_steps], kv[n_steps:]
        o0, lse0, state = causal_forward(kernel, q, keys[0], values[0], scale)
        out, lse = o0, lse0
        if n_steps > 1:
            ct, kvh = _compute_dtype(q.dtype), keys[0].shape[1]
            scores = [_diagonal_score(q, key, scale, ct) for key in keys[1:]]
            merged = torch.logsumexp(torch.stack([lse0.to(ct), *scores]), 0)
            acc = (lse0 - merged).exp()[..., None] * o0.to(ct)
            for s, v in zip(scores, values[1:]):
                _grouped(acc, kvh).add_(_grouped((s - merged).exp()[..., None], kvh) * v.to(ct)[:, :, None])
            # the kernel's own layouts: a flash output is [B, L, heads, d] in memory, so the
            # o_proj reshape stays a view, and its backward reads lse in its own strides
            out = torch.empty_like(o0).copy_(acc)
            lse = torch.empty_like(lse0).copy_(merged)
        ctx.is_tensor = [t is None or isinstance(t, torch.Tensor) for t in state]
        ctx.state = [None if is_t else t for t, is_t in zip(state, ctx.is_tensor)]
        ctx.kernel, ctx.scale, ctx.n_steps = kernel, scale, n_steps
        ctx.save_for_backward(q, out, lse, *kv, *[t for t, is_t in zip(state, ctx.is_tensor) if is_t])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *rest = ctx.saved_tensors
        n = ctx.n_steps
        keys, values, tensors = rest[:n], rest[n : 2 * n], iter(rest[2 * n :])
        state = [next(tensors) if is_t else s for s, is_t in zip(ctx.state, ctx.is_tensor)]
        dq, dk0, dv0 = causal_backward(ctx.kernel, grad_out, q, keys[0], values[0], out, lse, state, ctx.scale)
        dkeys, dvalues = [dk0], [dv0]
        if n > 1:
            ct, kvh = _compute_dtype(q.dtype), keys[0].shape[1]
            do, merged = grad_out.to(ct), lse.to(ct)
            rowdot = (do * out.to(ct)).sum(-1)
            dq = dq.to(ct)
            for key, v in zip(keys[1:], values[1:]):
                p = (_diagonal_score(q, key, ctx.scale, ct) - merged).exp()
                dp = (_grouped(do, kvh) * v.to(ct)[:, :, None]).sum(-1).flatten(1, 2)
                ds = (p * (dp - rowdot) * ctx.scale)[..., None]
                _grouped(dq, kvh).add_(_grouped(ds, kvh) * key.to(ct)[:, :, None])
                dkeys.append(_grouped(ds * q.to(ct), kvh).sum(2).to(key.dtype))
                dvalues.append(_grouped(p[..., None] * do, kvh).sum(2).to(v.dtype))
            dq = dq.to(q.dtype)
        return None, None, None, dq, *dkeys, *dvalues


def merged_ttt_attention(q, keys, values, scale: float, kernel: str | None = None) -> torch.Tensor:
    """Same contract and result as `ttt.ttt_attention`, without the L x L matrices."""
    kernel = kernel or pick_kernel(q)
    return _MergedTTTAttention.apply(kernel, scale, len(keys), q, *keys, *values)
