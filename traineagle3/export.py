"""Export a trained draft as a folder vLLM or SGLang loads as-is, and check such a folder.

    python -m traineagle3.export --draft outputs/eagle3 --target <model> --out exported/
        (writes exported/vllm and exported/sglang)
    python -m traineagle3.export --check exported/vllm --target <model> --engine vllm
    python -m traineagle3.export ... --results sharegpt=eval.json --push-to-hub ORG/NAME [--private]

Each engine folder gets a model card (README.md, measured numbers only) and provenance.json (card.py).

Both engines load `LlamaForCausalLMEagle3` with the weight names we train under
(`midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`; `t2d` is skipped, the embedding is the
target's).  They differ where drafts silently collapse:
- aux layer ids: vLLM reads top-level `eagle_aux_hidden_state_layer_ids`, counting
  "input of layer k"; SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids`,
  counting "output of layer k" and adding one itself.  Same tensors, ids off by one.
- RoPE: vLLM reads `rope_parameters`, SGLang `rope_theta` / `rope_scaling`: write both.
- dtype: SGLang turns a float32 or missing `torch_dtype` into float16: write bf16/fp16.
- `d2t` missing or `tie_word_embeddings` true load without error and draft garbage.
- the EAGLE-3.1 options (draft.OPTIONS): both read the same top-level keys, but SGLang's
  Llama draft ignores `norm_before_residual`, so such a draft is refused for SGLang.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import card, hub
from .atomic import write_json_atomic
from .cli import Parser, UserError, cli
from .default_model import check_target, resolve_target
from .draft import OPTIONS, find_draft_folder

ENGINES = ("vllm", "sglang")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# what a serving config needs besides the aux ids and RoPE; everything else is dropped
KEEP = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "vocab_size",
    "draft_vocab_size",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
    "mlp_bias",
)
# options an engine would load without error and run otherwise than training did
IGNORED = {
    "sglang": {
        "norm_before_residual": "SGLang's Llama draft ignores it (its residual is always the un-normalised hidden)"
    }
}


def legacy_rope(rope_parameters: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) as transformers 4.x and SGLang read them."""
    params = dict(rope_parameters)
    theta = params.pop("rope_theta")
    scaling = None if params.get("rope_type", "default") == "default" else params
    return theta, scaling


def unsupported(trained: dict, engine: str) -> list[str]:
    """The options of a draft's config that `engine` would not run as trained."""
    return [f"{name}: {why}" for name, why in IGNORED.get(engine, {}).items() if trained.get(name)]


def refuse_unsupported(src: Path, engines: list[str]) -> None:
    """Before anything is written: a draft that an engine would serve otherwise than trained."""
    trained = json.loads((src / "config.json").read_text())
    for engine in engines:
        if problems := unsupported(trained, engine):
            raise UserError(f"{src}: cannot export for {engine}: {'; '.join(problems)}; export it with --engine vllm")


def serving_config(trained: dict, engine: str, dtype: torch.dtype, target_hidden: int) -> dict:
    ids = trained["eagle_aux_hidden_state_layer_ids"]  # stored in vLLM's numbering
    theta, scaling = legacy_rope(trained["rope_parameters"])
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "tie_word_embeddings": False,
        **{k: bool(trained.get(k, False)) for k in OPTIONS},
        **{k: trained[k] for k in KEEP if trained.get(k) is not None},
        "rope_parameters": trained["rope_parameters"],
        "rope_theta": theta,
        "rope_scaling": scaling,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if target_hidden != cfg["hidden_size"]:
        cfg["target_hidden_size"] = target_hidden
    if engine == "vllm":
        cfg["eagle_aux_hidden_state_layer_ids"] = list(ids)
        cfg["eagle_config"] = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": list(ids)}
    else:
        cfg["eagle_config"] = {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids]}
    return cfg


