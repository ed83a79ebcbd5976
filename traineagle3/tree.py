"""Greedy tree drafting (EAGLE-2/3 style) for the offline evaluator.

A chain of k guesses is lost at its first wrong token; a tree spends the same target
pass on several alternatives where the draft is unsure.  One round, from the root x
(the target's last token, at position n, not yet in the target's cache):

  expand   depth 1 holds the draft's top-K tokens after x; at each next depth the K
           nodes of highest cumulative score (product of draft probabilities along
           the path) run one draft step together, each attending to the prefix and
           its own ancestors only, and each proposes its top-K children.  D depths.
  select   the N-1 best nodes of the whole tree by score, plus the root: N tokens.  A
           child never scores above its parent, so the kept set is closed under
           ancestors (ties go to the shallower node).
  verify   one target pass over the N tokens with a tree attention mask (the prefix
           and the node's own ancestors), positions n + depth.
  accept   from the root, follow the child equal to the target's greedy token at the
           node, while there is one; the target's token after the last one is the bonus.

Nodes are kept parents first (depth order), so a node's ancestors have smaller indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .draft import KVCache
from .ttt import repeat_kv


@dataclass
class Tree:
    """Flat tree, parents before children; index 0 is the root (parent -1, depth 0)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]

    def children(self, i: int) -> list[int]:
        return [c for c, p in enumerate(self.parents) if p == i]


@dataclass
class _Candidates:
    """Every node the draft proposed this round, with what expanding it needs."""

    tokens: list[int] = field(default_factory=list)  # target token ids
    parents: list[int] = field(default_factory=list)  # candidate index, -1 = the root
    depths: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # log of the product of draft probabilities
    entry: dict[int, int] = field(default_factory=dict)  # expanded candidate -> its draft cache index
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # expanded candidate -> its draft hidden [1, 1, H]

    def add_children(self, parent: int, logits: torch.Tensor, topk: int, d2t: torch.Tensor) -> list[int]:
        """The top-K draft tokens of `logits` [V_draft] as children of `parent`; returns their indices."""
        base = self.scores[parent] if parent >= 0 else 0.0
        depth = self.depths[parent] + 1 if parent >= 0 else 1
        logp = logits.double().log_softmax(-1)
        top = logp.topk(min(topk, logp.numel()))
        new = []
        for lp, d in zip(top.values.tolist(), top.indices.tolist()):
            new.append(len(self.tokens))
            self.tokens.append(d + int(d2t[d]))
            self.parents.append(parent)
            self.depths.append(depth)
            self.scores.append(base + lp)
        return new

    def ancestors(self, i: int) -> list[int]:
        out = []
        while self.parents[i] >= 0:
            i = self.parents[i]
            out.append(i)
        return out


