"""What the frozen target gives the draft: fused low/mid/high features and a teacher.

Forward pre-hooks capture the inputs of the three aux layers (vLLM's numbering: id k
is the input of decoder layer k, i.e. `output_hidden_states[k]`), so no other layer's
hidden state is kept.  The base model is run without its `lm_head`; the teacher is
the last hidden state times only the draft-vocabulary rows of `lm_head`, online or
from a last hidden state stored by the offline feature cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .vocab import VocabMap


def draft_rows(lm_head_weight: torch.Tensor, vocab: VocabMap) -> torch.Tensor:
    """The rows of the target's output head that score the draft vocabulary."""
    return lm_head_weight.detach()[vocab.draft_ids.to(lm_head_weight.device)].clone()


@dataclass
class Features:
    aux_hidden: torch.Tensor  # [B, L, 3H]: inputs of the three aux layers, low..high
    teacher: torch.Tensor  # [B, L, V_draft]: target logits over the draft vocabulary
    teacher_ok: torch.Tensor  # [B, L]: the target's top-1 token is in the draft vocabulary

    @classmethod
    def from_last_hidden(cls, aux_hidden, last_hidden, teacher_ok, draft_head) -> Features:
        """The teacher is the target's final hidden state times the draft rows of its head."""
        return cls(aux_hidden, last_hidden.to(draft_head.dtype) @ draft_head.T, teacher_ok)


class AuxHooks:
    """Forward pre-hooks on the aux layers; `take()` returns their inputs, low..high, fused."""

    def __init__(self, target, aux_layer_ids: list[int]):
        self.aux_layer_ids = list(aux_layer_ids)
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = [
            target.model.layers[i].register_forward_pre_hook(self._capture(i), with_kwargs=True)
            for i in sorted(set(self.aux_layer_ids))
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _capture(self, i: int):
        def hook(module, args, kwargs):
            self._captured[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def take(self) -> torch.Tensor:
        aux = torch.cat([self._captured[i] for i in self.aux_layer_ids], dim=-1)
        self._captured.clear()
        return aux


class TargetFeatures:
    def __init__(self, target, aux_layer_ids: list[int], vocab: VocabMap, argmax_chunk: int = 256):
        self.target = target.eval().requires_grad_(False)
        self.hooks = AuxHooks(target, aux_layer_ids)
        self.argmax_chunk = argmax_chunk
        self.identity = vocab.draft_vocab_size == vocab.vocab_size
        self.draft_head = draft_rows(target.get_output_embeddings().weight, vocab)
        self.t2d = vocab.t2d.to(self.draft_head.device)

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(aux_hidden, last hidden state, teacher_ok): all a teacher needs besides the head."""
        # Right padding only, so valid positions never see padding: no attention mask needed.
        last = self.target.model(input_ids=input_ids, use_cache=False).last_hidden_state
        aux = self.hooks.take()
        if self.identity:
            ok = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        else:  # the full-vocabulary top-1, a chunk of positions at a time
            weight = self.target.get_output_embeddings().weight
            top = torch.cat([(c @ weight.T).argmax(-1) for c in last.split(self.argmax_chunk, dim=1)], dim=1)
            ok = self.t2d[top]
        return aux, last, ok

    def __call__(self, input_ids: torch.Tensor) -> Features:
        return Features.from_last_hidden(*self.hidden(input_ids), self.draft_head)


def add_feature_noise(aux_hidden: torch.Tensor, scale: float, layers: int = 3) -> torch.Tensor:
    """Gaussian noise of `scale` x each aux layer's RMS at each position (EAGLE's augmentation).

    A draft trained on little data learns the exact features of its training samples
    (train loss far below test); jittering them makes it learn from their neighbourhood.
    """
    parts = aux_hidden.unflatten(-1, (layers, -1))
    rms = parts.float().pow(2).mean(-1, keepdim=True).sqrt().to(parts.dtype)
    return (parts + scale * rms * torch.randn_like(parts)).flatten(-2)
