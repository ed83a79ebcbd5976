"""The TTT loss of one step: the draft q = softmax(logits) against the target, over the draft vocabulary.

    soft:  -sum_v p_v log q_v  with p = softmax(teacher)     hard:  -log q[argmax teacher]
    lk_nla:     -log alpha,  alpha = sum_v min(p_v, q_v) = 1 - TV(p, q)
    lk_hybrid:  lam KL(p || q) + (1 - lam) TV(p, q),  lam = exp(-LK_ETA alpha), alpha not differentiated

summed over positions with per-position weights (valid / count).  alpha is the probability
that a sampled draft token is accepted: the LK losses (Samarin et al. 2026, arXiv 2602.23881)
train it directly, where cross-entropy is a proxy that a small draft cannot drive to zero.
-log alpha scales TV's gradient by 1/alpha, which TV alone lacks while the draft is far off;
the hybrid leans on KL until alpha grows.  `plain_teacher_ce`
says it in autograd ops and keeps two fp32 B x L x V tensors per TTT step for backward
(at a 32k draft vocabulary and 2k tokens as much as the reference attention's L x L
matrix).  `teacher_ce` computes the same a block of positions at a time and keeps only
the logits as they come (bf16 in training): the gradient, softmax(logits) - teacher
distribution, is recomputed from them in backward, block by block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ELEMENTS = 1 << 22  # positions x vocabulary per block of fp32 scratch (16 MiB)
LOSS_TYPES = ("soft", "hard", "lk_nla", "lk_hybrid")
LK_ETA = 3.0  # the hybrid's blend: KL's weight is exp(-3 alpha), 0.05 once alpha reaches 1
TINY = 1e-6  # alpha's floor in -log alpha: a position the draft misses entirely has a finite loss


def _target(teacher: torch.Tensor, loss_type: str, ct: torch.dtype) -> torch.Tensor:
    """The distribution the draft is trained towards, in the compute dtype."""
    if loss_type == "hard":
        return F.one_hot(teacher.argmax(-1), teacher.shape[-1]).to(ct)
    if loss_type in LOSS_TYPES:
        return teacher.to(ct).softmax(-1)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")


def _lk(logq, p, loss_type: str):
    """Per-position LK loss and its gradient with respect to the logits, from log q and p."""
    q = logq.exp()
    alpha = torch.minimum(p, q).sum(-1)
    below = (q < p).to(q.dtype)  # where raising q_v raises alpha
    d_tv = -q * (below - (q * below).sum(-1, keepdim=True))  # d TV / d logits
    if loss_type == "lk_nla":
        floor = alpha.clamp(min=TINY)
        return -floor.log(), d_tv / floor[:, None]
    lam = torch.exp(-LK_ETA * alpha)[:, None]
    kl = (torch.xlogy(p, p) - p * logq).sum(-1)
    return lam[:, 0] * kl + (1 - lam[:, 0]) * (1 - alpha), lam * (q - p) + (1 - lam) * d_tv


def plain_teacher_ce(logits, teacher, weight, loss_type: str) -> torch.Tensor:
    """The reference formulation: sum over [B, T] of weight * loss, through autograd."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if loss_type == "hard":
        loss = -logp.gather(-1, teacher.argmax(-1, keepdim=True)).squeeze(-1)
    elif loss_type.startswith("lk_"):
        p = _target(teacher, loss_type, torch.float32)
        alpha = torch.minimum(p, logp.exp()).sum(-1)
        if loss_type == "lk_nla":
            loss = -alpha.clamp(min=TINY).log()
        else:
            lam = torch.exp(-LK_ETA * alpha.detach())
            loss = lam * (torch.xlogy(p, p) - p * logp).sum(-1) + (1 - lam) * (1 - alpha)
    else:
        loss = -(_target(teacher, loss_type, torch.float32) * logp).sum(-1)
    return (loss * weight).sum()


def _blocks(logits: torch.Tensor):
    """(b, slice of positions) covering [B, T, V] in blocks of about BLOCK_ELEMENTS."""
    rows = max(1, BLOCK_ELEMENTS // max(logits.shape[-1], 1))
    for b in range(logits.shape[0]):
        for a in range(0, logits.shape[1], rows):
            yield b, slice(a, a + rows)


class _TeacherCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher, weight, loss_type: str):
        ct = torch.promote_types(logits.dtype, torch.float32)
        total = torch.zeros((), dtype=ct, device=logits.device)
        for b, t in _blocks(logits):
            logq = F.log_softmax(logits[b, t].to(ct), dim=-1)
            p = _target(teacher[b, t], loss_type, ct)
            loss = _lk(logq, p, loss_type)[0] if loss_type.startswith("lk_") else -(p * logq).sum(-1)
            total += (loss * weight[b, t]).sum()
        ctx.loss_type = loss_type
        ctx.save_for_backward(logits, teacher, weight)
        return total

    @staticmethod
    def backward(ctx, grad):
        logits, teacher, weight = ctx.saved_tensors
        ct = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty_like(logits)
        for b, t in _blocks(logits):
            logq = F.log_softmax(logits[b, t].to(ct), dim=-1)
            p = _target(teacher[b, t], ctx.loss_type, ct)
            d = _lk(logq, p, ctx.loss_type)[1] if ctx.loss_type.startswith("lk_") else logq.exp() - p
            out[b, t] = d * (weight[b, t] * grad)[:, None]
        return out, None, None, None


def teacher_ce(logits, teacher, weight, loss_type: str) -> torch.Tensor:
    """Same value and gradient as `plain_teacher_ce`; saves only `logits` (no fp32 copies)."""
    return _TeacherCE.apply(logits, teacher, weight, loss_type)
