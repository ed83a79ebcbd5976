"""A training run's pieces: the data, the draft vocabulary and config, the feature source, the
draft and its DeepSpeed engine, and the `Trainer`'s loop (epochs of steps, the test split
after each, checkpoints, resume).  `Run` puts them together: `Run.prepare` up to the
vocabulary, `Run.features` (the target's pass), `Run.train` one draft on a set of samples
(main.py: all of them; forecast.py: each fraction)."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from . import checkpoint, precision, tracking
from .acceptance import decode_rounds
from .atomic import cache_root, write_json_atomic
from .cli import Parser, UserError, read_json_object
from .config import TrainConfig, add_arguments, from_args, to_dict
from .data import DataConfig, dataset_key, epoch_batches, load_tokenized, split_train_test
from .default_model import check_target, resolve_target
from .distributed import init_distributed, local_rank0_first
from .draft import Eagle3Draft, default_aux_layers, derive_draft_config, load_overrides, to_vllm_layer_ids
from .feature_source import CachedFeatures, FeatureSource, OnlineFeatures, Target
from .features import add_feature_noise
from .metrics import MetricsLog, StepStats, peak_memory
from .records import source_path
from .target_tensors import final_norm
from .vocab import VocabMap, build_vocab_map, load_or_build, vocab_key

log = logging.getLogger("traineagle3")


@dataclass
class TrainData:
    """The tokenised data of each split, and which of its samples the split trains or scores."""

    pad_id: int
    datasets: dict  # split -> tokenised data set; "test" is "train"'s own when test is held out of it
    keys: dict[str, str]  # split -> its data set's key (what caches of it depend on)
    train_idx: list[int]
    test_idx: list[int]
    key: str  # the training samples: their data set's key, and how test was held out of it


def _tokenized(cfg: TrainConfig, tokenizer, cache: Path, source: str, split: str):
    dc = DataConfig(source, split, cfg.max_records, cfg.max_length, cfg.too_long, cfg.num_proc)
    ds, counts = local_rank0_first(lambda: load_tokenized(dc, tokenizer, cache))
    log.info("%s: %d samples; %s", source, len(ds), json.dumps(counts))
    return ds, dataset_key(dc, tokenizer)


def load_data(cfg: TrainConfig, target_path: str, cache: Path) -> TrainData:
    """The train and test data, tokenised by the target's tokenizer (by each node's first rank, into `cache`)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(target_path)
    except OSError as e:  # a Hub name that is no model, or no network: transformers says which
        raise UserError(f"{cfg.target}: {str(e).splitlines()[0]}") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_ds, train_key = _tokenized(cfg, tokenizer, cache, cfg.train_data, cfg.train_split)
    key = train_key
    if cfg.test_data:
        test_ds, test_key = _tokenized(cfg, tokenizer, cache, cfg.test_data, "test")
        train_idx, test_idx = list(range(len(train_ds))), list(range(len(test_ds)))
    else:
        test_ds, test_key = train_ds, train_key
        # streamed in batches: the whole token column as Python lists would take GBs per rank
        samples = (ids for batch in train_ds.iter(batch_size=1024) for ids in batch["input_ids"])
        train_idx, test_idx = split_train_test(samples, cfg.test_fraction, cfg.seed)
        key = f"{key}|{cfg.test_fraction}|{cfg.seed}"
    return TrainData(
        pad_id, {"train": train_ds, "test": test_ds}, {"train": train_key, "test": test_key}, train_idx, test_idx, key
    )


def steps_per_epoch(cfg: TrainConfig, data: TrainData, micro: int, accum: int, world: int, ds_path: str) -> int:
    """Optimizer steps in an epoch; none is a user's mistake (too little data for one global batch)."""
    steps = len(data.train_idx) // (micro * accum * world)
    if steps == 0:
        raise UserError(
            f"{cfg.train_data}: {len(data.train_idx)} training samples do not fill one global batch of "
            f"{micro * accum * world} (micro batch x accumulation x ranks of {ds_path})"
        )
    return steps


