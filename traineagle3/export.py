"""Export a trained draft as a folder vLLM or SGLang loads as-is, and check such a folder.

    python -m traineagle3.export --draft outputs/eagle3 --target <model> --engine both --out exported/
    python -m traineagle3.export --check exported/vllm --target <model> --engine vllm

Both engines load `LlamaForCausalLMEagle3` with the weight names we train under
(`midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`; `t2d` is skipped, the embedding is the
target's).  They differ where drafts silently collapse:
- aux layer ids: vLLM reads top-level `eagle_aux_hidden_state_layer_ids`, counting
  "input of layer k"; SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids`,
  counting "output of layer k" and adding one itself.  Same tensors, ids off by one.
- RoPE: vLLM reads `rope_parameters`, SGLang `rope_theta` / `rope_scaling`: write both.
- dtype: SGLang turns a float32 or missing `torch_dtype` into float16: write bf16/fp16.
- `d2t` missing or `tie_word_embeddings` true load without error and draft garbage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import write_json_atomic
from .default_model import resolve_target

ENGINES = ("vllm", "sglang")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# what a serving config needs besides the aux ids and RoPE; everything else is dropped
KEEP = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "hidden_act", "rms_norm_eps", "vocab_size", "draft_vocab_size", "max_position_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias")


def find_draft_folder(path: str | Path) -> Path:
    """A draft folder, a checkpoint (step_N/draft) or a training output dir (its draft/)."""
    path = Path(path)
    for candidate in (path, path / "draft"):
        if (candidate / "config.json").exists() and (candidate / "model.safetensors").exists():
            return candidate
    raise FileNotFoundError(f"{path}: no draft here (expected config.json + model.safetensors, or draft/ with them)")


def legacy_rope(rope_parameters: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) as transformers 4.x and SGLang read them."""
    params = dict(rope_parameters)
    theta = params.pop("rope_theta")
    scaling = None if params.get("rope_type", "default") == "default" else params
    return theta, scaling


def serving_config(trained: dict, engine: str, dtype: torch.dtype, target_hidden: int) -> dict:
    ids = trained["eagle_aux_hidden_state_layer_ids"]  # stored in vLLM's numbering
    theta, scaling = legacy_rope(trained["rope_parameters"])
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
           "tie_word_embeddings": False, "norm_before_residual": False,
           **{k: trained[k] for k in KEEP if trained.get(k) is not None},
           "rope_parameters": trained["rope_parameters"], "rope_theta": theta, "rope_scaling": scaling,
           "torch_dtype": str(dtype).removeprefix("torch.")}
    if target_hidden != cfg["hidden_size"]:
        cfg["target_hidden_size"] = target_hidden
    if engine == "vllm":
        cfg["eagle_aux_hidden_state_layer_ids"] = list(ids)
        cfg["eagle_config"] = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": list(ids)}
    else:
        cfg["eagle_config"] = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids]}
    return cfg


