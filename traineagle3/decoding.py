"""Decoding with the HF target, plain and speculative, and loading the models it runs.

- `greedy`: plain greedy decoding with a KV cache, the baseline;
- `speculative`: greedy EAGLE-3 chain drafting (k guesses a round, one target pass checks
  them and adds its own next token), optionally forced along another decoder's output;
- `tree_speculative`: greedy EAGLE tree drafting (tree.py), one target pass a round;
- `load_models`: the target, its tokenizer and a draft folder (as trained, or exported for
  either engine) in one precision, for evaluate, verify and advise; `load_target` alone.

Both speculative loops return exactly `greedy`'s tokens.  The draft's cache gets the
verified tokens with the target's own features at their positions (`extend`), the prompt
first: the draft's state at a round's start is what serving engines give it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .draft import KVCache, find_draft_folder, load_draft, to_vllm_layer_ids
from .features import AuxHooks
from .precision import choose as choose_precision
from .tree import TreeKVCache, accept, build_tree, keep_path, verify


@dataclass
class Generation:
    tokens: list[int]
    seconds: float
    accepted: list[int] = field(default_factory=list)  # per round, proposals accepted (tree: depth)


def eos_ids(target, tokenizer) -> set[int]:
    """The ids that end an answer: the tokenizer's and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(target, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


def finish(tokens: list[int], eos: set[int], max_new: int) -> tuple[list[int], bool]:
    """(the answer so far, cut at its end, and whether it has ended)."""
    for i, t in enumerate(tokens[:max_new]):
        if t in eos:
            return tokens[: i + 1], True
    return tokens[:max_new], len(tokens) >= max_new


def target_pass(target, ids: torch.Tensor, cache) -> torch.Tensor:
    """The target's last hidden states over `ids` after what `cache` holds (which grows by them)."""
    return target.model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state


def extend(draft, tokens: list[int] | torch.Tensor, aux: torch.Tensor, start: int, dcache):
    """Step-0 draft entries for positions start.. (the target's features there, the token after
    each): the draft's (logits, hidden) at those positions."""
    dev = aux.device
    tokens = tokens if isinstance(tokens, torch.Tensor) else torch.tensor([tokens], device=dev)
    positions = torch.arange(start, start + tokens.shape[1], device=dev)[None]
    return draft.step(tokens, draft.fc(aux.to(draft.fc.weight.dtype)), positions, dcache)


def prefill(target, hooks: AuxHooks, draft, prompt: torch.Tensor, cache, dcache, first: int | None = None):
    """The prompt into both caches: (the first answer token x, the draft's logits and hidden after
    it).  x is the target's greedy choice, or `first` when given; it sits at position len(prompt)."""
    hidden = target_pass(target, prompt, cache)
    x = first if first is not None else int(target.lm_head(hidden[:, -1]).argmax(-1))
    tokens = torch.cat([prompt[:, 1:], torch.tensor([[x]], device=prompt.device)], 1)
    return (x, *extend(draft, tokens, hooks.take(), 0, dcache))


@torch.no_grad()
def greedy(target, prompt: torch.Tensor, max_new: int, eos: set[int]) -> Generation:
    """Plain greedy decoding with a KV cache: the baseline."""
    from transformers import DynamicCache

    start, cache, out = time.perf_counter(), DynamicCache(), []
    ids = prompt
    while True:
        hidden = target_pass(target, ids, cache)
        out.append(int(target.lm_head(hidden[:, -1]).argmax(-1)))
        tokens, done = finish(out, eos, max_new)
        if done:
            return Generation(tokens, time.perf_counter() - start)
        ids = torch.tensor([[out[-1]]], device=prompt.device)


