"""Metrics: one JSON object per line (what log_plot.py reads), written by rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class StepStats:
    """Token-weighted sums of per-step loss/accuracy, reduced across ranks on read."""

    def __init__(self, steps: int):
        self.loss = torch.zeros(steps, dtype=torch.float64)
        self.correct = torch.zeros(steps, dtype=torch.float64)
        self.count = torch.zeros(steps, dtype=torch.float64)
        self.accepted = torch.zeros(steps, dtype=torch.float64)
        self.scored = torch.zeros(1, dtype=torch.float64)
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, result, tokens: int) -> None:
        count = torch.stack(result.count).double().cpu()
        self.loss += torch.stack(result.step_loss).double().cpu() * count  # token-weighted
        self.correct += torch.stack(result.correct).double().cpu()
        self.count += count
        self.accepted += torch.stack(result.accepted).double().cpu()
        self.scored += result.scored.double().cpu()
        self.tokens += tokens

    def summary(self, device="cpu") -> dict:
        import torch.distributed as dist

        t = torch.cat([self.loss, self.correct, self.count, self.accepted, self.scored,
                       torch.tensor([self.tokens], dtype=torch.float64)])
        if dist.is_initialized():
            t = t.to(device)
            dist.all_reduce(t)  # sums over ranks
            t = t.cpu()
        n = len(self.loss)
        loss, correct, count, accepted = t[:n], t[n:2 * n], t[2 * n:3 * n], t[3 * n:4 * n]
        scored, tokens = t[4 * n].clamp(min=1), t[4 * n + 1].item()
        elapsed = time.perf_counter() - self.started
        return {
            "loss": [round(x, 5) for x in (loss / count.clamp(min=1)).tolist()],
            "acc": [round(x, 5) for x in (correct / count.clamp(min=1)).tolist()],
            # chained, as an engine accepts: 1 + sum(acceptance) estimates tau with k = steps
            "acceptance": [round(x, 5) for x in (accepted / scored).tolist()],
            "in_draft_vocab": round((count[0] / scored).item(), 5),  # of the target's step-0 tokens
            "tokens": int(tokens),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        }


class MetricsLog:
    def __init__(self, path: str | Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
