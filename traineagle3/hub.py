"""Publish exported engine folders as one Hugging Face Hub model repository.

Layout: `<engine>/` per exported engine (`vllm/`, `sglang/`), each with its weights,
config, model card and provenance.json, as `export` wrote them; the root README.md names
the folders and repeats the first one's card, so the repository page shows it.  One
commit for the folders, one for the root card; the token is huggingface_hub's own
(`hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

from pathlib import Path


def download_dir(repo_id: str) -> str:
    """Where a card tells users to download the repository to: its name."""
    return repo_id.rsplit("/", 1)[-1]


def root_card(repo_id: str, engines: list[str], first_card: str) -> str:
    from .card import split_front_matter  # card imports this module

    meta, first_card = split_front_matter(first_card)  # the Hub reads front matter only at the top
    folders = ", ".join(f"`{e}/`" for e in engines)
    return meta + (
        f"This repository holds one folder per serving engine: {folders}, each with its own model card "
        f"(README.md) and provenance.json. Download it with `hf download {repo_id} --local-dir "
        f"{download_dir(repo_id)}`.\n\n{first_card}"
    )


def push(out: Path, engines: list[str], repo_id: str, private: bool) -> str:
    """Create (or reuse) `repo_id` and upload `out/<engine>/` for each engine; return the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(out),
        allow_patterns=[f"{e}/*" for e in engines],
        repo_type="model",
        commit_message=f"EAGLE-3 draft: {', '.join(engines)} folders",
    )
    card = root_card(repo_id, engines, (out / engines[0] / "README.md").read_text())
    api.upload_file(
        path_or_fileobj=card.encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="model",
        commit_message="model card",
    )
    return str(url)