def export(
    draft: str | Path,
    target: str,
    engine: str,
    out: str | Path,
    dtype: str = "bf16",
    facts: dict | None = None,
    hub_repo: str | None = None,
) -> Path:
    """Write `out` for one engine, its model card and provenance included; return it.
    Refuses a result that fails `check`.  `facts`: card.gather's, shared by the engines of one export."""
    src = find_draft_folder(draft)
    refuse_unsupported(src, [engine])
    trained = json.loads((src / "config.json").read_text())
    weights = load_file(str(src / "model.safetensors"))
    target_cfg = target_config(target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
        for k, v in weights.items()
        if not k.startswith("embed_tokens.")
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    serving = serving_config(trained, engine, DTYPES[dtype], target_cfg.hidden_size)
    write_json_atomic(out / "config.json", serving)
    problems = check(out, target_cfg, engine)
    if problems:
        raise UserError(f"{out}: exported folder fails its check: " + "; ".join(problems))
    facts = facts or card.gather(src, target, resolve_target(target), [])
    ids = serving["eagle_config"]["eagle_aux_hidden_state_layer_ids"]  # in this engine's numbering
    card.write(out, engine, facts, ids, hashlib.sha256(tensors["d2t"].numpy().tobytes()).hexdigest(), hub_repo)
    return out


def target_config(target):
    from transformers import AutoConfig

    if not isinstance(target, str):
        return target
    cfg = AutoConfig.from_pretrained(resolve_target(target))
    return getattr(cfg, "text_config", cfg)


class Problems(list):
    """What a check found: `need(ok, why)` keeps `why` when `ok` is false."""

    def need(self, ok: bool, why: str) -> None:
        if not ok:
            self.append(why)


def check(folder: str | Path, target, engine: str) -> list[str]:
    """Everything in `folder` that does not fit `target` for `engine`; empty when it loads right."""
    folder, t = Path(folder), target_config(target)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        w = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as e:
        return [f"cannot read the folder: {e}"]
    problems = Problems()
    config_problems(cfg, t, problems)
    aux_id_problems(cfg, t.num_hidden_layers, engine, problems)
    problems += unsupported(cfg, engine)
    weight_problems(cfg, w, t, problems)
    return list(problems)


def config_problems(cfg: dict, t, problems: Problems) -> None:
    """The config's sizes, dtype, RoPE and option keys against the target's."""
    need = problems.need
    need(
        cfg.get("architectures") == ["LlamaForCausalLMEagle3"],
        f"architectures is {cfg.get('architectures')}, engines need ['LlamaForCausalLMEagle3']",
    )
    need(
        cfg.get("tie_word_embeddings") is False,
        "tie_word_embeddings must be false (SGLang would use the embedding as lm_head)",
    )
    need(cfg.get("vocab_size") == t.vocab_size, f"vocab_size {cfg.get('vocab_size')} != target's {t.vocab_size}")
    TH = cfg.get("target_hidden_size", cfg.get("hidden_size"))
    need(TH == t.hidden_size, f"target hidden size {TH} != target's {t.hidden_size}")
    need(
        str(cfg.get("torch_dtype")) in ("bfloat16", "float16"),
        f"torch_dtype {cfg.get('torch_dtype')}: SGLang would run float16; export bf16 or fp16",
    )
    rope = cfg.get("rope_parameters")
    target_rope = getattr(t, "rope_parameters", None)
    need(rope == target_rope, f"rope_parameters {rope} != target's {target_rope}")
    if rope:
        theta, scaling = legacy_rope(rope)
        need(
            cfg.get("rope_theta") == theta and cfg.get("rope_scaling") == scaling,
            "rope_theta/rope_scaling disagree with rope_parameters",
        )

    for name in OPTIONS:
        need(isinstance(cfg.get(name, False), bool), f"{name} is {cfg.get(name)!r}: must be true or false")
    nested_fc = (cfg.get("eagle_config") or {}).get("norm_before_fc")
    need(
        nested_fc in (None, cfg.get("norm_before_fc", False)),
        f"eagle_config norm_before_fc {nested_fc} overrides the top-level {cfg.get('norm_before_fc', False)} "
        "in both engines",
    )


def aux_id_problems(cfg: dict, L: int, engine: str, problems: Problems) -> None:
    """The aux layer ids where `engine` reads them, in its numbering, for a target of L layers."""
    need = problems.need
    top = cfg.get("eagle_aux_hidden_state_layer_ids")
    nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if engine == "vllm":
        need(top is not None, "vLLM reads top-level eagle_aux_hidden_state_layer_ids: missing")
        ids = top or []
        need(nested in (None, top), f"eagle_config ids {nested} differ from the top-level ids {top}")
        need(
            len(ids) == 3 and all(1 <= i < L for i in ids),
            f"aux ids {ids}: need 3 in [1, {L}) (vLLM: input of layer k)",
        )
    else:
        need(nested is not None, "SGLang reads eagle_config.eagle_aux_hidden_state_layer_ids: missing")
        need(
            top is None, "a top-level eagle_aux_hidden_state_layer_ids in an SGLang folder is vLLM-numbered: remove it"
        )
        ids = nested or []
        need(
            len(ids) == 3 and all(0 <= i < L - 1 for i in ids),
            f"aux ids {ids}: need 3 in [0, {L - 1}) (SGLang: output of layer k)",
        )


def weight_problems(cfg: dict, w: dict, t, problems: Problems) -> None:
    """Every weight the config implies, in its shape, and no other; d2t a proper map."""
    need = problems.need
    H, TH = cfg.get("hidden_size"), cfg.get("target_hidden_size", cfg.get("hidden_size"))
    V = cfg.get("draft_vocab_size", cfg.get("vocab_size"))
    heads, kv, hd = (
        cfg.get("num_attention_heads"),
        cfg.get("num_key_value_heads"),
        cfg.get("head_dim") or H // cfg.get("num_attention_heads", 1),
    )
    shapes = {
        "fc.weight": (H, 3 * TH),
        "norm.weight": (H,),
        "lm_head.weight": (V, H),
        "d2t": (V,),
        "midlayer.self_attn.q_proj.weight": (heads * hd, 2 * H),
        "midlayer.self_attn.k_proj.weight": (kv * hd, 2 * H),
        "midlayer.self_attn.v_proj.weight": (kv * hd, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, heads * hd),
        "midlayer.mlp.gate_proj.weight": (cfg.get("intermediate_size"), H),
        "midlayer.mlp.up_proj.weight": (cfg.get("intermediate_size"), H),
        "midlayer.mlp.down_proj.weight": (H, cfg.get("intermediate_size")),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
    }
    options = {
        "norm_before_fc": {"input_norm.weight": (3 * TH,)},
        "fc_norm": {f"fc_norm.{i}.weight": (TH,) for i in range(3)},
    }
    for name, weights in options.items():
        if cfg.get(name):
            shapes.update(weights)
        else:  # vLLM drops input_norm and refuses fc_norm without the option: the draft was trained with them
            stray = sorted(set(weights) & set(w))
            need(not stray, f"weights {stray} but {name} is not true: the engine would not apply them")
    for name, shape in shapes.items():
        if name not in w:
            need(
                False,
                f"weight {name} is missing"
                + (" (without it engines map draft ids to the wrong tokens)" if name == "d2t" else ""),
            )
        else:
            need(tuple(w[name].shape) == shape, f"{name} has shape {tuple(w[name].shape)}, expected {shape}")
    unknown = set(w) - set(shapes) - {"t2d"} - {k for weights in options.values() for k in weights}
    need(not unknown, f"unexpected weights {sorted(unknown)} (vLLM refuses unknown names)")
    if "d2t" in w and tuple(w["d2t"].shape) == (V,):
        targets = torch.arange(V) + w["d2t"].long()
        need(
            bool((targets >= 0).all() and (targets < t.vocab_size).all() and (targets.diff() > 0).all()),
            "d2t does not map draft ids to distinct, ascending target ids",
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(
        prog="python -m traineagle3.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--target", required=True, help="target model folder or hub name (or the embedded default's name)")
    p.add_argument("--engine", choices=[*ENGINES, "both"], default="both")
    p.add_argument("--draft", help="trained draft: output dir, checkpoint dir or draft folder")
    p.add_argument("--out", help="output folder: OUT/vllm and/or OUT/sglang, whatever the engine")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="evaluate.py or benchmark compare.json results of this draft for the model card; NAME: the "
        "prompt set (default FILE's stem); repeatable",
    )
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the engine folders to this Hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--license", help="the draft's license for its card (default: the target's where known, else other)")
    p.add_argument("--check", metavar="DIR", help="only check an exported folder against --target")
    args = p.parse_args(argv)
    if args.check and args.engine == "both":
        p.error("--check needs --engine vllm or sglang")
    if not args.check and not (args.draft and args.out):
        p.error("export needs --draft and --out")
    return args


