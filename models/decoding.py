"""Trie-constrained decoding of semantic IDs: every returned item is a real catalog item, distinct within a row.

beam_search: batched constrained beam search (the baseline every paper compares with).
sample:      batched constrained sampling with a temperature (rollouts for value fitting and RL, and diversity).
Log-probabilities are renormalised over the trie-valid children of each prefix, so a complete path's score is
log P(item | history) under the constrained policy. VED lives in genrec.models.ved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genrec.kernels import constrained_topk, masked_log_softmax, valid_children_mask
from genrec.models.recommender import Recommender

__all__ = ["Trie", "Recommendations", "beam_search", "sample", "masked_log_softmax"]


@dataclass
class Trie:
    """The prefix trie as tensors on the model's device (see genrec.models.semantic_ids.PrefixTrie)."""

    child: torch.Tensor  # (n_nodes, V) next node, or the item row at the last level; -1 = invalid code
    child_ptr: torch.Tensor  # (n_nodes + 1,) CSR: node n's valid codes are child_code[child_ptr[n]:child_ptr[n + 1]]
    child_code: torch.Tensor  # (n_edges,) ascending within a node
    depth: int
    max_children: int  # the largest fan-out (sizes the kernels' blocks)
    item_path: torch.Tensor  # (N, D - 1) the prefix nodes of each item, depth 1 .. D - 1

    @classmethod
    def from_prefix_trie(cls, trie, device="cpu") -> "Trie":
        fanout = np.diff(trie.child_ptr)
        parent = np.repeat(np.arange(trie.n_nodes), fanout)  # of each CSR entry
        leaf = trie.node_depth[parent] == trie.depth - 1
        item_parent = np.empty(trie.n_items, dtype=np.int64)
        item_parent[trie.child_target[leaf]] = parent[leaf]
        node_parent = np.zeros(trie.n_nodes, dtype=np.int64)
        node_parent[trie.child_target[~leaf]] = parent[~leaf]
        path = [item_parent]
        for _ in range(trie.depth - 2):
            path.insert(0, node_parent[path[0]])
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        return cls(t(trie.child), t(trie.child_ptr), t(trie.child_code), trie.depth, int(fanout.max()),
                   t(np.stack(path, 1)))

    def dead_prefixes(self, exclude: torch.Tensor) -> torch.Tensor:
        """(B, N) excluded items -> (B, n_nodes) bool: prefixes all of whose items are excluded, so a beam that
        entered them could only end empty."""
        b, n_nodes = exclude.shape[0], len(self.child)
        excluded = torch.zeros(b, n_nodes, device=exclude.device)
        total = torch.zeros(n_nodes, device=exclude.device)
        for d in range(self.item_path.shape[1]):
            excluded.index_add_(1, self.item_path[:, d], exclude.float())
            total.index_add_(0, self.item_path[:, d], torch.ones(len(self.item_path), device=exclude.device))
        return (total > 0) & (excluded >= total)

    def valid(self, node: torch.Tensor, width: int) -> torch.Tensor:
        """(R,) nodes (-1 = dead) -> (R, width) bool of valid child codes."""
        return valid_children_mask(node, self.child_ptr, self.child_code, width)

    def topk(self, logits: torch.Tensor, node: torch.Tensor, base: torch.Tensor, k: int):
        """Top-k of base + constrained log-probability over each row's valid children (Triton on CUDA)."""
        return constrained_topk(logits, node, self.child_ptr, self.child_code, base, k, self.max_children)


@dataclass
class Recommendations:
    items: torch.Tensor  # (B, K) catalog rows, -1 where fewer than K items could be returned
    scores: torch.Tensor  # (B, K) log P(item | history) (+ rescore * item score), -inf where items is -1