def export(draft: str | Path, target: str, engine: str, out: str | Path, dtype: str = "bf16") -> Path:
    """Write `out` for one engine; return it.  Refuses a result that fails `check`."""
    src = find_draft_folder(draft)
    trained = json.loads((src / "config.json").read_text())
    weights = load_file(str(src / "model.safetensors"))
    target_cfg = target_config(target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
               for k, v in weights.items() if not k.startswith("embed_tokens.")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(out / "config.json", serving_config(trained, engine, DTYPES[dtype], target_cfg.hidden_size))
    problems = check(out, target_cfg, engine)
    if problems:
        raise ValueError(f"{out}: exported folder fails its check:\n  " + "\n  ".join(problems))
    return out


def target_config(target):
    from transformers import AutoConfig

    if not isinstance(target, str):
        return target
    cfg = AutoConfig.from_pretrained(resolve_target(target))
    return getattr(cfg, "text_config", cfg)


def check(folder: str | Path, target, engine: str) -> list[str]:
    """Everything in `folder` that does not fit `target` for `engine`; empty when it loads right."""
    folder, t = Path(folder), target_config(target)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        w = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        return [f"cannot read the folder: {e}"]
    problems = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    need(cfg.get("architectures") == ["LlamaForCausalLMEagle3"], f"architectures is {cfg.get('architectures')}, engines need ['LlamaForCausalLMEagle3']")
    need(cfg.get("tie_word_embeddings") is False, "tie_word_embeddings must be false (SGLang would use the embedding as lm_head)")
    need(cfg.get("vocab_size") == t.vocab_size, f"vocab_size {cfg.get('vocab_size')} != target's {t.vocab_size}")
    H, TH = cfg.get("hidden_size"), cfg.get("target_hidden_size", cfg.get("hidden_size"))
    need(TH == t.hidden_size, f"target hidden size {TH} != target's {t.hidden_size}")
    need(str(cfg.get("torch_dtype")) in ("bfloat16", "float16"), f"torch_dtype {cfg.get('torch_dtype')}: SGLang would run float16; export bf16 or fp16")
    V = cfg.get("draft_vocab_size", cfg.get("vocab_size"))
    L = t.num_hidden_layers
    top = cfg.get("eagle_aux_hidden_state_layer_ids")
    nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if engine == "vllm":
        need(top is not None, "vLLM reads top-level eagle_aux_hidden_state_layer_ids: missing")
        ids = top or []
        need(nested in (None, top), f"eagle_config ids {nested} differ from the top-level ids {top}")
        need(len(ids) == 3 and all(1 <= i < L for i in ids), f"aux ids {ids}: need 3 in [1, {L}) (vLLM: input of layer k)")
    else:
        need(nested is not None, "SGLang reads eagle_config.eagle_aux_hidden_state_layer_ids: missing")
        need(top is None, "a top-level eagle_aux_hidden_state_layer_ids in an SGLang folder is vLLM-numbered: remove it")
        ids = nested or []
        need(len(ids) == 3 and all(0 <= i < L - 1 for i in ids), f"aux ids {ids}: need 3 in [0, {L - 1}) (SGLang: output of layer k)")
    rope = cfg.get("rope_parameters")
    target_rope = getattr(t, "rope_parameters", None)
    need(rope == target_rope, f"rope_parameters {rope} != target's {target_rope}")
    if rope:
        theta, scaling = legacy_rope(rope)
        need(cfg.get("rope_theta") == theta and cfg.get("rope_scaling") == scaling, "rope_theta/rope_scaling disagree with rope_parameters")

    heads, kv, hd = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads"), cfg.get("head_dim") or H // cfg.get("num_attention_heads", 1)
    shapes = {"fc.weight": (H, 3 * TH), "norm.weight": (H,), "lm_head.weight": (V, H), "d2t": (V,),
              "midlayer.self_attn.q_proj.weight": (heads * hd, 2 * H), "midlayer.self_attn.k_proj.weight": (kv * hd, 2 * H),
              "midlayer.self_attn.v_proj.weight": (kv * hd, 2 * H), "midlayer.self_attn.o_proj.weight": (H, heads * hd),
              "midlayer.mlp.gate_proj.weight": (cfg.get("intermediate_size"), H), "midlayer.mlp.up_proj.weight": (cfg.get("intermediate_size"), H),
              "midlayer.mlp.down_proj.weight": (H, cfg.get("intermediate_size")), "midlayer.input_layernorm.weight": (H,),
              "midlayer.hidden_norm.weight": (H,), "midlayer.post_attention_layernorm.weight": (H,)}
    for name, shape in shapes.items():
        if name not in w:
            need(False, f"weight {name} is missing" + (" (without it engines map draft ids to the wrong tokens)" if name == "d2t" else ""))
        else:
            need(tuple(w[name].shape) == shape, f"{name} has shape {tuple(w[name].shape)}, expected {shape}")
    unknown = set(w) - set(shapes) - {"t2d"}
    need(not unknown, f"unexpected weights {sorted(unknown)} (vLLM refuses unknown names)")
    if "d2t" in w and tuple(w["d2t"].shape) == (V,):
        targets = torch.arange(V) + w["d2t"].long()
        need(bool((targets >= 0).all() and (targets < t.vocab_size).all() and (targets.diff() > 0).all()),
             "d2t does not map draft ids to distinct, ascending target ids")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="target model folder or hub name (or the embedded default's name)")
    p.add_argument("--engine", choices=[*ENGINES, "both"], default="both")
    p.add_argument("--draft", help="trained draft: output dir, checkpoint dir or draft folder")
    p.add_argument("--out", help="output folder (with --engine both: OUT/vllm and OUT/sglang)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--check", metavar="DIR", help="only check an exported folder against --target")
    args = p.parse_args(argv)
    engines = ENGINES if args.engine == "both" else (args.engine,)
    if args.check:
        if args.engine == "both":
            p.error("--check needs --engine vllm or sglang")
        problems = check(args.check, args.target, args.engine)
        for msg in problems:
            print(f"{args.check}: {msg}", file=sys.stderr)
        print(f"{args.check}: {'FAILS' if problems else 'ok'} for {args.engine} with target {args.target}")
        return 1 if problems else 0
    if not (args.draft and args.out):
        p.error("export needs --draft and --out")
    t = target_config(args.target)
    for engine in engines:
        out = Path(args.out) / engine if len(engines) > 1 else Path(args.out)
        export(args.draft, t, engine, out, args.dtype)
        print(f"{out}: {engine} draft, checked against {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
