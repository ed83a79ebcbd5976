"""Tokenise conversations with the target's own chat template; batch them reproducibly.

Which tokens are trainable is found from the template itself, not from hard-coded
offsets: for assistant turn i we render the conversation up to turn i with the
generation prompt and up to turn i inclusive; the characters in between are that
turn's answer plus the template's end-of-turn marker.  Tokens whose characters fall
there are trainable, up to and including the first special token (the end-of-turn
token); whatever a template puts after it (a newline) is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import publish
from .cli import UserError
from .records import BadRecord, read_conversations, resolve_source, split_key

log = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when the tokenised format or masking rule changes


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages`; return the text and the (start, end) characters of each answer."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise BadRecord("chat template does not render turns as a prefix")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], special_ids: set[int]) -> tuple[list[int], list[int]]:
    """Token ids and the 0/1 mask of trainable (assistant answer + end-of-turn) tokens."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    for start, end in spans:
        for j, (a, _) in enumerate(offsets):
            if start <= a < end:
                mask[j] = 1
                if ids[j] in special_ids:
                    break  # the end-of-turn token closes the answer
    return ids, mask


@dataclass
class DataConfig:
    source: str
    split: str = "train"
    max_records: int | None = None
    max_length: int = 2048
    too_long: str = "truncate"  # or "drop"
    num_proc: int = 1


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()[:16]


def _source_fingerprint(source: str) -> str:
    p = Path(resolve_source(source))
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return source


def dataset_key(cfg: DataConfig, tokenizer) -> str:
    """A key that changes whenever the data, the tokenizer or the tokenising rules do."""
    parts = [
        CACHE_VERSION,
        _source_fingerprint(cfg.source),
        cfg.split,
        str(cfg.max_records),
        str(cfg.max_length),
        cfg.too_long,
        _tokenizer_fingerprint(tokenizer),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for tid, tok in tokenizer.added_tokens_decoder.items():
        if tok.special:
            ids.add(tid)
    return ids


def _tokenize_batch(batch, tokenizer, special_ids, max_length, too_long):
    out = {"input_ids": [], "loss_mask": [], "status": []}
    for messages in batch["messages"]:
        try:
            ids, mask = tokenize_conversation(tokenizer, messages, special_ids)
            status = "ok"
        except BadRecord as e:
            ids, mask, status = [], [], str(e)
        if status == "ok" and len(ids) > max_length:
            if too_long == "drop":
                ids, mask, status = [], [], "too long (dropped)"
            else:
                ids, mask, status = ids[:max_length], mask[:max_length], "too long (truncated)"
        if status != "ok" and ids and sum(mask) == 0:
            ids, mask, status = [], [], "no trainable tokens after truncation"
        out["input_ids"].append(ids)
        out["loss_mask"].append(mask)
        out["status"].append(status)
    return out


def load_tokenized(cfg: DataConfig, tokenizer, cache_dir: Path):
    """Tokenised dataset (cached on disk under a content key) and a dict of counts."""
    import datasets

    key = dataset_key(cfg, tokenizer)
    path = Path(cache_dir) / f"tokenized-{key}"
    if (path / "counts.json").exists():
        return datasets.load_from_disk(str(path / "data")), json.loads((path / "counts.json").read_text())
    convs, report = read_conversations(cfg.source, cfg.split, cfg.max_records)
    log.info(report.summary())
    if not convs:
        raise UserError(f"{report.summary()}: no usable conversations")
    raw = datasets.Dataset.from_dict({"messages": convs})
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        batch_size=64,
        num_proc=max(1, min(cfg.num_proc, len(convs) // 64 or 1)),
        remove_columns=["messages"],
        fn_kwargs=dict(
            tokenizer=tokenizer,
            special_ids=special_token_ids(tokenizer),
            max_length=cfg.max_length,
            too_long=cfg.too_long,
        ),
        desc="tokenising",
    )
    status = Counter(tokenized["status"])
    kept = tokenized.filter(lambda s: s["status"] in ("ok", "too long (truncated)"), num_proc=1)
    kept = kept.remove_columns(["status"])
    counts = {
        "read": report.summary(),
        "records_kept": report.kept,
        "records_skipped": dict(report.skipped),
        "file_truncated": report.truncated_file,
        "tokenized": dict(status),
        "samples": len(kept),
    }
    with publish(path) as tmp:
        kept.save_to_disk(str(tmp / "data"))
        (tmp / "counts.json").write_text(json.dumps(counts, indent=1))
    return datasets.load_from_disk(str(path / "data")), counts


def split_train_test(samples: Iterable[list[int]], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and test indices of tokenised samples (token-id lists, read once in order),
    held out by a hash of their tokens.

    A sample's side depends on its tokens and the seed alone: more data, less data or
    another order never moves it (a shuffle of indices would: runs of different sizes
    would test on each other's training samples), and copies of a sample never straddle
    the split.  With test_fraction > 0 at least one sample is held out.
    """
    keys = [split_key(array("q", ids).tobytes(), seed) for ids in samples]
    test = [i for i, k in enumerate(keys) if k < test_fraction]
    if not test and test_fraction > 0 and keys:
        test = [min(range(len(keys)), key=keys.__getitem__)]
    held = set(test)
    return [i for i in range(len(keys)) if i not in held], test


def epoch_batches(
    indices: list[int], epoch: int, seed: int, micro_batch: int, accum: int, world: int, rank: int
) -> list[list[int]]:
    """This rank's micro-batches for one epoch.

    Every optimizer step consumes one global batch of micro_batch * accum * world
    samples from a permutation seeded by (seed, epoch); micro-batch u of the step is
    u = accum_index * world + rank.  So 1 rank with accumulation 2 and 2 ranks with
    accumulation 1 see exactly the same samples per step, and a resumed run can skip
    the batches it has already consumed.  The last, partial global batch is dropped.
    """
    order = list(indices)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_step = micro_batch * accum * world
    out = []
    for s in range(len(order) // per_step):
        for a in range(accum):
            u = a * world + rank
            start = s * per_step + u * micro_batch
            out.append(order[start : start + micro_batch])
    return out


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padding has loss_mask 0 and attention_mask 0."""
    n = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(samples), n), dtype=torch.long)
    attn = torch.zeros((len(samples), n), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        ids[i, :k] = torch.tensor(s["input_ids"])
        loss_mask[i, :k] = torch.tensor(s["loss_mask"])
        attn[i, :k] = 1
    return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": attn}
