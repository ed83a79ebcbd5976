"""Checkpoints that survive a SIGKILL at any moment.

`output_dir/checkpoints/step_XXXXXXXX/` holds
  deepspeed/            the engine state (weights, optimizer, scheduler), every rank
  draft/                a serving-ready folder: config.json + model.safetensors
  trainer_state.json    written last, atomically, by rank 0 after all ranks finished
A checkpoint without trainer_state.json is incomplete and is ignored on resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import write_json_atomic

STATE_FILE = "trainer_state.json"


def save_draft_folder(state_dict: dict[str, torch.Tensor], config, out: Path) -> None:
    """config.json + model.safetensors, as vLLM/SGLang load an EAGLE-3 draft."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("embed_tokens.")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["torch_dtype"] = str(next(v for v in tensors.values() if v.is_floating_point()).dtype).removeprefix("torch.")
    write_json_atomic(out / "config.json", cfg)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    return sorted(root.glob("step_*")) if root.exists() else []


def latest_complete(output_dir: str | Path) -> Path | None:
    complete = [d for d in checkpoint_dirs(output_dir) if (d / STATE_FILE).exists()]
    return complete[-1] if complete else None


def save(engine, config, output_dir: str | Path, state: dict, keep: int) -> Path:
    """Collective: every rank calls it.  `state` is the trainer's position in the data."""
    import torch.distributed as dist

    path = Path(output_dir) / "checkpoints" / f"step_{state['global_step']:08d}"
    rank = dist.get_rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a stale, incomplete attempt at this same step
    dist.barrier()
    engine.save_checkpoint(str(path), tag="deepspeed", exclude_frozen_parameters=True)
    if engine.zero_optimization_stage() == 3:
        weights = engine._zero3_consolidated_16bit_state_dict()
    else:
        weights = engine.module.state_dict()
    if rank == 0:
        save_draft_folder(weights, config, path / "draft")
    dist.barrier()
    if rank == 0:
        write_json_atomic(path / STATE_FILE, state)
        complete = [d for d in checkpoint_dirs(output_dir) if (d / STATE_FILE).exists()]
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(engine, path: Path) -> dict:
    # the frozen embedding is not saved: it is re-copied from the target at start-up
    engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False)
    return json.loads((path / STATE_FILE).read_text())
