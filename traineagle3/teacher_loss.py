"""The TTT loss of one step: cross-entropy of the draft against the target, over the draft vocabulary.

    soft:  -sum_v softmax(teacher)_v * log_softmax(logits)_v      hard:  -log_softmax(logits)[argmax teacher]

summed over positions with per-position weights (valid / count).  `plain_teacher_ce`
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


def _target(teacher: torch.Tensor, loss_type: str, ct: torch.dtype) -> torch.Tensor:
    """The distribution the draft is trained towards, in the compute dtype."""
    if loss_type == "soft":
        return teacher.to(ct).softmax(-1)
    if loss_type == "hard":
        return F.one_hot(teacher.argmax(-1), teacher.shape[-1]).to(ct)
    raise ValueError(f"loss_type must be 'soft' or 'hard', not {loss_type!r}")


def plain_teacher_ce(logits, teacher, weight, loss_type: str) -> torch.Tensor:
    """The reference formulation: sum over [B, T] of weight * CE, through autograd."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if loss_type == "hard":
        ce = -logp.gather(-1, teacher.argmax(-1, keepdim=True)).squeeze(-1)
    else:
        ce = -(_target(teacher, loss_type, torch.float32) * logp).sum(-1)
    return (ce * weight).sum()


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
            logp = F.log_softmax(logits[b, t].to(ct), dim=-1)
            total += ((_target(teacher[b, t], loss_type, ct) * logp).sum(-1) * weight[b, t]).sum()
        ctx.loss_type = loss_type
        ctx.save_for_backward(logits, teacher, weight)
        return -total

    @staticmethod
    def backward(ctx, grad):
        logits, teacher, weight = ctx.saved_tensors
        ct = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty_like(logits)
        for b, t in _blocks(logits):
            diff = logits[b, t].to(ct).softmax(-1) - _target(teacher[b, t], ctx.loss_type, ct)
            out[b, t] = diff * (weight[b, t] * grad)[:, None]
        return out, None, None, None


def teacher_ce(logits, teacher, weight, loss_type: str) -> torch.Tensor:
    """Same value and gradient as `plain_teacher_ce`; saves only `logits` (no fp32 copies)."""
    return _TeacherCE.apply(logits, teacher, weight, loss_type)