def guess_chain(draft, logits, h, n: int, k: int, dcache) -> list[int]:
    """k greedy draft guesses (target ids) from the draft's last logits and hidden; guess i sits at n + i."""
    d2t, dev, proposals = draft.d2t.to(logits.device), logits.device, []
    for i in range(k):
        d = int(logits.argmax(-1))
        proposals.append(d + int(d2t[d]))
        if i + 1 < k:
            logits, h = draft.step(
                torch.tensor([[proposals[-1]]], device=dev), h, torch.tensor([[n + i]], device=dev), dcache
            )
    return proposals


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
    if forced is not None:
        max_new = min(max_new, len(forced))
    x, logits, g = prefill(target, hooks, draft, prompt, cache, dcache, forced[0] if forced else None)
    out, accepted, n = [x], [], prompt.shape[1]  # positions 0..n-1 are cached; x sits at n
    while not finish(out, eos, max_new)[1]:
        proposals = guess_chain(draft, logits[:, -1:], g[:, -1:], n, k, dcache)
        hidden = target_pass(target, torch.tensor([[x] + proposals], device=prompt.device), cache)  # n..n+k
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
        logits, g = extend(draft, new, aux[:, : a + 1], n, dcache)
        n, x = n + a + 1, new[-1]
    return Generation(finish(out, eos, max_new)[0], time.perf_counter() - start, accepted)


@torch.no_grad()
def tree_speculative(
    target, hooks: AuxHooks, draft, prompt: torch.Tensor, max_new: int, topk: int, depth: int, num: int, eos: set[int]
) -> Generation:
    """Greedy EAGLE tree drafting (tree.py): per round a tree of `num` tokens (root included),
    `topk` children per expanded node, `depth` levels, verified in one target pass; returns the
    same tokens as `greedy`.  `accepted` holds the accepted depth of each round."""
    from transformers import DynamicCache

    start, cache, dcache = time.perf_counter(), DynamicCache(), TreeKVCache()
    x, logits, g = prefill(target, hooks, draft, prompt, cache, dcache)
    out, accepted, n = [x], [], prompt.shape[1]  # as in `speculative`: positions 0..n-1 cached, the root x at n
    while not finish(out, eos, max_new)[1]:
        tree = build_tree(draft, logits[0, -1], g[:, -1:], dcache, x, n, topk, depth, num)
        best = verify(target, tree, cache, n)
        path = accept(tree, best)
        keep_path(cache, n, path)
        aux = hooks.take()[:, path]  # the target's features at the accepted nodes, in path order
        new = [tree.tokens[i] for i in path[1:]] + [best[path[-1]]]
        accepted.append(len(path) - 1)
        out += new
        dcache.crop(n)  # drop the tree; the verified positions get step-0 entries as in `speculative`
        logits, g = extend(draft, new, aux, n, dcache)
        n, x = n + len(path), new[-1]
    return Generation(finish(out, eos, max_new)[0], time.perf_counter() - start, accepted)


def draft_for(folder: Path, target, device, dtype):
    """A draft folder (as trained, or exported for either engine) on `target`, aux ids in vLLM's numbering."""
    draft = load_draft(folder, target.get_input_embeddings().weight.data).to(device, dtype).eval()
    cfg = json.loads((folder / "config.json").read_text())
    if "eagle_aux_hidden_state_layer_ids" not in cfg:  # an SGLang folder counts "output of layer k"
        draft.config.eagle_aux_hidden_state_layer_ids = to_vllm_layer_ids(
            cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"], "sglang"
        )
    return draft


def load_target(target: str, dtype: torch.dtype, device="cpu") -> tuple:
    """(tokenizer, model) of a target folder, hub name or the embedded default's name, in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .default_model import resolve_target

    path = resolve_target(target)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return AutoTokenizer.from_pretrained(path), model


def load_models(target: str, draft: str | Path, dtype: str, device) -> tuple:
    """(tokenizer, target, draft, dtype name, why that dtype): `dtype` auto|float32|bfloat16|float16,
    `draft` a draft folder, a checkpoint or a training output dir."""
    folder = find_draft_folder(draft)
    name, why = choose_precision(torch.device(device).type, dtype)
    tokenizer, model = load_target(target, getattr(torch, name), device)
    return tokenizer, model, draft_for(folder, model, device, getattr(torch, name)), name, why