class TreeKVCache(KVCache):
    """The draft's KVCache; when `mask` is set ([new, total] bool), the next `attend` uses it
    instead of the causal rule: tree nodes see the prefix and their own ancestors only."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        if self.mask is None:
            return super().attend(q, k, v, scale)
        mask, self.mask = self.mask, None
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, repeat_kv(self.k, rep), repeat_kv(self.v, rep), attn_mask=mask.to(q.device), scale=scale
        )


def _expand_step(draft, cands: _Candidates, chosen: list[int], cache: TreeKVCache, n: int, topk: int) -> list[int]:
    """One draft step for the `chosen` candidates (all of one depth) at once; returns their children.

    A node at depth d holds the draft's guess for position n + d; as in chain drafting its
    step runs at position n + d - 1 on its parent's hidden state and appends one cache entry.
    """
    before = len(cache)
    prefix = before - len(cands.entry)  # tree entries follow the prefix's
    mask = torch.zeros(len(chosen), before + len(chosen), dtype=torch.bool)
    mask[:, :prefix] = True
    for r, c in enumerate(chosen):
        for a in cands.ancestors(c):
            mask[r, cands.entry[a]] = True
        mask[r, before + r] = True
    cache.mask = mask
    dev = draft.d2t.device
    logits, hidden = draft.step(
        torch.tensor([[cands.tokens[c] for c in chosen]], device=dev),
        torch.cat([cands.hidden[cands.parents[c]] for c in chosen], 1),
        torch.tensor([[n + cands.depths[c] - 1 for c in chosen]], device=dev),
        cache,
    )
    new = []
    for r, c in enumerate(chosen):
        cands.entry[c], cands.hidden[c] = before + r, hidden[:, r : r + 1]
        new += cands.add_children(c, logits[0, r], topk, draft.d2t)
    return new


def expand(draft, logits, hidden, cache: TreeKVCache, n: int, topk: int, depth: int) -> _Candidates:
    """All candidates of D depths: `logits` [V_draft] and `hidden` [1, 1, H] are the draft's
    output for the root (its last prefix entry); `cache` holds the n prefix entries."""
    cands = _Candidates()
    cands.hidden[-1] = hidden
    frontier = cands.add_children(-1, logits, topk, draft.d2t)
    for _ in range(depth - 1):
        chosen = sorted(frontier, key=lambda c: -cands.scores[c])[:topk]
        frontier = _expand_step(draft, cands, chosen, cache, n, topk)
    return cands


def select(cands: _Candidates, root: int, num: int) -> Tree:
    """The root and the num-1 best candidates, parents first.  A child's score is its parent's
    plus a log probability (<= 0) and ties go to the shallower node, so every kept node's
    parent is kept."""
    order = sorted(range(len(cands.tokens)), key=lambda c: (-cands.scores[c], cands.depths[c], c))
    kept = sorted(order[: num - 1], key=lambda c: (cands.depths[c], c))
    index = {-1: 0}
    tree = Tree([root], [-1], [0])
    for c in kept:
        if cands.parents[c] not in index:
            raise AssertionError(f"tree selection kept candidate {c} without its parent")
        index[c] = len(tree.tokens)
        tree.tokens.append(cands.tokens[c])
        tree.parents.append(index[cands.parents[c]])
        tree.depths.append(cands.depths[c])
    return tree


def build_tree(draft, logits, hidden, cache: TreeKVCache, root: int, n: int, topk: int, depth: int, num: int) -> Tree:
    """Expand then select; leaves the tree's entries in the draft cache (the caller crops to n)."""
    return select(expand(draft, logits, hidden, cache, n, topk, depth), root, num)


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[N, N] bool: node i may attend to node j iff j is i or one of its ancestors."""
    N = len(parents)
    mask = torch.eye(N, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]  # parents come first, so the parent's row is complete
    return mask


def target_mask(parents: list[int], prefix: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The verification pass's additive 4D mask [1, 1, N, prefix + N]: 0 where allowed, the
    dtype's minimum elsewhere.  HF Llama uses a 4D mask as given (no causal mask of its own)."""
    allowed = torch.cat([torch.ones(len(parents), prefix, dtype=torch.bool), ancestor_mask(parents)], 1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def verify(target, tree: Tree, cache, n: int) -> list[int]:
    """One target pass over the tree (its KV joins `cache` after the n prefix entries); returns
    the target's greedy token after each node."""
    dev = target.lm_head.weight.device
    hidden = target.model(
        input_ids=torch.tensor([tree.tokens], device=dev),
        attention_mask=target_mask(tree.parents, n, target.lm_head.weight.dtype, dev),
        position_ids=torch.tensor([[n + d for d in tree.depths]], device=dev),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    return target.lm_head(hidden[0]).argmax(-1).tolist()


def accept(tree: Tree, best: list[int]) -> list[int]:
    """The accepted path, root first: each next node is the child whose token the target chose
    at its parent (siblings hold distinct tokens, so at most one matches)."""
    path = [0]
    while True:
        nxt = [c for c in tree.children(path[-1]) if tree.tokens[c] == best[path[-1]]]
        if not nxt:
            return path
        path.append(nxt[0])


def keep_path(cache, n: int, path: list[int]) -> None:
    """Drop the rejected nodes from the target's DynamicCache: the prefix, then the path's
    entries in order, which are then exactly what a causal pass over the path had written
    (each path node attended to the prefix and its ancestors, i.e. the path before it)."""
    index = torch.cat([torch.arange(n), n + torch.tensor(path)])
    for layer in cache.layers:
        idx = index.to(layer.keys.device)
        layer.keys = layer.keys.index_select(2, idx)
        layer.values = layer.values.index_select(2, idx)
