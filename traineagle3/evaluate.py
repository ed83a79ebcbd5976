"""Offline EAGLE-3 evaluation: acceptance length and speed-up with the HF target.

    python -m traineagle3.evaluate --target <model> --draft <dir> --prompts question.jsonl \\
        --num-speculative-tokens 3 --out eval.json

Chain drafting, greedy: each round the draft proposes k tokens, the target checks them
in one forward pass and keeps the longest agreeing prefix plus its own next token, so
a round yields a+1 tokens (a = accepted proposals).  tau = mean(a+1); the acceptance
rate of position i is the share of rounds with a > i.  Plain greedy decoding runs in
the same process for the tokens/s ratio and to check the output is identical.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .acceptance import summarize
from .cli import Parser, UserError, cli, number
from .decoding import eos_ids, greedy, load_models, speculative, tree_speculative
from .features import AuxHooks
from .precision import AUTO
from .records import read_prompts, writing_system


def evaluate(
    target,
    tokenizer,
    draft,
    prompts: list[dict],
    k: int,
    max_new: int,
    device,
    progress: str | None = None,
    tree: tuple[int, int, int] | None = None,
) -> dict:
    """All prompts; with `progress` (a label), one line per prompt: several runs side by side stay readable.

    `tree` = (topk, depth, num_draft_tokens) drafts trees instead of chains of k (`k` is then the
    depth: acceptance per position reads as acceptance per depth)."""
    if tree is not None:
        k = tree[1]
    ids = draft.config.eagle_aux_hidden_state_layer_ids
    hooks = AuxHooks(target, ids)
    eos = eos_ids(target, tokenizer)
    rows, all_accepted, totals = [], [], [0.0, 0.0, 0, 0]  # spec s, plain s, spec tokens, plain tokens
    by_script: dict[str, list[int]] = {}
    try:
        for i, p in enumerate(prompts):
            row, accepted, times = _evaluate_prompt(target, tokenizer, hooks, draft, p, k, max_new, eos, device, tree)
            rows.append(row)
            all_accepted += accepted
            by_script.setdefault(row["script"], []).extend(accepted)
            totals = [a + b for a, b in zip(totals, times)]
            if progress:
                print(
                    f"{progress}: prompt {i + 1}/{len(prompts)}, tau so far {summarize(all_accepted, k)['tau']:.2f}",
                    flush=True,
                )
    finally:
        hooks.remove()
    spec_s, plain_s, spec_tok, plain_tok = totals
    total = {
        **summarize(all_accepted, k),
        "identical": all(r["identical"] for r in rows),
        "spec_tokens_per_s": round(spec_tok / spec_s, 2),
        "plain_tokens_per_s": round(plain_tok / plain_s, 2),
        "speedup": round((spec_tok / spec_s) / (plain_tok / plain_s), 3),
        "prompts": len(rows),
        "k": k,
        **({"tree": dict(zip(["topk", "depth", "num_draft_tokens"], tree))} if tree else {}),
        "by_script": {
            name: {"prompts": sum(r["script"] == name for r in rows), **summarize(acc, k)}
            for name, acc in sorted(by_script.items())
        },
    }
    return {"total": total, "prompts": rows}


def _evaluate_prompt(target, tokenizer, hooks, draft, p, k, max_new, eos, device, tree=None):
    """One prompt, turn by turn (each answer joins the history); returns row, accepts, times."""
    messages, accepted, identical = [], [], True
    spec_s = plain_s = spec_tok = plain_tok = 0
    for turn in p["turns"]:
        messages.append({"role": "user", "content": turn})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        base = greedy(target, prompt, max_new, eos)
        if tree:
            spec = tree_speculative(target, hooks, draft, prompt, max_new, *tree, eos)
        else:
            spec = speculative(target, hooks, draft, prompt, max_new, k, eos)
        identical &= spec.tokens == base.tokens
        accepted += spec.accepted
        spec_s, plain_s = spec_s + spec.seconds, plain_s + base.seconds
        spec_tok, plain_tok = spec_tok + len(spec.tokens), plain_tok + len(base.tokens)
        messages.append({"role": "assistant", "content": tokenizer.decode(base.tokens, skip_special_tokens=True)})
    row = {
        "id": p["id"],
        "turns": len(p["turns"]),
        "script": writing_system(p["turns"][0]),
        **summarize(accepted, k),
        "identical": identical,
    }
    return row, accepted, (spec_s, plain_s, spec_tok, plain_tok)


def table(result: dict) -> str:
    t = result["total"]
    acc = " ".join(f"{x:.2f}" for x in t["acceptance_per_position"])
    tree = t.get("tree")  # a tree's positions are its depths
    k = f"tree topk {tree['topk']} depth {tree['depth']} N {tree['num_draft_tokens']}" if tree else t["k"]
    return "\n".join(
        [
            "| prompts | k | tau | acceptance per position | spec tok/s | plain tok/s | speed-up | lossless |",
            "|---|---|---|---|---|---|---|---|",
            f"| {t['prompts']} | {k} | {t['tau']:.2f} | {acc} | {t['spec_tokens_per_s']:.1f} | "
            f"{t['plain_tokens_per_s']:.1f} | {t['speedup']:.2f}x | {'yes' if t['identical'] else 'NO'} |",
            "",
            "| prompts by script | tau | acceptance per position |",
            "|---|---|---|",
            *[
                f"| {name} ({s['prompts']}) | {s['tau']:.2f} | "
                f"{' '.join(f'{x:.2f}' for x in s['acceptance_per_position'])} |"
                for name, s in t["by_script"].items()
            ],
        ]
    )


def model_args(p: Parser) -> None:
    """The flags naming the target, the draft and the prompts (evaluate's and advise's)."""
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True, help="trained or exported draft folder (or a training output dir)")
    p.add_argument("--prompts", required=True, help="MT-bench question.jsonl, or ShareGPT/OpenAI JSON/JSONL")


def dtype_arg(p: Parser, text: str = "") -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help=f"{text}auto: {AUTO}",
    )


@cli
def main(argv=None) -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    p.add_argument("--num-speculative-tokens", type=number(int, 1), default=3)
    p.add_argument("--topk", type=number(int, 1), default=None, help="tree drafting: children per expanded node")
    p.add_argument("--depth", type=number(int, 1), default=None, help="tree drafting: draft levels")
    p.add_argument(
        "--num-draft-tokens", type=number(int, 2), default=None, help="tree drafting: tokens verified, root included"
    )
    p.add_argument("--num-prompts", type=number(int, 1), default=None)
    p.add_argument("--max-new-tokens", type=number(int, 1), default=128)
    p.add_argument(
        "--max-turns",
        type=number(int, 1),
        default=None,
        help="MT-bench turns per question (default all; 1 = first turns, as benchmark/ serves)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    dtype_arg(p)
    p.add_argument("--out", default="eval.json")
    args = p.parse_args(argv)
    if args.temperature != 0:
        p.error("only greedy decoding (--temperature 0) is implemented")
    tree = (args.topk, args.depth, args.num_draft_tokens)
    if any(x is not None for x in tree) and None in tree:
        p.error("tree drafting needs all of --topk, --depth and --num-draft-tokens")
    prompts = read_prompts(args.prompts, args.num_prompts, args.max_turns)  # the user's files first, before any model
    if not prompts:
        raise UserError(f"{args.prompts}: no usable prompts")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, target, draft, _, _ = load_models(args.target, args.draft, args.dtype, device)
    result = evaluate(
        target,
        tokenizer,
        draft,
        prompts,
        args.num_speculative_tokens,
        args.max_new_tokens,
        device,
        progress=Path(args.out).stem,
        tree=tree if args.topk else None,
    )
    result["args"] = vars(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"per-prompt results: {args.out}")


if __name__ == "__main__":
    main()
