"""The EAGLE-3 draft: one Llama decoder layer fed by the target's fused features.

    x_emb  = embed_tokens(token)                          (target's, frozen)
    h      = fc(concat(low, mid, high))                   (step 0)  | previous draft hidden
    a      = self_attn(concat(input_layernorm(x_emb), hidden_norm(h)))   (2H -> heads)
    h'     = h + a;   h'' = h' + mlp(post_attention_layernorm(h'))
    logits = lm_head(norm(h''))   over the draft vocabulary;   h'' feeds the next step

Parameter names are those of the EAGLE-3 checkpoints that vLLM and SGLang load
(`midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`, `t2d`), so a state dict saves as-is.

OPTIONS, config fields read by vLLM's LlamaForCausalLMEagle3 (the EAGLE-3.1 variants), all
off by default: the original EAGLE-3 Llama draft above, unchanged.  Any of them combine.
  norm_before_fc        `input_norm` (one RMSNorm over the whole 3H concat) before fc
  fc_norm               `fc_norm.0/1/2` (an RMSNorm per aux layer's H chunk) before fc, after
                        input_norm if both: the three captured layers have very different scales
  norm_before_residual  the residual h is hidden_norm(h) instead of h
  norm_output           the next step receives norm(h'') instead of h'' (logits are unchanged)
SGLang honours all but norm_before_residual (export refuses that draft for SGLang).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from .cli import UserError, read_json_object
from .ttt import repeat_kv, ttt_unroll

OPTIONS = ("norm_before_fc", "fc_norm", "norm_before_residual", "norm_output")
DERIVED_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "rope_parameters",
)


AUX_NUMBERINGS = ("vllm", "sglang")  # "input of layer k", "output of layer k"
DRAFT_INITS = ("target", "target_head", "random")


def default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's default EAGLE-3 capture points: the inputs of layers 2, L//2 and L-3."""
    return [2, num_layers // 2, num_layers - 3]


def to_vllm_layer_ids(ids: list[int], numbering: str) -> list[int]:
    """vLLM counts "input of layer k"; SGLang counts "output of layer k" = input of k+1."""
    if numbering not in AUX_NUMBERINGS:
        raise ValueError(f"aux layer numbering must be one of {AUX_NUMBERINGS}, not {numbering!r}")
    return list(ids) if numbering == "vllm" else [i + 1 for i in ids]


def derive_draft_config(
    target_config, draft_vocab_size: int, aux_layer_ids: list[int], overrides: dict | None = None
) -> LlamaConfig:
    """The draft's config: the target's shapes, RoPE and eps, one layer, its own vocab."""
    target_config = getattr(target_config, "text_config", target_config)
    fields = {k: getattr(target_config, k) for k in DERIVED_FIELDS if getattr(target_config, k, None) is not None}
    fields.setdefault("head_dim", target_config.hidden_size // target_config.num_attention_heads)
    fields.update(overrides or {})
    L = target_config.num_hidden_layers
    ids = list(aux_layer_ids)
    if len(ids) != 3 or ids != sorted(set(ids)) or not all(1 <= i < L for i in ids):
        # engines capture in layer order, once per layer, and vLLM cannot capture layer 0's input
        raise UserError(
            f"need 3 distinct ascending aux layer ids in [1, {L}) (vLLM numbering), got {ids}; "
            "for a shallow target pass --aux_layers"
        )
    cfg = LlamaConfig(
        **fields,
        num_hidden_layers=1,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLMEagle3"],
    )
    cfg.draft_vocab_size = min(draft_vocab_size, cfg.vocab_size)
    cfg.target_hidden_size = target_config.hidden_size
    cfg.eagle_aux_hidden_state_layer_ids = list(aux_layer_ids)
    cfg.eagle_config = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids), "use_aux_hidden_state": True}
    for name in OPTIONS:  # written out, off or on: the folder says what the engines must run
        setattr(cfg, name, fields.get(name, False))
    return cfg


def load_overrides(path: str | None) -> dict:
    """The fields of a --draft_config file (a JSON object), read before any model loads."""
    overrides = read_json_object(path) if path else {}
    for name in OPTIONS:
        if not isinstance(overrides.get(name, False), bool):  # "false" would read as on
            raise UserError(f"{path}: {name} must be true or false, not {overrides[name]!r}")
    return overrides