def local_target(target: str) -> str:
    """The target's folder (or hub name), checked."""
    check_target(target)
    return resolve_target(target)


def run(args: argparse.Namespace) -> int:
    if args.check:
        problems = check(args.check, local_target(args.target), args.engine)
        for msg in problems:
            print(f"{args.check}: {msg}", file=sys.stderr)
        print(f"{args.check}: {'FAILS' if problems else 'ok'} for {args.engine} with target {args.target}")
        return 1 if problems else 0
    engines = list(ENGINES) if args.engine == "both" else [args.engine]
    refuse_unsupported(find_draft_folder(args.draft), engines)
    folder = find_draft_folder(args.draft)
    facts = card.gather(folder, args.target, local_target(args.target), args.results, license=args.license)
    for engine in engines:
        out = export(args.draft, args.target, engine, Path(args.out) / engine, args.dtype, facts, args.push_to_hub)
        print(f"{out}: {engine} draft, checked against {args.target}; model card {out / 'README.md'}")
    if args.push_to_hub:
        try:
            print(f"uploaded to {hub.push(Path(args.out), engines, args.push_to_hub, args.private)}")
        except OSError as e:  # the Hub's refusal (token, repo name, network): the user's to fix
            raise UserError(f"push to {args.push_to_hub}: {str(e).splitlines()[0]}") from None
    return 0


@cli
def main(argv=None) -> int:
    """Bad input (a missing file, an unreadable results file, a folder failing its check): one line, exit status 2."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
