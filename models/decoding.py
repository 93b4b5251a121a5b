"""Trie-constrained decoding of semantic IDs: every returned item is a real catalog item, distinct within a row.

beam_search: batched constrained beam search (the baseline every paper compares with). Log-probabilities are
renormalised over the trie-valid children of each prefix, so a complete path's score is log P(item | history) under
the constrained policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.recommender import Recommender


@dataclass
class Trie:
    """The prefix trie as tensors on the model's device (see models.semantic_ids.PrefixTrie)."""

    child: torch.Tensor  # (n_nodes, V) next node, or the item row at the last level; -1 = invalid code
    depth: int

    @classmethod
    def from_prefix_trie(cls, trie, device="cpu") -> "Trie":
        return cls(torch.as_tensor(trie.child, device=device), trie.depth)


@dataclass
class Recommendations:
    items: torch.Tensor  # (B, K) catalog rows, -1 where fewer than K items could be returned
    scores: torch.Tensor  # (B, K) log P(item | history), -inf where items is -1


def masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log-softmax over the valid entries of each row; invalid entries (and rows with none valid) get -inf."""
    masked = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    return torch.where(valid, masked - lse, torch.full_like(masked, float("-inf")))


@torch.no_grad()
def beam_search(model: Recommender, trie: Trie, history: torch.Tensor, beam_width: int, k: int,
                exclude: torch.Tensor | None = None) -> Recommendations:
    """history: (B, T) catalog rows, -1 left padding. Returns the top-k complete beams of width `beam_width` >= k.
    exclude: optional (B, N) bool of items never to return (e.g. the items already in the history)."""
    assert k <= beam_width, f"k={k} must not exceed beam_width={beam_width}"
    b = history.shape[0]
    device = history.device
    state, cache = model.start(model.context(history))  # (B, d)
    node = torch.zeros(b, 1, dtype=torch.long, device=device)  # (B, W) trie node of each beam
    score = torch.zeros(b, 1, device=device)  # (B, W) log-prob of each beam's prefix
    for level in range(trie.depth):
        v = model.vocab_sizes[level]
        w = node.shape[1]
        child = trie.child[node.clamp_min(0).view(-1), :v]  # (B*W, V)
        valid = (child >= 0) & (node.view(-1, 1) >= 0)
        if exclude is not None and level == trie.depth - 1:
            row_exclude = exclude.repeat_interleave(w, 0).gather(1, child.clamp_min(0))
            valid &= ~row_exclude
        logp = masked_log_softmax(model.level_logits(state, level), valid)  # (B*W, V)
        total = (score.view(-1, 1) + logp).view(b, w * v)
        score, flat = total.topk(min(beam_width, w * v), dim=1)  # (B, W')
        parent, code = flat // v, flat % v
        rows = (parent + torch.arange(b, device=device).unsqueeze(1) * w).view(-1)  # beam rows in (B*W)
        node = child[rows, code.view(-1)].view(b, -1)
        node = torch.where(torch.isfinite(score), node, torch.full_like(node, -1))
        if level < trie.depth - 1:
            cache.select(rows)
            state = model.step(code.view(-1), level, cache)
    score, order = score[:, :k], node[:, :k]  # beams come sorted by score from topk
    return Recommendations(order, score)
