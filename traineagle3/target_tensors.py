"""Single tensors of a target checkpoint, read without building the model.

Training from the offline feature cache needs of the target only its token embedding
(the draft's input embedding), its output head (the teacher's draft-vocabulary rows)
and its final norm (the draft's starting point); its decoder layers stay on disk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"


def _files(folder: Path) -> list[Path]:
    if (folder / INDEX).exists():
        names = set(json.loads((folder / INDEX).read_text())["weight_map"].values())
        return sorted(folder / n for n in names)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights (needed to read single tensors)")
    return files


def read_tensor(folder: str | Path, suffix: str) -> torch.Tensor | None:
    """The one tensor whose name ends with `suffix` (e.g. 'embed_tokens.weight'); None if absent."""
    found = []
    for path in _files(Path(folder)):
        with safe_open(str(path), framework="pt") as f:
            found += [(path, k) for k in f.keys() if k == suffix or k.endswith("." + suffix)]
    if len(found) > 1:
        raise ValueError(f"{folder}: several tensors end with {suffix!r}: {[k for _, k in found]}")
    if not found:
        return None
    path, key = found[0]
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def embedding_and_head(folder: str | Path, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(embed_tokens.weight, lm_head.weight); a tied head is the embedding."""
    embed = read_tensor(folder, "embed_tokens.weight")
    head = read_tensor(folder, "lm_head.weight")
    tied = getattr(config, "tie_word_embeddings", False) or getattr(
        getattr(config, "text_config", None), "tie_word_embeddings", False
    )
    if embed is None or (head is None and not tied):
        raise ValueError(f"{folder}: no {'embed_tokens' if embed is None else 'lm_head'}.weight in its safetensors")
    return embed, embed if head is None else head


def final_norm(folder: str | Path) -> torch.Tensor:
    """The weight of the norm before the target's output head."""
    norm = read_tensor(folder, "model.norm.weight")
    if norm is None:
        raise ValueError(f"{folder}: no model.norm.weight in its safetensors")
    return norm


def target_fingerprint(folder: str | Path) -> str:
    """Changes whenever the target's config or weight files do (content of config, size+mtime of weights)."""
    folder = Path(folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in _files(folder):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
