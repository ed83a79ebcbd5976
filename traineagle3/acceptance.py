"""Acceptance as decoding sees it: rounds, tau and the acceptance rate per draft position.

TTT's `accepted` (ttt.py) averages over every position, but decoding does not visit
every position: a round that accepts a tokens jumps a+1 ahead, so easy stretches take
few rounds and hard ones one round per token, and tau = tokens / rounds sits below
1 + sum(accepted/scored).  `decode_rounds` replays greedy decoding of each answer from
TTT's `run` (how many steps in a row are right from each position), which is exactly
what an engine drafts on text the target itself generated greedily: its tau is the
served one.  `round_stats` reads rounds, tau and the rates per position from a histogram
of drafts accepted per round, replayed here or counted by the offline evaluator.
"""

from __future__ import annotations

import torch


def replay_rounds(run: list[int], answer: list[bool], k: int) -> list[int]:
    """Tokens accepted in each round of greedy decoding one sample's answers, from TTT's `run`.

    The target's prefill makes an answer's first token p, so the first round drafts from
    position t = p - 1; a round accepting a tokens is followed by one from t + a + 1 (the
    target's own token ends it), while the round still drafts an answer token (t + 2
    inside the answer).
    """
    rounds, t, L = [], 0, len(answer)
    while t < L:
        if not answer[t]:
            t += 1
            continue
        end = t
        while end < L and answer[end]:
            end += 1  # this answer is [t, end)
        pos = t - 1
        while 0 <= pos and pos + 2 < end:
            rounds.append(min(run[pos], k))
            pos += rounds[-1] + 1
        t = end
    return rounds


def decode_rounds(run: torch.Tensor, answers: torch.Tensor, k: int) -> torch.Tensor:
    """Histogram [k+1] of tokens accepted per round over a batch; answers [B, L] marks answer tokens."""
    hist = torch.zeros(k + 1, dtype=torch.float64)
    for row_run, row in zip(run.tolist(), (answers > 0).tolist()):
        for a in replay_rounds(row_run, row, k):
            hist[a] += 1
    return hist


def round_stats(hist: torch.Tensor) -> tuple[int, float, list[float]]:
    """Rounds, tau (mean tokens per round, the bonus one included) and P(more than i drafts
    accepted) for each draft position i, from a histogram [k+1] of drafts accepted per round."""
    rounds = int(hist.sum().item())
    r = hist.double() / max(rounds, 1)
    tau = (r * torch.arange(1, len(hist) + 1)).sum().item()
    return rounds, tau, [r[i + 1 :].sum().item() for i in range(len(hist) - 1)]


def summarize(accepted: list[int], k: int) -> dict:
    """Drafts accepted in each round -> rounds, tau and acceptance per draft position."""
    rounds, tau, rates = round_stats(torch.bincount(torch.tensor(accepted, dtype=torch.long), minlength=k + 1))
    return {"rounds": rounds, "tau": round(tau, 4), "acceptance_per_position": [round(x, 4) for x in rates]}
