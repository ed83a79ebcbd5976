"""Train an EAGLE-3 draft for a frozen Llama-family target.

    cd traineagle3/llama && deepspeed main.py --deepspeed_config ds_config.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 main.py --deepspeed_config ds_config_cpu.json

Every rank holds the frozen target as a plain module; DeepSpeed (ZeRO) owns only the
draft.  With --feature_cache the ranks first run the target once over the data into an
offline cache (or find it complete), then train from it with only the target's token
embedding and output head in memory.  Flags override the fields of --config (see --help).
The pieces are in traineagle3/train.py; main() puts them together.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig

from traineagle3 import tracking
from traineagle3.atomic import cache_root
from traineagle3.cli import Parser, UserError, cli, read_json_object
from traineagle3.config import TrainConfig, add_arguments, from_args
from traineagle3.default_model import check_target, resolve_target
from traineagle3.distributed import init_distributed, local_rank0_first
from traineagle3.draft import load_overrides
from traineagle3.feature_source import Target
from traineagle3.records import source_path
from traineagle3.train import (
    Trainer,
    aux_layer_ids,
    build_draft,
    build_engine,
    build_vocab,
    check_draft_config,
    feature_source,
    fill_schedule,
    load_data,
    steps_per_epoch,
    target_dtype,
)

log = logging.getLogger("traineagle3")


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_arguments(parser)
    deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def read_ds_config(path: str | None) -> dict:
    """The user's DeepSpeed config; it must give the micro batch size, which sizes the data split."""
    if not path:
        raise UserError("--deepspeed_config is required (e.g. ds_config.json; see --help)")
    ds = read_json_object(path)
    micro = ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or micro < 1:
        raise UserError(f"{path}: train_micro_batch_size_per_gpu must be a whole number of at least 1, not {micro!r}")
    optimizer, clip = ds.get("optimizer", {}).get("type", ""), ds.get("gradient_clipping", 0)
    if str(optimizer).lower() == "muon" and clip:
        # DeepSpeed (0.19) computes the clipping norm after Newton-Schulz, over updates whose norm
        # is ~sqrt(width) per matrix: every step shrank ~100x and the draft hardly trained
        raise UserError(
            f"{path}: gradient_clipping {clip} with the Muon optimizer clips Muon's orthogonalized updates, "
            "not the gradients, and shrinks every step (docs/RESULTS.md); set gradient_clipping to 0"
        )
    return ds


@cli
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg: TrainConfig = from_args(args)
    tracking.require(cfg.report_to)
    # the user's files, checked before the process group, the data and the models
    ds = read_ds_config(args.deepspeed_config)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds.get("gradient_accumulation_steps", 1)
    check_target(cfg.target)
    for source in (cfg.train_data, cfg.test_data):
        if source:
            source_path(source)
    overrides = load_overrides(cfg.draft_config)
    rank, world, device = init_distributed()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    log.info("%d rank(s) on %s, %d CPU threads each (OMP_NUM_THREADS)", world, device, torch.get_num_threads())
    cache = Path(cfg.cache_dir or cache_root())

    # data, target, vocabulary; the draft's config checked before any target pass
    target_path = local_rank0_first(lambda: resolve_target(cfg.target))
    data = load_data(cfg, target_path, cache)
    epoch_steps = steps_per_epoch(cfg, data, micro, accum, world, args.deepspeed_config)
    target = Target(target_path, AutoConfig.from_pretrained(target_path), target_dtype(cfg, device), device)
    aux = aux_layer_ids(cfg, target)
    vocab = build_vocab(cfg, data, target, cache)
    check_draft_config(cfg, target, vocab, aux, overrides)

    # features (the target online, or its offline cache), draft, engine
    source = feature_source(cfg, target, aux, vocab, data, cache, micro, rank, world)
    draft = build_draft(cfg, target, vocab, aux, overrides, source)
    fill_schedule(ds, cfg.epochs * epoch_steps)
    # max_steps only stops early: the LR schedule stays that of the whole run, so a
    # run stopped by it and resumed without it trains exactly like one never stopped
    total_steps = min(cfg.epochs * epoch_steps, cfg.max_steps or 1 << 62)
    engine = build_engine(draft, ds, target.dtype)

    trainer = Trainer(
        cfg,
        engine,
        source,
        data,
        draft.config,
        ds,
        micro=micro,
        accum=accum,
        rank=rank,
        world=world,
        device=device,
        total_steps=total_steps,
    )
    trainer.fit()
    trainer.finish()


if __name__ == "__main__":
    main()