def target_dtype(cfg: TrainConfig, device: torch.device) -> str:
    """--target_dtype, or with auto what this hardware runs fastest without losing accuracy (precision.py)."""
    dtype, why = precision.choose(device.type, cfg.target_dtype)
    log.info(
        "target in %s (%s)%s", dtype, why, f"; feature cache in {cache_dtype(cfg, dtype)}" if cfg.feature_cache else ""
    )
    return dtype


def cache_dtype(cfg: TrainConfig, target_dtype: str) -> str:
    """The feature cache stores what the target computed unless --feature_cache_dtype says otherwise."""
    return target_dtype if cfg.feature_cache_dtype == "auto" else cfg.feature_cache_dtype


def aux_layer_ids(cfg: TrainConfig, target: Target) -> list[int]:
    """The three target layers the draft fuses, in vLLM's numbering."""
    if cfg.aux_layers:
        return to_vllm_layer_ids(cfg.aux_layers, cfg.aux_layer_numbering)
    return default_aux_layers(target.text_config.num_hidden_layers)


def build_vocab(cfg: TrainConfig, data: TrainData, target: Target, cache: Path) -> VocabMap:
    """The draft vocabulary: the most frequent trained tokens of the training samples (cached)."""
    ds, idx, vocab_size = data.datasets["train"], data.train_idx, target.text_config.vocab_size
    return local_rank0_first(
        lambda: load_or_build(
            cache,
            vocab_key(data.key, target.path, vocab_size, cfg.draft_vocab_size),
            lambda: build_vocab_map(
                (ds[i]["input_ids"] for i in idx), (ds[i]["loss_mask"] for i in idx), vocab_size, cfg.draft_vocab_size
            ),
        )
    )


def check_draft_config(cfg: TrainConfig, target: Target, vocab: VocabMap, aux: list[int], overrides: dict) -> None:
    """The draft config that --draft_config makes, refused before any target pass if the draft cannot be built."""
    tc = target.text_config
    if derive_draft_config(tc, vocab.draft_vocab_size, aux, overrides).hidden_size != tc.hidden_size:
        raise UserError(
            f"{cfg.draft_config}: hidden_size must be the target's, {tc.hidden_size}: "
            "the draft shares its token embedding"
        )


def feature_source(
    cfg: TrainConfig,
    target: Target,
    aux: list[int],
    vocab: VocabMap,
    data: TrainData,
    cache: Path,
    micro: int,
    rank: int,
    world: int,
) -> FeatureSource:
    """Collective: with --feature_cache the offline cache (filled first where incomplete), else the target online."""
    if cfg.feature_cache:
        return CachedFeatures.build(
            target,
            aux,
            vocab,
            data.datasets,
            data.keys,
            root=cache,
            dtype=cache_dtype(cfg, target.dtype),
            batch_size=micro,
            pad_id=data.pad_id,
            rank=rank,
            world=world,
            progress=cfg.progress,
        )
    return OnlineFeatures(target, aux, vocab, data.datasets, data.pad_id)


def build_draft(
    cfg: TrainConfig, target: Target, vocab: VocabMap, aux: list[int], overrides: dict, source: FeatureSource
) -> Eagle3Draft:
    """The draft as training starts it (--draft_init), seeded."""
    torch.manual_seed(cfg.seed)
    init = {"head_rows": source.draft_head, "final_norm": final_norm(target.path)} if cfg.draft_init != "random" else {}
    draft = Eagle3Draft.from_target(
        target.text_config, vocab, aux, source.embedding, overrides=overrides, init=cfg.draft_init, **init
    )
    # frozen, it is rebuilt the same way on resume: DeepSpeed's checkpoints leave frozen weights out
    draft.lm_head.weight.requires_grad_(not cfg.freeze_lm_head)
    return draft


def fill_schedule(ds: dict, total_steps: int) -> dict:
    """The user's DeepSpeed config with the scheduler's step count filled in."""
    ds.pop("train_batch_size", None)  # implied by micro batch x accumulation x ranks
    sched = ds.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps", "auto") == "auto" and "scheduler" in ds:
        sched["total_num_steps"] = max(total_steps, 1)
        sched["warmup_num_steps"] = min(sched.get("warmup_num_steps", 0), max(total_steps - 1, 0))
    return ds


