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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .acceptance import round_stats
from .cli import Parser, UserError, cli, number
from .draft import KVCache, load_draft, to_vllm_layer_ids
from .export import find_draft_folder
from .features import AuxHooks
from .precision import AUTO
from .precision import choose as choose_precision
from .records import read_prompts, writing_system
from .tree import TreeKVCache, accept, build_tree, keep_path, verify


@dataclass
class Generation:
    tokens: list[int]
    seconds: float
    accepted: list[int] = field(default_factory=list)  # per round, proposals accepted


def _eos_ids(target, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(target, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


def _finish(tokens: list[int], eos: set[int], max_new: int) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens[:max_new]):
        if t in eos:
            return tokens[: i + 1], True
    return tokens[:max_new], len(tokens) >= max_new


@torch.no_grad()
def greedy(target, prompt: torch.Tensor, max_new: int, eos: set[int]) -> Generation:
    """Plain greedy decoding with a KV cache: the baseline."""
    from transformers import DynamicCache

    start, cache, out = time.perf_counter(), DynamicCache(), []
    ids = prompt
    while True:
        hidden = target.model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
        out.append(int(target.lm_head(hidden[:, -1]).argmax(-1)))
        tokens, done = _finish(out, eos, max_new)
        if done:
            return Generation(tokens, time.perf_counter() - start)
        ids = torch.tensor([[out[-1]]], device=prompt.device)


@torch.no_grad()
def speculative(
    target,
    hooks: AuxHooks,
    draft,
    prompt: torch.Tensor,
    max_new: int,
    k: int,
    eos: set[int],
    forced: list[int] | None = None,
) -> Generation:
    """Greedy EAGLE-3 chain drafting; returns the same tokens as `greedy`, in fewer target passes.

    With `forced` (another decoder's output, e.g. a server's) the verified tokens are those
    instead of the target's own choices: the draft's acceptance along exactly that text.
    """
    from transformers import DynamicCache

    start, cache, dcache = time.perf_counter(), DynamicCache(), KVCache()
    dev = prompt.device
    d2t = draft.d2t.to(dev)
    hidden = target.model(input_ids=prompt, past_key_values=cache, use_cache=True).last_hidden_state
    if forced is not None:
        max_new = min(max_new, len(forced))
    x = forced[0] if forced else int(target.lm_head(hidden[:, -1]).argmax(-1))
    out, accepted = [x], []
    n = prompt.shape[1]  # positions 0..n-1 are in the target cache; x sits at position n
    # step-0 draft entries for positions 0..n-1: (target features at j, token j+1)
    tokens = torch.cat([prompt[:, 1:], torch.tensor([[x]], device=dev)], 1)
    logits, g = draft.step(
        tokens, draft.fc(hooks.take().to(draft.fc.weight.dtype)), torch.arange(n, device=dev)[None], dcache
    )
    while not _finish(out, eos, max_new)[1]:
        proposals, d_logits, h = [], logits[:, -1:], g[:, -1:]
        for i in range(k):
            d = int(d_logits.argmax(-1))
            proposals.append(d + int(d2t[d]))
            if i + 1 < k:  # the i-th guess sits at position n + i
                d_logits, h = draft.step(
                    torch.tensor([[proposals[-1]]], device=dev), h, torch.tensor([[n + i]], device=dev), dcache
                )
        verify = torch.tensor([[x] + proposals], device=dev)  # positions n..n+k
        hidden = target.model(input_ids=verify, past_key_values=cache, use_cache=True).last_hidden_state
        aux = hooks.take()
        best = target.lm_head(hidden[0]).argmax(-1).tolist()
        if forced is not None:  # past its end the target decides, as a server checks guesses past max_tokens
            given = forced[len(out) : len(out) + k + 1]
            best = given + best[len(given) :]
        a = 0
        while a < k and best[a] == proposals[a]:
            a += 1
        accepted.append(a)
        new = proposals[:a] + [best[a]]
        out += new
        if a < k:
            cache.crop(a - k)  # drop the rejected proposals (negative: tokens to remove)
        dcache.crop(n)  # drop the chain; the verified positions n..n+a get step-0 entries
        logits, g = draft.step(
            torch.tensor([new], device=dev),
            draft.fc(aux[:, : a + 1].to(draft.fc.weight.dtype)),
            torch.arange(n, n + a + 1, device=dev)[None],
            dcache,
        )
        n, x = n + a + 1, new[-1]
    tokens, _ = _finish(out, eos, max_new)
    return Generation(tokens, time.perf_counter() - start, accepted)


@torch.no_grad()
def tree_speculative(
    target, hooks: AuxHooks, draft, prompt: torch.Tensor, max_new: int, topk: int, depth: int, num: int, eos: set[int]
) -> Generation:
    """Greedy EAGLE tree drafting (tree.py): per round a tree of `num` tokens (root included),
    `topk` children per expanded node, `depth` levels, verified in one target pass; returns the
    same tokens as `greedy`.  `accepted` holds the accepted depth of each round."""
    from transformers import DynamicCache

    start, cache, dcache = time.perf_counter(), DynamicCache(), TreeKVCache()
    dev = prompt.device
    hidden = target.model(input_ids=prompt, past_key_values=cache, use_cache=True).last_hidden_state
    x = int(target.lm_head(hidden[:, -1]).argmax(-1))
    out, accepted = [x], []
    n = prompt.shape[1]  # as in `speculative`: positions 0..n-1 cached, the root x at n
    tokens = torch.cat([prompt[:, 1:], torch.tensor([[x]], device=dev)], 1)
    logits, g = draft.step(
        tokens, draft.fc(hooks.take().to(draft.fc.weight.dtype)), torch.arange(n, device=dev)[None], dcache
    )
    while not _finish(out, eos, max_new)[1]:
        tree = build_tree(draft, logits[0, -1], g[:, -1:], dcache, x, n, topk, depth, num)
        best = verify(target, tree, cache, n)
        path = accept(tree, best)
        keep_path(cache, n, path)
        aux = hooks.take()[:, path]  # the target's features at the accepted nodes, in path order
        new = [tree.tokens[i] for i in path[1:]] + [best[path[-1]]]
        accepted.append(len(path) - 1)
        out += new
        dcache.crop(n)  # drop the tree; the verified positions get step-0 entries as in `speculative`
        logits, g = draft.step(
            torch.tensor([new], device=dev),
            draft.fc(aux.to(draft.fc.weight.dtype)),
            torch.arange(n, n + len(path), device=dev)[None],
            dcache,
        )
        n, x = n + len(path), new[-1]
    tokens, _ = _finish(out, eos, max_new)
    return Generation(tokens, time.perf_counter() - start, accepted)


def summarize(accepted: list[int], k: int) -> dict:
    """Drafts accepted in each round -> rounds, tau and acceptance per draft position."""
    rounds, tau, rates = round_stats(torch.bincount(torch.tensor(accepted, dtype=torch.long), minlength=k + 1))
    return {"rounds": rounds, "tau": round(tau, 4), "acceptance_per_position": [round(x, 4) for x in rates]}


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
    eos = _eos_ids(target, tokenizer)
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


def draft_for(folder: Path, target, device, dtype):
    """A draft folder (as trained, or exported for either engine) on `target`, aux ids in vLLM's numbering."""
    draft = load_draft(folder, target.get_input_embeddings().weight.data).to(device, dtype).eval()
    cfg = json.loads((folder / "config.json").read_text())
    if "eagle_aux_hidden_state_layer_ids" not in cfg:  # an SGLang folder counts "output of layer k"
        draft.config.eagle_aux_hidden_state_layer_ids = to_vllm_layer_ids(
            cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"], "sglang"
        )
    return draft


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


def load_models(args, device) -> tuple:
    """(tokenizer, target, draft, dtype name, why that dtype) for --target, --draft and --dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .default_model import resolve_target

    folder = find_draft_folder(args.draft)
    name, why = choose_precision(device.type, args.dtype)
    dtype = getattr(torch, name)
    path = resolve_target(args.target)
    tokenizer = AutoTokenizer.from_pretrained(path)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return tokenizer, target, draft_for(folder, target, device, dtype), name, why


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
    tokenizer, target, draft, _, _ = load_models(args, device)
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
