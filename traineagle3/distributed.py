"""The ranks of a training run: joining the launcher's process group, and work that a node's
first rank does for the others (caches on a shared file system)."""

from __future__ import annotations

import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .cli import UserError
from .ports import free_port


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group; a plain `python main.py` is a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    if get_accelerator().device_name() == "cpu" and os.environ.get("WORLD_SIZE") == "1":
        # One CPU rank has no peer to all-reduce with, yet DeepSpeed would JIT-compile its
        # shared-memory all-reduce op for it, which is slow on a fresh machine (docs/RESULTS.md).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    return (
        dist.get_rank(),
        dist.get_world_size(),
        torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu"),
    )


def local_rank0_first(fn):
    """Build a cache on each node's first rank, then let the node's other ranks read it.

    A user's mistake that a first rank finds ends every rank with its one line (exit status
    2), not the others with a traceback from a barrier whose peer is gone."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    error = None
    if first:
        try:
            out = fn()
        except UserError as e:
            error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # also the barrier before the other ranks read
    if error := next(filter(None, errors), None):
        raise UserError(error)
    if not first:
        out = fn()
    return out
