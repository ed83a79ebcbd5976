"""Offline features: run the target once over the data, then train every epoch without it.

A cache is a folder `features-<key>`; the key hashes all that the features depend on
(tokenised data, target weights and dtype, aux layers, draft vocabulary, storage dtype,
format), so a stale cache is never read.  It holds

  shard-00000.safetensors ...  consecutive samples, concatenated along tokens:
      aux [T, 3H], last [T, H]  fused aux-layer inputs and the target's final hidden
                                state, in the storage dtype (the teacher's draft-vocab
                                logits are one matmul away from `last` and would take
                                V_draft / H times its space: 8x for Llama-8B and 32k)
      teacher_ok [T], input_ids [T], loss_mask [T], offsets [n+1]
  manifest.json                 the key's parts and the shards' sample ranges, written last

Shards go round-robin to ranks and each is published with one rename, so a run
killed at any moment resumes by computing only the shards that are missing, and a
cache without its manifest is never trained from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .atomic import publish, write_json_atomic
from .data import collate
from .target_tensors import target_fingerprint

FORMAT = "1"
SHARD_BYTES = 1 << 30  # features per shard file
SHARD_SAMPLES = 128  # and samples: a small data set still makes shards for every rank to compute
MANIFEST = "manifest.json"
DTYPES = ("bfloat16", "float16", "float32")  # storage dtypes


def cache_parts(data_key: str, target_path: str, target_dtype: str, aux_layers: list[int], vocab, dtype: str) -> dict:
    """Everything the cached features depend on."""
    draft_ids = hashlib.sha256(vocab.draft_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {
        "format": FORMAT,
        "data": data_key,
        "target": target_fingerprint(target_path),
        "target_dtype": target_dtype,
        "aux_layers": list(aux_layers),
        "vocab_size": vocab.vocab_size,
        "draft_ids": draft_ids,
        "dtype": dtype,
        "shard_bytes": SHARD_BYTES,
        "shard_samples": SHARD_SAMPLES,
    }


def cache_folder(root: str | Path, parts: dict) -> Path:
    return Path(root) / f"features-{hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]}"


def plan_shards(lengths: list[int], bytes_per_token: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges [start, end) of about SHARD_BYTES and at most SHARD_SAMPLES each."""
    shards, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and ((tokens + n) * bytes_per_token > SHARD_BYTES or i - start == SHARD_SAMPLES):
            shards.append((start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(lengths):
        shards.append((start, len(lengths)))
    return shards


def shard_path(folder: Path, j: int) -> Path:
    return folder / f"shard-{j:05d}.safetensors"


def _write_shard(path: Path, samples: list[dict], extract, batch_size: int, pad_id: int, dtype, device, bar) -> None:
    parts = {"aux": [], "last": [], "teacher_ok": []}
    for a in range(0, len(samples), batch_size):
        chunk = samples[a : a + batch_size]
        aux, last, ok = extract(collate(chunk, pad_id)["input_ids"].to(device))
        for r, s in enumerate(chunk):
            n = len(s["input_ids"])
            parts["aux"].append(aux[r, :n].to(dtype).cpu())
            parts["last"].append(last[r, :n].to(dtype).cpu())
            parts["teacher_ok"].append(ok[r, :n].cpu())
        bar.update(len(chunk))
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors["input_ids"] = torch.tensor([t for s in samples for t in s["input_ids"]], dtype=torch.int32)
    tensors["loss_mask"] = torch.tensor([m for s in samples for m in s["loss_mask"]], dtype=torch.uint8)
    tensors["offsets"] = torch.tensor([0] + [len(s["input_ids"]) for s in samples]).cumsum(0)
    with publish(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})


def build_shards(
    folder: Path,
    parts: dict,
    dataset,
    make_extractor,
    *,
    hidden_size: int,
    aux_size: int,
    batch_size: int = 1,
    pad_id: int = 0,
    device="cpu",
    rank: int = 0,
    world: int = 1,
    progress: bool = False,
) -> list[tuple[int, int]]:
    """Compute this rank's missing shards (j % world == rank); return the whole shard plan.

    `make_extractor()` is called only when there is a shard to compute; it returns
    `input_ids -> (aux, last, teacher_ok)` (`TargetFeatures.hidden`), dropped after.
    """
    folder, dtype = Path(folder), getattr(torch, parts["dtype"])
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    plan = plan_shards(lengths, (hidden_size + aux_size) * dtype.itemsize)
    todo = [j for j in range(rank, len(plan), world) if not shard_path(folder, j).exists()]
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        extract = make_extractor()
        with tqdm(
            total=sum(plan[j][1] - plan[j][0] for j in todo), desc="features", unit="sample", disable=not progress
        ) as bar:
            for j in todo:
                a, b = plan[j]
                _write_shard(
                    shard_path(folder, j),
                    [dataset[i] for i in range(a, b)],
                    extract,
                    batch_size,
                    pad_id,
                    dtype,
                    device,
                    bar,
                )
    return plan


def write_manifest(folder: Path, parts: dict, plan: list[tuple[int, int]]) -> None:
    """Mark the cache complete; refuses while a shard is missing."""
    missing = [shard_path(folder, j).name for j in range(len(plan)) if not shard_path(folder, j).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: shards {missing[:3]}... missing after all ranks finished; "
            "the cache folder must be on a file system that every rank shares"
        )
    write_json_atomic(Path(folder) / MANIFEST, {"parts": parts, "shards": plan})


def ensure_cache(
    folder: Path, parts: dict, dataset, make_extractor, *, rank: int = 0, world: int = 1, barrier=lambda: None, **build
) -> FeatureCache:
    """The complete cache of `dataset` in `folder`, built first where it is not.

    Collective: every rank calls it; each computes its share of the missing shards
    (see `build_shards`, which takes the keyword arguments in `build`), rank 0 then
    writes the manifest.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        plan = build_shards(folder, parts, dataset, make_extractor, rank=rank, world=world, **build)
        barrier()
        if rank == 0:
            write_manifest(folder, parts, plan)
    barrier()
    return FeatureCache(folder, parts)


class FeatureCache:
    """Batches of cached features by sample id, read lazily from the shard files."""

    def __init__(self, folder: str | Path, parts: dict):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / MANIFEST).read_text())
        if manifest["parts"] != parts:
            raise ValueError(f"{self.folder} was built for {manifest['parts']}, not {parts}")
        self._files = [
            safe_open(str(shard_path(self.folder, j)), framework="pt") for j in range(len(manifest["shards"]))
        ]
        self._where = {}  # sample id -> (shard, first token, end token)
        for j, (a, b) in enumerate(manifest["shards"]):
            offsets = self._files[j].get_tensor("offsets").tolist()
            self._where.update({a + r: (j, offsets[r], offsets[r + 1]) for r in range(b - a)})

    def __len__(self) -> int:
        return len(self._where)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        j, a, b = self._where[i]
        f = self._files[j]
        return {k: f.get_slice(k)[a:b] for k in ("aux", "last", "teacher_ok", "input_ids", "loss_mask")}

    def batch(self, ids: list[int], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
        """Right-padded like `data.collate`: padding has zero features and is never trained on."""
        samples = [self.sample(i) for i in ids]
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        n = int(lengths.max())

        def stack(key, fill=0, dtype=None):
            first = samples[0][key]
            out = torch.full((len(samples), n, *first.shape[1:]), fill, dtype=dtype or first.dtype)
            for r, s in enumerate(samples):
                out[r, : len(s[key])] = s[key]
            return out.to(device)

        return {
            "input_ids": stack("input_ids", pad_id, torch.long),
            "loss_mask": stack("loss_mask", dtype=torch.long),
            "attention_mask": (torch.arange(n)[None, :] < lengths[:, None]).long().to(device),
            "aux_hidden": stack("aux"),
            "last_hidden": stack("last"),
            "teacher_ok": stack("teacher_ok"),
        }
