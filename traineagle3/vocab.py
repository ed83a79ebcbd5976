"""The draft vocabulary: the `draft_vocab_size` most frequent trainable target tokens.

The draft's `lm_head` only scores these tokens, which makes it cheap with 128k-token
targets.  Serving engines map a draft token id back with `target = draft + d2t[draft]`
(an offset table, as EAGLE-3 checkpoints store it) and use `t2d` (a boolean mask over
the target vocabulary) to know which target tokens the draft can propose.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import publish


@dataclass
class VocabMap:
    draft_ids: torch.Tensor  # [draft_vocab] target ids, ascending
    vocab_size: int

    @property
    def draft_vocab_size(self) -> int:
        return len(self.draft_ids)

    @property
    def d2t(self) -> torch.Tensor:
        return self.draft_ids - torch.arange(len(self.draft_ids))

    @property
    def t2d(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.draft_ids] = True
        return mask

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of target ids (which must be in the draft vocabulary)."""
        lookup = torch.full((self.vocab_size,), -1, dtype=torch.long)
        lookup[self.draft_ids] = torch.arange(len(self.draft_ids))
        return lookup[target_ids]

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t.to(draft_ids.device)[draft_ids]


def build_vocab_map(
    token_lists: Iterable[list[int]], mask_lists: Iterable[list[int]], vocab_size: int, draft_vocab_size: int
) -> VocabMap:
    """Top `draft_vocab_size` tokens by trainable-token frequency; ties go to the lower id.

    If the data has fewer distinct tokens, the rest is filled with the lowest unused
    ids, so the size is always exact.  A size >= vocab_size is the identity map.
    """
    if draft_vocab_size >= vocab_size:
        return VocabMap(torch.arange(vocab_size), vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in zip(token_lists, mask_lists):
        ids_t = torch.tensor(ids, dtype=torch.long)
        counts.index_add_(0, ids_t[torch.tensor(mask, dtype=torch.bool)], torch.ones(int(sum(mask)), dtype=torch.long))
    # sort by count descending, then id ascending (a stable sort on -count keeps id order)
    order = torch.sort(-counts, stable=True).indices
    return VocabMap(torch.sort(order[:draft_vocab_size]).values, vocab_size)


def vocab_key(dataset_key: str, tokenizer_name: str, vocab_size: int, draft_vocab_size: int) -> str:
    return hashlib.sha256(f"{dataset_key}|{tokenizer_name}|{vocab_size}|{draft_vocab_size}".encode()).hexdigest()[:16]


def load_or_build(cache_dir: Path, key: str, build) -> VocabMap:
    """A cached map under `key` (data, tokenizer, size), else `build()` and cache it."""
    path = Path(cache_dir) / f"vocab-{key}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return VocabMap(t["draft_ids"], int(t["vocab_size"]))
    vm = build()
    with publish(path) as tmp:
        save_file({"draft_ids": vm.draft_ids.contiguous(), "vocab_size": torch.tensor(vm.vocab_size)}, str(tmp))
    return vm
