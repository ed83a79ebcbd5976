"""Training-time test (TTT): unroll the draft on its own outputs, as it runs when serving.

Index t of step k stands for the draft's k-th guess after target position t:
  input token   x[t+1+k]         (step 0: the token the target just produced)
  input hidden  step 0: fc(fused target features at t); step k: the draft's step k-1 output at t
  position id   t + k            (the slot the engines give that guess: RoPE matches serving)
  target        the target's distribution at t+1+k, i.e. for token x[t+2+k]
  attends to    step-0 keys at positions <= t (the verified prefix) and its own keys
                from steps 1..k (the chain of guesses before it)
Only predictions of trainable tokens (loss_mask[t+2+k]) whose target top-1 lies in the
draft vocabulary count; the loss of step k is weighted by decay**k.

Two accuracies come out.  `correct[k]/count[k]` asks whether step k is right given the
true tokens before it (teacher forcing), among the tokens the draft vocabulary holds;
`accepted[k]/scored` asks whether steps 0..k are all right, among all trainable
positions.  A target token outside the draft vocabulary is a rejection when serving, so
it counts as one here (how many such tokens there are: docs/RESULTS.md).

`accepted` averages over every position, which decoding does not visit alike; `run` (how
many steps in a row are right from each position) lets acceptance.py replay greedy
decoding of the answers, whose tau is the served one.

Two formulations give the same losses and gradients: "reference" (`ttt_attention` and
`plain_teacher_ce`, plain autograd ops that materialise each step's L x (L+k) attention
and fp32 vocabulary-sized tensors) and "efficient" (`merged_ttt_attention` and
`teacher_ce`, which keep O(L) attention state and only the logits per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .merged_attention import merged_ttt_attention
from .teacher_loss import LOSS_TYPES, plain_teacher_ce, teacher_ce

IMPLS = ("efficient", "reference")


def repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """GQA: each of the kv heads serves `rep` consecutive query heads."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def ttt_attention(q, keys, values, scale: float) -> torch.Tensor:
    """q: [B, heads, L, d]; keys/values: one [B, kv_heads, L, d] per step so far (0..k).

    Step-0 keys are attended causally; the keys of steps 1..k only on the diagonal
    (query t sees key t of each later step).  Softmax over all of them together.
    """
    B, H, L, _ = q.shape
    rep = H // keys[0].shape[1]
    scores = [(q @ repeat_kv(keys[0], rep).transpose(-1, -2)) * scale]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores[0] = scores[0].masked_fill(~causal, float("-inf"))
    scores += [(q * repeat_kv(k, rep)).sum(-1, keepdim=True) * scale for k in keys[1:]]
    probs = torch.cat(scores, dim=-1).softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = probs[..., :L] @ repeat_kv(values[0], rep)
    for i, v in enumerate(values[1:]):
        out = out + probs[..., L + i : L + i + 1] * repeat_kv(v, rep)
    return out


class TTTCache:
    """Keys/values of the TTT steps so far; attention per `ttt_attention`, by either formulation."""

    def __init__(self, impl: str = "efficient"):
        self.keys, self.values = [], []
        self.attention = merged_ttt_attention if impl == "efficient" else ttt_attention

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        self.keys.append(k)
        self.values.append(v)
        return self.attention(q, self.keys, self.values, scale)


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, n:] padded with zeros back to length L (dim 1)."""
    if n == 0:
        return x
    pad = torch.zeros_like(x[:, :n])
    return torch.cat([x[:, n:], pad], dim=1)


@dataclass
class TTTResult:
    loss: torch.Tensor  # weighted sum over steps, the one to backpropagate
    step_loss: list[torch.Tensor]  # per step, mean over valid tokens (detached)
    correct: list[torch.Tensor]  # per step, number of valid tokens with draft top-1 == target top-1
    count: list[torch.Tensor]  # per step, number of valid tokens
    accepted: list[torch.Tensor]  # per step k, number of positions whose steps 0..k are all right
    scored: torch.Tensor  # positions with a trainable step-0 target token, in the draft vocabulary or not
    run: torch.Tensor  # [B, L-2]: from position t, how many steps in a row are right (0..steps)


def ttt_unroll(
    draft,
    aux_hidden,
    input_ids,
    loss_mask,
    teacher,
    teacher_ok,
    *,
    steps: int = 7,
    decay: float = 0.8,
    loss_type: str = "soft",
    impl: str = "efficient",
) -> TTTResult:
    """Run `steps` TTT steps of `draft` and return the losses and accuracies.

    aux_hidden [B, L, 3H] fused-layer features; teacher [B, L, V_draft] target logits
    over the draft vocabulary; teacher_ok [B, L] whether the target's top-1 is in it.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
    ce = teacher_ce if impl == "efficient" else plain_teacher_ce
    B, L = input_ids.shape
    hidden = draft.fc(aux_hidden)
    positions = torch.arange(L, device=input_ids.device).expand(B, L)
    cache = TTTCache(impl)
    total, step_loss, correct, count, accepted = 0.0, [], [], [], []
    chain = None  # [B, L-2]: steps so far all right at position t (and t valid at step 0)
    run = torch.zeros(B, max(L - 2, 0), dtype=torch.long, device=input_ids.device)
    scored = (loss_mask[:, 2:] > 0).sum()
    for k in range(steps):
        logits, hidden = draft.step(shift_left(input_ids, 1 + k), hidden, positions + k, cache)
        m = max(L - 2 - k, 0)  # positions t whose target token x[t+2+k] exists
        logits, target = logits[:, :m], teacher[:, 1 + k : 1 + k + m]
        valid = (loss_mask[:, 2 + k :] > 0) & teacher_ok[:, 1 + k : 1 + k + m]
        n = valid.sum()
        loss_k = ce(logits, target, valid / n.clamp(min=1), loss_type)
        total = total + decay**k * loss_k
        step_loss.append(loss_k.detach())
        right = (logits.argmax(-1) == target.argmax(-1)) & valid
        chain = right if chain is None else chain[:, :m] & right
        correct.append(right.sum())
        count.append(n)
        accepted.append(chain.sum())
        run[:, :m] += chain
    return TTTResult(total, step_loss, correct, count, accepted, scored, run)