def engine_dtype(engine) -> torch.dtype:
    """The precision the engine trains the draft in (the DeepSpeed config's bf16/fp16, else float32)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32


def build_engine(draft: Eagle3Draft, ds: dict, target_dtype: str):
    """DeepSpeed owns the draft's trainable parameters only (the embedding is the target's, frozen).

    A bf16 section left "auto" trains the draft in the target's precision.
    """
    precision.fill_deepspeed(ds, target_dtype)
    engine, *_ = deepspeed.initialize(
        model=draft, model_parameters=[p for p in draft.parameters() if p.requires_grad], config=ds
    )
    log.info("draft trains in %s (the DeepSpeed config's bf16/fp16)", str(engine_dtype(engine)).removeprefix("torch."))
    return engine


def training_parser(description: str) -> Parser:
    """main.py's flags: the TrainConfig fields, --config, and DeepSpeed's own."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_arguments(parser)
    deepspeed.add_config_arguments(parser)
    return parser


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


def nested_subsets(train_idx: list[int], fractions: list[float], seed: int) -> list[list[int]]:
    """The first round(f x N) samples of one seeded permutation, for each fraction f: every
    smaller subset lies inside every larger one, and fraction 1 is `train_idx` itself."""
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed)).tolist()
    subsets = []
    for f in fractions:
        n = max(1, round(f * len(train_idx)))
        subsets.append(list(train_idx) if n >= len(train_idx) else sorted(train_idx[i] for i in order[:n]))
    return subsets


@dataclass
class Run:
    """What every draft of a run shares: the configs, the ranks, the data, the frozen target and
    the draft vocabulary.  `main.py` trains one draft from it; `forecast` one per data fraction."""

    cfg: TrainConfig
    ds: dict
    micro: int
    accum: int
    rank: int
    world: int
    device: torch.device
    cache: Path
    data: TrainData
    target: Target
    aux: list[int]
    vocab: VocabMap
    overrides: dict
    ds_path: str

    @classmethod
    def prepare(cls, args, fractions: list[float] = (1.0,)) -> tuple[Run, list[list[int]]]:
        """The user's files checked, then the process group, the data and the target; with the
        training subsets of `fractions`, each checked to fill a global batch before any target pass."""
        cfg: TrainConfig = from_args(args)
        tracking.require(cfg.report_to)
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
        target_path = local_rank0_first(lambda: resolve_target(cfg.target))
        data = load_data(cfg, target_path, cache)
        subsets = nested_subsets(data.train_idx, fractions, cfg.seed)
        for subset in subsets:
            steps_per_epoch(cfg, replace(data, train_idx=subset), micro, accum, world, args.deepspeed_config)
        target = Target(target_path, AutoConfig.from_pretrained(target_path), target_dtype(cfg, device), device)
        aux = aux_layer_ids(cfg, target)
        vocab = build_vocab(cfg, data, target, cache)
        check_draft_config(cfg, target, vocab, aux, overrides)
        run = cls(
            cfg,
            ds,
            micro,
            accum,
            rank,
            world,
            device,
            cache,
            data,
            target,
            aux,
            vocab,
            overrides,
            args.deepspeed_config,
        )
        return run, subsets

    def features(self) -> FeatureSource:
        """Collective: the target's features of every split (the offline cache filled, with --feature_cache)."""
        return feature_source(
            self.cfg, self.target, self.aux, self.vocab, self.data, self.cache, self.micro, self.rank, self.world
        )

    def train(self, source: FeatureSource, train_idx: list[int], output_dir: str) -> Trainer:
        """Collective: a draft trained on `train_idx` (its epochs, its LR schedule), scored on the
        test split after each epoch, into `output_dir`; a killed run resumes there with cfg.resume."""
        cfg, data = replace(self.cfg, output_dir=str(output_dir)), replace(self.data, train_idx=train_idx)
        epoch_steps = steps_per_epoch(cfg, data, self.micro, self.accum, self.world, self.ds_path)
        draft = build_draft(cfg, self.target, self.vocab, self.aux, self.overrides, source)
        ds = fill_schedule(copy.deepcopy(self.ds), cfg.epochs * epoch_steps)
        # max_steps only stops early: the LR schedule stays that of the whole run, so a
        # run stopped by it and resumed without it trains exactly like one never stopped
        total_steps = min(cfg.epochs * epoch_steps, cfg.max_steps or 1 << 62)
        engine = build_engine(draft, ds, self.target.dtype)
        trainer = Trainer(
            cfg,
            engine,
            source,
            data,
            draft.config,
            ds,
            micro=self.micro,
            accum=self.accum,
            rank=self.rank,
            world=self.world,
            device=self.device,
            total_steps=total_steps,
        )
        trainer.fit()
        trainer.finish()
        return trainer


