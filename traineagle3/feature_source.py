"""Where a training batch's features come from: the frozen target run on every batch
(online), or the offline feature cache it filled once.

Both sources give `.batch(batch_idx, split) -> (batch, Features)` for a list of sample ids
of the "train" or "test" split, and hold the target tensors the draft starts from: its
token `embedding` (the draft shares it) and `draft_head`, the rows of its output head
that score the draft vocabulary.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM

from .data import collate
from .feature_cache import FeatureCache, cache_folder, cache_parts, ensure_cache
from .features import Features, TargetFeatures, draft_rows
from .target_tensors import embedding_and_head
from .vocab import VocabMap

log = logging.getLogger("traineagle3")


@dataclass
class Target:
    """The frozen target: its folder, config, the dtype it runs in and the device it runs on."""

    path: str
    config: object  # as AutoConfig reads it: a multimodal model's text model is its text_config
    dtype: str
    device: torch.device

    @property
    def text_config(self):
        return getattr(self.config, "text_config", self.config)

    def load(self):
        log.info("loading the target %s", self.path)
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype)).to(self.device)


class FeatureSource(Protocol):
    embedding: torch.Tensor
    draft_head: torch.Tensor

    def batch(self, batch_idx: list[int], split: str) -> tuple[dict[str, torch.Tensor], Features]: ...


class OnlineFeatures:
    """The target in memory, run with hooks on its aux layers for every batch."""

    def __init__(self, target: Target, aux: list[int], vocab: VocabMap, datasets: dict, pad_id: int):
        self.datasets, self.pad_id, self.device = datasets, pad_id, target.device
        model = target.load()
        self.features = TargetFeatures(model, aux, vocab)
        self.embedding = model.get_input_embeddings().weight.data
        self.draft_head = self.features.draft_head

    def batch(self, batch_idx: list[int], split: str) -> tuple[dict[str, torch.Tensor], Features]:
        batch = {
            k: v.to(self.device) for k, v in collate([self.datasets[split][i] for i in batch_idx], self.pad_id).items()
        }
        return batch, self.features(batch["input_ids"])


class CachedFeatures:
    """The offline cache of each split; of the target only its embedding and output head in memory."""

    def __init__(
        self,
        caches: dict[str, FeatureCache],
        embedding: torch.Tensor,
        draft_head: torch.Tensor,
        pad_id: int,
        device: torch.device,
    ):
        self.caches, self.embedding, self.draft_head, self.pad_id, self.device = (
            caches,
            embedding,
            draft_head,
            pad_id,
            device,
        )

    def batch(self, batch_idx: list[int], split: str) -> tuple[dict[str, torch.Tensor], Features]:
        batch = self.caches[split].batch(batch_idx, self.pad_id, self.device)
        return batch, Features.from_last_hidden(
            batch["aux_hidden"], batch["last_hidden"], batch["teacher_ok"], self.draft_head
        )

    @classmethod
    def build(
        cls,
        target: Target,
        aux: list[int],
        vocab: VocabMap,
        datasets: dict,
        keys: dict[str, str],
        *,
        root,
        dtype: str,
        batch_size: int,
        pad_id: int,
        rank: int,
        world: int,
        progress: bool,
    ) -> CachedFeatures:
        """Collective: the complete cache of each split's data under `root`, the missing shards
        computed first by all ranks (the target is loaded only if one is missing)."""
        tc, device = target.text_config, target.device
        caches, by_key = {}, {}  # one cache per data set: train and test share it when test is held out of train_data
        for split in ("train", "test"):
            data_key = keys[split]
            if data_key not in by_key:
                parts = cache_parts(data_key, target.path, target.dtype, aux, vocab, dtype)
                by_key[data_key] = ensure_cache(
                    cache_folder(root, parts),
                    parts,
                    datasets[split],
                    lambda: TargetFeatures(target.load(), aux, vocab).hidden,
                    hidden_size=tc.hidden_size,
                    aux_size=len(aux) * tc.hidden_size,
                    batch_size=batch_size,
                    pad_id=pad_id,
                    device=device,
                    rank=rank,
                    world=world,
                    barrier=dist.barrier,
                    progress=rank == 0 and progress,
                )
                log.info("%s features from %s", split, by_key[data_key].folder)
            caches[split] = by_key[data_key]
        gc.collect()  # the target, if this rank computed features, is gone: free its memory
        if device.type != "cpu":
            get_accelerator().empty_cache()
        embed, lm_head = embedding_and_head(target.path, target.config)
        return cls(caches, embed, draft_rows(lm_head.to(device, getattr(torch, target.dtype)), vocab), pad_id, device)
