"""Metrics: one JSON object per line (what log_plot.py and the model card read), written by rank 0 only."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .acceptance import round_stats
from .tracking import scalars


class StepStats:
    """Token-weighted sums of per-step loss/accuracy, reduced across ranks on read."""

    def __init__(self, steps: int):
        self.loss = torch.zeros(steps, dtype=torch.float64)
        self.correct = torch.zeros(steps, dtype=torch.float64)
        self.count = torch.zeros(steps, dtype=torch.float64)
        self.accepted = torch.zeros(steps, dtype=torch.float64)
        self.scored = torch.zeros(1, dtype=torch.float64)
        self.rounds = torch.zeros(steps + 1, dtype=torch.float64)  # decoding rounds by tokens accepted
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, result, tokens: int, rounds: torch.Tensor | None = None) -> None:
        """Sum one batch in; `rounds`: its answers' greedy decoding replayed (acceptance.decode_rounds)."""
        count = torch.stack(result.count).double().cpu()
        self.loss += torch.stack(result.step_loss).double().cpu() * count  # token-weighted
        self.correct += torch.stack(result.correct).double().cpu()
        self.count += count
        self.accepted += torch.stack(result.accepted).double().cpu()
        self.scored += result.scored.double().cpu()
        self.tokens += tokens
        if rounds is not None:
            self.rounds += rounds

    def summary(self, device="cpu") -> dict:
        import torch.distributed as dist

        t = torch.cat(
            [
                self.loss,
                self.correct,
                self.count,
                self.accepted,
                self.scored,
                self.rounds,
                torch.tensor([self.tokens], dtype=torch.float64),
            ]
        )
        if dist.is_initialized():
            t = t.to(device)
            dist.all_reduce(t)  # sums over ranks
            t = t.cpu()
        n = len(self.loss)
        loss, correct, count, accepted = t[:n], t[n : 2 * n], t[2 * n : 3 * n], t[3 * n : 4 * n]
        scored, rounds, tokens = t[4 * n].clamp(min=1), t[4 * n + 1 : 5 * n + 2], t[5 * n + 2].item()
        elapsed = time.perf_counter() - self.started
        decoded = {}
        if rounds.sum() > 0:  # answers replayed as greedy decoding: the served tau and rates at k = steps
            replayed, tau, rates = round_stats(rounds)
            decoded = {"rounds": replayed, "tau": round(tau, 5), "round_acceptance": [round(x, 5) for x in rates]}
        return {
            "loss": [round(x, 5) for x in (loss / count.clamp(min=1)).tolist()],
            "acc": [round(x, 5) for x in (correct / count.clamp(min=1)).tolist()],
            # chained, averaged over every position (decoding visits fewer of the easy ones: see ttt.py)
            "acceptance": [round(x, 5) for x in (accepted / scored).tolist()],
            "in_draft_vocab": round((count[0] / scored).item(), 5),  # of the target's step-0 tokens
            "tokens": int(tokens),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            **decoded,
        }


def peak_memory(device: torch.device) -> dict:
    """Peak memory so far: this process's resident set (GiB), and the accelerator's allocations on one."""
    import resource

    from deepspeed.accelerator import get_accelerator

    mem = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}  # KiB on Linux
    if device.type != "cpu":
        mem["peak_mem_gib"] = round(get_accelerator().max_memory_allocated() / 2**30, 2)
    return mem


class MetricsLog:
    """metrics.jsonl, each record stamped with its UTC time, and mirrored to a tracker if one is given."""

    def __init__(self, path: str | Path, enabled: bool, tracker=None):
        self.path, self.enabled, self.tracker = Path(path), enabled, tracker
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.enabled:
            record["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker:
                self.tracker.log(record["step"], scalars(record))

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()