class Trainer:
    """One rank's loop: epochs of training steps, the test split after each, checkpoints, resume.

    Made, it has resumed from the newest complete checkpoint (with cfg.resume), written the
    run's configs (`ds`: the DeepSpeed config, the recipe's other half, for the model card)
    and opened its metrics."""

    def __init__(
        self,
        cfg: TrainConfig,
        engine,
        source: FeatureSource,
        data: TrainData,
        draft_config,
        ds: dict,
        *,
        micro: int,
        accum: int,
        rank: int,
        world: int,
        device: torch.device,
        total_steps: int,
    ):
        self.cfg, self.engine, self.source, self.data, self.draft_config = cfg, engine, source, data, draft_config
        self.micro, self.accum, self.rank, self.world, self.device = micro, accum, rank, world, device
        self.total_steps, self.out, self.dtype = total_steps, Path(cfg.output_dir), engine_dtype(engine)
        self.state = {"global_step": 0, "epoch": 0, "batches_done": 0}
        self.test_rounds: dict[int, list[int]] = {}  # the last evaluate's, per test sample
        if cfg.resume and (ckpt := checkpoint.latest_complete(self.out)):
            self.state = checkpoint.load(engine, ckpt)
            log.info("resumed from %s: %s", ckpt, self.state)
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "train_config.json", to_dict(cfg))
            write_json_atomic(self.out / "ds_config.json", ds)
        tracker = tracking.open_tracker(cfg.report_to, self.out, to_dict(cfg)) if rank == 0 else None
        self.metrics = MetricsLog(self.out / "metrics.jsonl", rank == 0, tracker)
        self.stats = StepStats(cfg.ttt_steps)  # the training steps since the last log line
        self.bar = tqdm(
            total=total_steps,
            initial=self.state["global_step"],
            disable=rank != 0 or not cfg.progress,
            desc="train",
            unit="step",
        )

    @property
    def done(self) -> bool:
        """The run's steps are all taken (max_steps counted)."""
        return self.state["global_step"] >= self.total_steps

    def fit(self) -> None:
        """The epochs left: each trained to its end (or to max_steps), then scored on the test split and saved."""
        for epoch in range(self.state["epoch"], self.cfg.epochs):
            if self.done:
                break
            position, at = self.train_epoch(epoch)
            self.evaluate(at)
            self.save(**position)
        self.bar.close()
        self.metrics.close()

    def run(self, batch_idx: list[int], split: str):
        """The draft's TTT unroll on a batch: (TTTResult, its real tokens, the mask of tokens scored)."""
        cfg = self.cfg
        batch, f = self.source.batch(batch_idx, split)
        # the test split always scores the answers: what serving drafts
        loss_mask = batch["attention_mask"] if cfg.train_on == "all" and split == "train" else batch["loss_mask"]
        aux_hidden = (
            add_feature_noise(f.aux_hidden, cfg.feature_noise)
            if cfg.feature_noise and split == "train"
            else f.aux_hidden
        )
        result = self.engine(
            aux_hidden=aux_hidden.to(self.dtype),
            input_ids=batch["input_ids"],
            loss_mask=loss_mask,
            teacher=f.teacher,
            teacher_ok=f.teacher_ok,
            steps=cfg.ttt_steps,
            decay=cfg.ttt_decay,
            loss_type=cfg.loss_type,
            impl=cfg.ttt_impl,
        )
        return result, int(batch["attention_mask"].sum()), loss_mask

    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        """This epoch's batches from where the state left off.  Returns the position a checkpoint
        after it resumes from, and where in the epochs it stopped (epoch + fraction done)."""
        cfg, state = self.cfg, self.state
        batches = epoch_batches(self.data.train_idx, epoch, cfg.seed, self.micro, self.accum, self.world, self.rank)
        start = state["batches_done"] if epoch == state["epoch"] else 0
        self.engine.train()
        position = {"epoch": epoch + 1, "batches_done": 0}
        for b in range(start, len(batches)):
            result, tokens, _ = self.run(batches[b], "train")
            self.engine.backward(result.loss)
            self.engine.step()
            self.stats.add(result, tokens)
            if (b + 1) % self.accum:
                continue
            self.count_step(epoch + (b + 1) / len(batches))
            if self.done:
                if b + 1 < len(batches):  # stopped by max_steps: a resume continues from here
                    position = {"epoch": epoch, "batches_done": b + 1}
                break
            if state["global_step"] % cfg.save_every == 0:
                self.save(epoch=epoch, batches_done=b + 1)
        return position, position["epoch"] + position["batches_done"] / len(batches)

    def count_step(self, epoch: float) -> None:
        """An optimizer step done: count it; every log_every steps and at the last, log the training metrics."""
        self.state["global_step"] += 1
        self.bar.update(1)
        if self.state["global_step"] % self.cfg.log_every == 0 or self.done:
            summary = self.stats.summary(self.device)
            self.bar.set_postfix(loss=summary["loss"][0], acc0=summary["acc"][0])
            self.metrics.write(
                step=self.state["global_step"],
                epoch=epoch,
                split="train",
                lr=self.engine.get_lr()[0],
                **summary,
                **peak_memory(self.device),
            )
            self.stats = StepStats(self.cfg.ttt_steps)

    def score(self) -> tuple[dict, dict]:
        """Collective: the test split, each rank a share: losses, accuracies and greedy decoding of
        its answers replayed; and each test sample's histogram of drafts accepted per round (so that
        the test split can be resampled: forecast.py), from every rank."""
        cfg, test_idx = self.cfg, self.data.test_idx
        per_rank = len(test_idx) // self.world
        mine = test_idx[self.rank :: self.world][:per_rank]
        stats, rounds = StepStats(cfg.ttt_steps), {}
        self.engine.eval()
        with torch.no_grad():
            for i in range(0, per_rank, self.micro):
                batch = mine[i : i + self.micro]
                result, tokens, answers = self.run(batch, "test")
                hists = [
                    decode_rounds(result.run[r : r + 1], answers[r : r + 1], cfg.ttt_steps) for r in range(len(batch))
                ]
                stats.add(result, tokens, rounds=sum(hists))
                rounds.update({sample: hist.long().tolist() for sample, hist in zip(batch, hists)})
        gathered = [None] * self.world
        dist.all_gather_object(gathered, rounds)
        return stats.summary(self.device), {k: v for part in gathered for k, v in part.items()}

    def evaluate(self, epoch: float) -> None:
        """Collective: the test split scored, logged, and its per-sample rounds kept in `test_rounds`."""
        summary, self.test_rounds = self.score()
        self.metrics.write(step=self.state["global_step"], epoch=epoch, split="test", **summary)
        if "tau" in summary:
            log.info(
                "test after epoch %.2f: tau %.3f (acceptance per position %s), greedy decoding of the answers "
                "of %d samples replayed (%d rounds, k=%d); %.0f%% of their tokens in the draft vocabulary",
                epoch,
                summary["tau"],
                " ".join(f"{a:.3f}" for a in summary["round_acceptance"]),
                len(self.test_rounds),
                summary["rounds"],
                self.cfg.ttt_steps,
                100 * summary["in_draft_vocab"],
            )

    def save(self, **position) -> None:
        """Collective: a checkpoint of the engine and a serving folder, resuming at `position`."""
        self.state.update(position)
        checkpoint.save(self.engine, self.draft_config, self.out, dict(self.state), self.cfg.keep_checkpoints)

    def finish(self) -> None:
        """Collective: the newest complete checkpoint's serving folder becomes output_dir/draft."""
        if self.rank == 0 and (final := checkpoint.latest_complete(self.out)):
            shutil.rmtree(self.out / "draft", ignore_errors=True)
            shutil.copytree(final / "draft", self.out / "draft")
            log.info("draft for serving: %s", self.out / "draft")
        dist.barrier()
