"""Train an EAGLE-3 draft for a frozen Llama-family target.

    cd traineagle3/llama && deepspeed main.py --deepspeed_config ds_config.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 main.py --deepspeed_config ds_config_cpu.json

Every rank holds the frozen target as a plain module; DeepSpeed (ZeRO) owns only the
draft.  With --feature_cache the ranks first run the target once over the data into an
offline cache (or find it complete), then train from it with only the target's token
embedding and output head in memory.  Flags override the fields of --config (see --help).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from traineagle3 import checkpoint, precision, tracking
from traineagle3.cli import Parser, UserError, cli, read_json_object
from traineagle3.config import TrainConfig, add_arguments, from_args, to_dict
from traineagle3.data import DataConfig, collate, dataset_key, epoch_batches, load_tokenized, split_train_test
from traineagle3.cache import cache_root
from traineagle3.default_model import DEFAULT_TARGET, resolve_target
from traineagle3.draft import Eagle3Draft, default_aux_layers, derive_draft_config, load_overrides, to_vllm_layer_ids
from traineagle3.feature_cache import cache_folder, cache_parts, ensure_cache
from traineagle3.features import Features, TargetFeatures, add_feature_noise, draft_rows
from traineagle3.metrics import MetricsLog, StepStats, peak_memory
from traineagle3.net import free_port
from traineagle3.records import source_path
from traineagle3.target_tensors import embedding_and_head, final_norm
from traineagle3.vocab import build_vocab_map, load_or_build, vocab_key

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
    return ds


def check_target(name: str) -> None:
    """A target that names a folder must hold a model's config.json; any other name is a Hub model's."""
    path = Path(name).expanduser()
    if name == DEFAULT_TARGET or (path.is_dir() and (path / "config.json").is_file()):
        return
    if path.is_dir():
        raise UserError(f"{name}: no config.json: not a model folder")
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: no such model folder")


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group; a plain `python main.py` is a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if get_accelerator().device_name() == "cpu" and os.environ.get("WORLD_SIZE") == "1":
        # One CPU rank has no peer to all-reduce with, yet DeepSpeed would JIT-compile its
        # shared-memory all-reduce op for it: ~1 minute on a fresh machine.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu")


def fill_schedule(ds: dict, total_steps: int) -> dict:
    """The user's DeepSpeed config with the scheduler's step count filled in."""
    ds.pop("train_batch_size", None)  # implied by micro batch x accumulation x ranks
    sched = ds.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps", "auto") == "auto" and "scheduler" in ds:
        sched["total_num_steps"] = max(total_steps, 1)
        sched["warmup_num_steps"] = min(sched.get("warmup_num_steps", 0), max(total_steps - 1, 0))
    return ds


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
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.info("%d rank(s) on %s, %d CPU threads each (OMP_NUM_THREADS)", world, device, torch.get_num_threads())
    out = Path(cfg.output_dir)
    cache = Path(cfg.cache_dir or cache_root())

    # data
    target_path = local_rank0_first(lambda: resolve_target(cfg.target))
    try:
        tokenizer = AutoTokenizer.from_pretrained(target_path)
    except OSError as e:  # a Hub name that is no model, or no network: transformers says which
        raise UserError(f"{cfg.target}: {str(e).splitlines()[0]}") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tokenized(source, split):
        dc = DataConfig(source, split, cfg.max_records, cfg.max_length, cfg.too_long, cfg.num_proc)
        ds, counts = local_rank0_first(lambda: load_tokenized(dc, tokenizer, cache))
        log.info("%s: %d samples; %s", source, len(ds), json.dumps(counts))
        return ds, dataset_key(dc, tokenizer)

    train_ds, train_key = tokenized(cfg.train_data, cfg.train_split)
    key = train_key
    if cfg.test_data:
        test_ds, test_key = tokenized(cfg.test_data, "test")
        train_idx, test_idx = list(range(len(train_ds))), list(range(len(test_ds)))
    else:
        test_ds, test_key = train_ds, train_key
        # streamed in batches: the whole token column as Python lists would take GBs per rank
        samples = (ids for batch in train_ds.iter(batch_size=1024) for ids in batch["input_ids"])
        train_idx, test_idx = split_train_test(samples, cfg.test_fraction, cfg.seed)
        key = f"{key}|{cfg.test_fraction}|{cfg.seed}"
    steps_per_epoch = len(train_idx) // (micro * accum * world)
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.train_data}: {len(train_idx)} training samples do not fill one global batch of "
                        f"{micro * accum * world} (micro batch x accumulation x ranks of {args.deepspeed_config})")

    # target, vocabulary, draft
    target_dtype, why = precision.choose(device.type, cfg.target_dtype)
    cache_dtype = target_dtype if cfg.feature_cache_dtype == "auto" else cfg.feature_cache_dtype
    log.info("target in %s (%s)%s", target_dtype, why, f"; feature cache in {cache_dtype}" if cfg.feature_cache else "")
    target_config = AutoConfig.from_pretrained(target_path)
    tcfg = getattr(target_config, "text_config", target_config)

    def load_target():
        log.info("loading the target %s", target_path)
        return AutoModelForCausalLM.from_pretrained(target_path, dtype=getattr(torch, target_dtype)).to(device)

    aux = to_vllm_layer_ids(cfg.aux_layers, cfg.aux_layer_numbering) if cfg.aux_layers else default_aux_layers(tcfg.num_hidden_layers)
    vocab = local_rank0_first(lambda: load_or_build(
        cache, vocab_key(key, target_path, tcfg.vocab_size, cfg.draft_vocab_size),
        lambda: build_vocab_map((train_ds[i]["input_ids"] for i in train_idx), (train_ds[i]["loss_mask"] for i in train_idx),
                                tcfg.vocab_size, cfg.draft_vocab_size)))
    draft_cfg = derive_draft_config(tcfg, vocab.draft_vocab_size, aux, overrides)
    if draft_cfg.hidden_size != tcfg.hidden_size:
        raise UserError(f"{cfg.draft_config}: hidden_size must be the target's, {tcfg.hidden_size}: the draft shares its token embedding")
    if cfg.feature_cache:
        caches, by_key = {}, {}  # one cache per data set: train and test share it when test is held out of train_data
        for split, dataset, data_key in [("train", train_ds, train_key), ("test", test_ds, test_key)]:
            if data_key not in by_key:
                parts = cache_parts(data_key, target_path, target_dtype, aux, vocab, cache_dtype)
                by_key[data_key] = ensure_cache(
                    cache_folder(cache, parts), parts, dataset, lambda: TargetFeatures(load_target(), aux, vocab).hidden,
                    hidden_size=tcfg.hidden_size, aux_size=len(aux) * tcfg.hidden_size, batch_size=micro, pad_id=pad_id,
                    device=device, rank=rank, world=world, barrier=dist.barrier, progress=rank == 0 and cfg.progress)
                log.info("%s features from %s", split, by_key[data_key].folder)
            caches[split] = by_key[data_key]
        gc.collect()  # the target, if this rank computed features, is gone: free its memory
        if device.type != "cpu":
            get_accelerator().empty_cache()
        embed, lm_head = embedding_and_head(target_path, target_config)
        draft_head = draft_rows(lm_head.to(device, getattr(torch, target_dtype)), vocab)

        def batch_features(batch_idx, split):
            batch = caches[split].batch(batch_idx, pad_id, device)
            return batch, Features.from_last_hidden(batch["aux_hidden"], batch["last_hidden"], batch["teacher_ok"], draft_head)
    else:
        datasets = {"train": train_ds, "test": test_ds}
        target = load_target()
        features = TargetFeatures(target, aux, vocab)
        embed = target.get_input_embeddings().weight.data
        draft_head = features.draft_head

        def batch_features(batch_idx, split):
            batch = {k: v.to(device) for k, v in collate([datasets[split][i] for i in batch_idx], pad_id).items()}
            return batch, features(batch["input_ids"])
    torch.manual_seed(cfg.seed)
    draft = Eagle3Draft(draft_cfg)
    draft.embed_tokens.weight.data.copy_(embed)
    draft.d2t.copy_(vocab.d2t)
    draft.t2d.copy_(vocab.t2d)
    if cfg.draft_init == "target":
        draft.init_from_target(draft_head, final_norm(target_path))

    # engine
    fill_schedule(ds, cfg.epochs * steps_per_epoch)
    precision.fill_deepspeed(ds, target_dtype)
    # max_steps only stops early: the LR schedule stays that of the whole run, so a
    # run stopped by it and resumed without it trains exactly like one never stopped
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or 1 << 62)
    engine, *_ = deepspeed.initialize(model=draft, model_parameters=[p for p in draft.parameters() if p.requires_grad], config=ds)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    log.info("draft trains in %s (the DeepSpeed config's bf16/fp16)", str(dtype).removeprefix("torch."))

    state = {"global_step": 0, "epoch": 0, "batches_done": 0}
    if cfg.resume and (ckpt := checkpoint.latest_complete(out)):
        state = checkpoint.load(engine, ckpt)
        log.info("resumed from %s: %s", ckpt, state)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json_atomic(out / "train_config.json", to_dict(cfg))
        checkpoint.write_json_atomic(out / "ds_config.json", ds)  # the recipe's other half, for the model card
    metrics = MetricsLog(out / "metrics.jsonl", rank == 0,
                         tracking.open_tracker(cfg.report_to, out, to_dict(cfg)) if rank == 0 else None)

    def run(batch_idx, split):
        batch, f = batch_features(batch_idx, split)
        # the test split always scores the answers: what serving drafts
        loss_mask = batch["attention_mask"] if cfg.train_on == "all" and split == "train" else batch["loss_mask"]
        aux_hidden = add_feature_noise(f.aux_hidden, cfg.feature_noise) if cfg.feature_noise and split == "train" else f.aux_hidden
        result = engine(aux_hidden.to(dtype), batch["input_ids"], loss_mask, f.teacher, f.teacher_ok,
                        cfg.ttt_steps, cfg.ttt_decay, cfg.loss_type, cfg.ttt_impl)
        return result, int(batch["attention_mask"].sum()), loss_mask

    def evaluate(epoch):
        per_rank = len(test_idx) // world
        mine = test_idx[rank::world][:per_rank]
        stats = StepStats(cfg.ttt_steps)
        with torch.no_grad():
            for i in range(0, per_rank, micro):
                result, tokens, answers = run(mine[i:i + micro], "test")
                stats.add(result, tokens, answers=answers)
        summary = stats.summary(device)
        metrics.write(step=state["global_step"], epoch=epoch, split="test", **summary)
        if "tau" in summary:
            log.info("test after epoch %.2f: tau %.3f (acceptance per position %s), greedy decoding of the answers "
                     "of %d samples replayed (%d rounds, k=%d); %.0f%% of their tokens in the draft vocabulary", epoch,
                     summary["tau"], " ".join(f"{a:.3f}" for a in summary["round_acceptance"]), per_rank * world,
                     summary["rounds"], cfg.ttt_steps, 100 * summary["in_draft_vocab"])

    def save(**position):
        state.update(position)
        checkpoint.save(engine, draft_cfg, out, dict(state), cfg.keep_checkpoints)

    bar = tqdm(total=total_steps, initial=state["global_step"], disable=rank != 0 or not cfg.progress, desc="train", unit="step")
    stats = StepStats(cfg.ttt_steps)
    done = state["global_step"] >= total_steps
    for epoch in range(state["epoch"], cfg.epochs):
        if done:
            break
        batches = epoch_batches(train_idx, epoch, cfg.seed, micro, accum, world, rank)
        start = state["batches_done"] if epoch == state["epoch"] else 0
        engine.train()
        position = {"epoch": epoch + 1, "batches_done": 0}
        for b in range(start, len(batches)):
            result, tokens, _ = run(batches[b], "train")
            engine.backward(result.loss)
            engine.step()
            stats.add(result, tokens)
            if (b + 1) % accum:
                continue
            state["global_step"] += 1
            bar.update(1)
            done = state["global_step"] >= total_steps
            if state["global_step"] % cfg.log_every == 0 or done:
                summary = stats.summary(device)
                bar.set_postfix(loss=summary["loss"][0], acc0=summary["acc"][0])
                metrics.write(step=state["global_step"], epoch=epoch + (b + 1) / len(batches), split="train",
                              lr=engine.get_lr()[0], **summary, **peak_memory(device))
                stats = StepStats(cfg.ttt_steps)
            if done:
                if b + 1 < len(batches):  # stopped by max_steps: a resume continues from here
                    position = {"epoch": epoch, "batches_done": b + 1}
                break
            if state["global_step"] % cfg.save_every == 0:
                save(epoch=epoch, batches_done=b + 1)
        engine.eval()
        evaluate(position["epoch"] + position["batches_done"] / len(batches))
        save(**position)
    bar.close()
    metrics.close()
    if rank == 0 and (final := checkpoint.latest_complete(out)):
        shutil.rmtree(out / "draft", ignore_errors=True)
        shutil.copytree(final / "draft", out / "draft")
        log.info("draft for serving: %s", out / "draft")
    dist.barrier()


if __name__ == "__main__":
    main()