@torch.no_grad()
def beam_search(model: Recommender, trie: Trie, history: torch.Tensor, beam_width: int, k: int,
                exclude: torch.Tensor | None = None) -> Recommendations:
    """history: (B, T) catalog rows, -1 left padding. Returns the top-k complete beams of width `beam_width` >= k,
    ranked by log P(item | history), plus the model's item-level score times cfg.rescore when that is set.
    exclude: optional (B, N) bool of items never to return (e.g. the items already in the history)."""
    assert k <= beam_width, f"k={k} must not exceed beam_width={beam_width}"
    b = history.shape[0]
    device = history.device
    ctx = model.context(history)
    state, cache = model.start(ctx)  # (B, d)
    node = torch.zeros(b, 1, dtype=torch.long, device=device)  # (B, W) trie node of each beam
    score = torch.zeros(b, 1, device=device)  # (B, W) log-prob of each beam's prefix
    dead = trie.dead_prefixes(exclude) if exclude is not None else None
    for level in range(trie.depth):
        v = model.vocab_sizes[level]
        w = node.shape[1]
        logits = model.level_logits(state, level, node.view(-1))  # (B*W, V)
        if exclude is not None:  # excluded items, and prefixes holding only excluded items, are never chosen
            children = trie.child[node.clamp_min(0).view(-1), :v]  # (B*W, V)
            blocked = exclude if level == trie.depth - 1 else dead  # (B, N) or (B, n_nodes)
            # Each row's beams read its own mask: (B, W*V) lookups, never a (B*W, N) copy of the mask.
            banned = blocked.gather(1, children.clamp_min(0).view(b, w * v)).view(b * w, v) & (children >= 0)
            logits = logits.masked_fill(banned, float("-inf"))
        # Each beam's best children first (the fused kernel), then the best of those across the row's beams.
        per_beam = min(beam_width, v)
        cand_score, cand_code = trie.topk(logits, node.view(-1), score.view(-1), per_beam)  # (B*W, per_beam)
        score, flat = cand_score.reshape(b, w * per_beam).topk(min(beam_width, w * per_beam), dim=1)  # (B, W')
        parent = flat // per_beam
        code = cand_code.reshape(b, w * per_beam).gather(1, flat).clamp_min(0)
        rows = (parent + torch.arange(b, device=device).unsqueeze(1) * w).view(-1)  # beam rows in (B*W)
        node = trie.child[node.view(-1)[rows].clamp_min(0), code.view(-1)].view(b, -1)
        node = torch.where(torch.isfinite(score), node, torch.full_like(node, -1))
        if level < trie.depth - 1:
            cache.select(rows)
            state = model.step(code.view(-1), level, cache)
    if model.cfg.rescore:  # the generator proposed the beam's items; one dot product each re-ranks them
        score = score + model.cfg.rescore * model.item_scores(ctx, node)  # -inf stays on pruned beams
        score, order = score.sort(1, descending=True)
        node = node.gather(1, order)
    return Recommendations(node[:, :k], score[:, :k])  # sorted by score: topk, or the sort above


@dataclass
class Samples:
    items: torch.Tensor  # (B, n) catalog rows
    codes: torch.Tensor  # (B, n, D) the sampled SID codes
    logp: torch.Tensor  # (B, n) log P(item | history) under the constrained policy at temperature 1
    states: torch.Tensor  # (B, n, D, d) decoder state of each prefix (position l: the first l codes)
    prefix_logp: torch.Tensor  # (B, n, D) log P(first l codes | history) at temperature 1 (0 at l = 0)


@torch.no_grad()
def sample(model: Recommender, trie: Trie, history: torch.Tensor, n: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> Samples:
    """n independent constrained samples per user (repeats possible): every code is drawn from the policy's
    distribution over the trie-valid children of the prefix, sharpened or flattened by `temperature`."""
    assert temperature > 0, "temperature must be positive"
    b = history.shape[0]
    state, cache = model.start(model.context(history).repeat_interleave(n, 0))
    node = torch.zeros(b * n, dtype=torch.long, device=history.device)
    logp = torch.zeros(b * n, device=history.device)
    codes, states, prefix_logp = [], [], []
    for level in range(trie.depth):
        states.append(state)
        prefix_logp.append(logp.clone())
        logits = model.level_logits(state, level, node)
        valid = trie.valid(node, logits.shape[1])
        probs = masked_log_softmax(logits / temperature, valid).exp()
        code = torch.multinomial(probs, 1, generator=generator)[:, 0]
        logp += masked_log_softmax(logits, valid).gather(1, code[:, None])[:, 0]
        codes.append(code)
        node = trie.child[node, code]
        if level < trie.depth - 1:
            state = model.step(code, level, cache)
    return Samples(node.view(b, n), torch.stack(codes, 1).view(b, n, -1), logp.view(b, n),
                   torch.stack(states, 1).view(b, n, trie.depth, -1), torch.stack(prefix_logp, 1).view(b, n, -1))