class KVCache:
    """A decoding KV cache: new entries attend to all earlier ones and causally to each other."""

    def __init__(self):
        self.k = self.v = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def crop(self, n: int) -> None:
        self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        before = len(self)
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        new, total = q.shape[2], self.k.shape[2]
        mask = torch.arange(total, device=q.device)[None, :] <= before + torch.arange(new, device=q.device)[:, None]
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, repeat_kv(self.k, rep), repeat_kv(self.v, rep), attn_mask=mask, scale=scale
        )


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read the 2H concat; the cache decides what it attends to
    (TTTCache when training, KVCache when drafting)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = cache.attend(q, k, v, 1 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm_before_residual = getattr(cfg, "norm_before_residual", False)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, embeds, hidden, cos, sin, cache):
        normed = self.hidden_norm(hidden)
        if self.norm_before_residual:
            hidden = normed
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        hidden = hidden + self.self_attn(x, cos, sin, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class FeatureFC(nn.Linear):
    """`fc` (3H -> H) with the norms the engines apply to the fused features before it.

    The norms are the draft's own modules (`input_norm`, `fc_norm.i`, the checkpoint's
    names), held here in a plain list, out of the module tree, so that every caller of
    `draft.fc` (training's unroll, the evaluator) gets what the engine's fc gets.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.norms = [None, None]  # input_norm, fc_norm

    def forward(self, aux: torch.Tensor) -> torch.Tensor:
        whole, chunks = self.norms
        if whole is not None:
            aux = whole(aux)
        if chunks is not None:
            aux = torch.cat([norm(x) for norm, x in zip(chunks, aux.chunk(len(chunks), dim=-1))], dim=-1)
        return super().forward(aux)


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        target_hidden = getattr(cfg, "target_hidden_size", None) or cfg.hidden_size
        self.fc = FeatureFC(3 * target_hidden, cfg.hidden_size)
        if getattr(cfg, "norm_before_fc", False):
            self.input_norm = LlamaRMSNorm(3 * target_hidden, eps=cfg.rms_norm_eps)
            self.fc.norms[0] = self.input_norm
        if getattr(cfg, "fc_norm", False):
            self.fc_norm = nn.ModuleList(LlamaRMSNorm(target_hidden, eps=cfg.rms_norm_eps) for _ in range(3))
            self.fc.norms[1] = self.fc_norm
        self.norm_output = getattr(cfg, "norm_output", False)
        self.midlayer = Eagle3DecoderLayer(cfg)
        self.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        # Kept out of the module tree so that bf16/fp16 casts (DeepSpeed casts every
        # buffer) never round the RoPE frequencies: RoPE must equal the engines' fp32 one.
        self._rope = [LlamaRotaryEmbedding(cfg)]
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))

    @torch.no_grad()
    def init_from_target(self, head_rows: torch.Tensor, final_norm: torch.Tensor, fc_pass: bool = True) -> None:
        """Start where the target ends instead of at random (`--draft_init target`).

        lm_head takes the target's output rows of the draft vocabulary and `norm` its
        final norm, so the draft's logits live in the target's output space from step
        one; fc passes the highest aux layer through (the other two start at zero), so
        the first hidden state is already the target's late representation of position
        t.  Training then only has to learn the one-token look-ahead (measured in
        docs/RESULTS.md).  `input_norm` and `fc_norm` start at one: they then only
        rescale each token's features, which the scale-free `norm` undoes, so the head
        still scores the highest layer as the target does, and fc's low and mid blocks
        learn on features of one scale.

        Without `fc_pass` (`--draft_init target_head`) fc is drawn at random instead
        (normal, std 0.02: speculators' initialisation) from torch's RNG, and only the head
        and the norms start at the target's.
        """
        if head_rows.shape != self.lm_head.weight.shape or final_norm.shape != self.norm.weight.shape:
            raise ValueError(
                f"target head rows {tuple(head_rows.shape)} / norm {tuple(final_norm.shape)} do not fit "
                f"the draft's lm_head {tuple(self.lm_head.weight.shape)} / norm {tuple(self.norm.weight.shape)}"
            )
        self.lm_head.weight.copy_(head_rows)
        self.norm.weight.copy_(final_norm)
        H = self.config.hidden_size  # the target's too (the draft shares its embedding)
        if fc_pass:
            self.fc.weight.zero_()
            self.fc.weight[:, 2 * H :].copy_(torch.eye(H))
        else:
            self.fc.weight.normal_(0.0, 0.02)
        for norm in [getattr(self, "input_norm", None), *getattr(self, "fc_norm", [])]:
            if norm is not None:
                norm.weight.fill_(1.0)

    @classmethod
    def from_target(
        cls,
        target_config,
        vocab,
        aux_layer_ids: list[int],
        embedding: torch.Tensor | None = None,
        *,
        overrides: dict | None = None,
        init: str = "random",
        head_rows: torch.Tensor | None = None,
        final_norm: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Eagle3Draft:
        """A new draft for a target: the one way training, tools and tests make one.

        The config is derived from the target's (`derive_draft_config`, `overrides` over
        it); `vocab` (a VocabMap) gives the draft vocabulary and its `d2t`/`t2d` maps;
        `embedding` is the target's token embedding, which the draft shares (None leaves it
        random: a draft that is only saved needs none, serving folders hold no embedding).
        `init="target"` then starts it where the target ends (`init_from_target` with
        `head_rows`, the target's output rows of the draft vocabulary, and its
        `final_norm`), "target_head" the same with fc at random; "random" keeps the
        modules' own initialisation.  Both draw from torch's RNG: seed it first for a
        reproducible draft.  `dtype` casts the draft
        before any tensor is copied in, so they keep their precision.
        """
        if init not in DRAFT_INITS:
            raise ValueError(f"init must be one of {DRAFT_INITS}, not {init!r}")
        if init != "random" and (head_rows is None or final_norm is None):
            raise ValueError(f"init={init!r} needs the target's head_rows and final_norm")
        draft = cls(derive_draft_config(target_config, vocab.draft_vocab_size, aux_layer_ids, overrides))
        if dtype is not None:
            draft = draft.to(dtype)
        if embedding is not None:
            draft.embed_tokens.weight.data.copy_(embedding)
        draft.d2t.copy_(vocab.d2t)
        draft.t2d.copy_(vocab.t2d)
        if init != "random":
            draft.init_from_target(head_rows, final_norm, fc_pass=init == "target")
        return draft

    # the engine's forward: a whole training-time-test unroll, ttt.py's ttt_unroll(self, aux_hidden,
    # input_ids, loss_mask, teacher, teacher_ok, *, steps, decay, loss_type, impl) -> TTTResult
    forward = ttt_unroll

    def step(self, input_ids, hidden, position_ids, cache):
        """One TTT / drafting step: returns (logits over the draft vocab, next hidden)."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        rope = self._rope[0].to(hidden.device)
        cos, sin = rope(hidden, position_ids)
        hidden = self.midlayer(embeds, hidden, cos, sin, cache)
        normed = self.norm(hidden)
        return self.lm_head(normed), normed if self.norm_output else hidden


def find_draft_folder(path: str | Path) -> Path:
    """A draft folder, a checkpoint (step_N/draft) or a training output dir (its draft/)."""
    path = Path(path)
    for candidate in (path, path / "draft"):
        if (candidate / "config.json").exists() and (candidate / "model.safetensors").exists():
            return candidate
    raise FileNotFoundError(f"{path}: no draft here (expected config.json + model.safetensors, or draft/ with them)")


def load_draft(folder: str | Path, target_embedding: torch.Tensor | None = None) -> Eagle3Draft:
    """An Eagle3Draft from a serving folder (config.json + model.safetensors).

    The folder has no token embedding (engines share the target's): pass the target's.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = LlamaConfig(**json.loads((folder / "config.json").read_text()))
    draft = Eagle3Draft(cfg)
    weights = load_file(str(folder / "model.safetensors"))
    result = draft.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("embed_tokens.")]
    if missing or result.unexpected_keys:
        raise UserError(f"{folder}: missing weights {missing}, unexpected {result.unexpected_keys}")
    if target_embedding is not None:
        draft.embed_tokens.weight.data.copy_(target_embedding)
    return draft.to(next(v for v in weights.values() if v.is_floating_point()).dtype)
