"""The prefix trie on the model's device, and the items a request must never get back, both sparse.

Trie is a module of buffers, so it moves with the recommender that holds it: the recommender's node vectors, its
teacher-forced loss and every decoder read the one copy. It keeps the CSR arrays of
genrec.models.semantic_ids.PrefixTrie and nothing dense: a child is found by a binary search over the sorted edge keys
node * vocab + code, a row of children is scattered from the node's CSR run, so memory grows with the number of
items, never with nodes x codes.

Exclusion holds each row's excluded items (and the prefixes they empty) as sorted keys, built from the seen lists:
O(seen) memory per request, never a (B, N) mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from genrec.kernels import constrained_topk, node_priority, valid_children_mask, warm_up
from genrec.kernels.constrained_topk import csr_entries


def _member(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """query (any shape) -> bool, True where the value is in `keys` (sorted, 1-D)."""
    if len(keys) == 0:
        return torch.zeros_like(query, dtype=torch.bool)
    at = torch.searchsorted(keys, query.contiguous()).clamp_max(len(keys) - 1)
    return keys[at] == query


class Trie(nn.Module):
    """The prefix trie as CSR tensors (see genrec.models.semantic_ids.PrefixTrie)."""

    def __init__(self, child_ptr: torch.Tensor, child_code: torch.Tensor, child_target: torch.Tensor, vocab: int,
                 depth: int, item_path: torch.Tensor):
        super().__init__()
        self.vocab, self.depth = int(vocab), int(depth)
        self.n_nodes, self.n_items = len(child_ptr) - 1, len(item_path)
        fanout = child_ptr[1:] - child_ptr[:-1]
        self.max_children = int(fanout.max())  # the largest fan-out (sizes the kernels' blocks)
        node = torch.repeat_interleave(torch.arange(self.n_nodes, device=child_ptr.device), fanout)
        for name, value in [("child_ptr", child_ptr), ("child_code", child_code), ("child_target", child_target),
                            ("child_key", node * self.vocab + child_code),  # sorted: node-major, codes ascending
                            ("item_path", item_path),  # (N, D - 1) each item's prefix nodes, depth 1 .. D - 1
                            ("node_items", torch.bincount(item_path.reshape(-1), minlength=self.n_nodes))]:
            self.register_buffer(name, value, persistent=False)

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
        return cls(t(trie.child_ptr), t(trie.child_code), t(trie.child_target), trie.vocab, trie.depth,
                   t(np.stack(path, 1) if trie.depth > 1 else np.zeros((trie.n_items, 0), dtype=np.int64)))

    def child(self, node: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """The child of `node` under `code` (same shapes): a node id, or the item row below the last inner level;
        -1 where the code is not a valid child or the node is -1 (a pruned beam)."""
        key = node * self.vocab + code
        at = torch.searchsorted(self.child_key, key.contiguous()).clamp_max(len(self.child_key) - 1)
        hit = (self.child_key[at] == key) & (node >= 0) & (code >= 0) & (code < self.vocab)
        return torch.where(hit, self.child_target[at], -1)

    def child_table(self, node: torch.Tensor, width: int) -> torch.Tensor:
        """(R,) nodes -> (R, width) the child under each code, -1 where invalid. Cost: the valid children."""
        row, entry = csr_entries(node, self.child_ptr)
        table = torch.full((len(node), width), -1, dtype=torch.long, device=node.device)
        keep = self.child_code[entry] < width
        table[row[keep], self.child_code[entry[keep]]] = self.child_target[entry[keep]]
        return table

    def valid(self, node: torch.Tensor, width: int) -> torch.Tensor:
        """(R,) nodes (-1 = dead) -> (R, width) bool of valid child codes."""
        return valid_children_mask(node, self.child_ptr, self.child_code, width)

    def topk(self, logits: torch.Tensor, node: torch.Tensor, base: torch.Tensor, k: int):
        """Top-k of base + constrained log-probability over each row's valid children (Triton on CUDA). No node has
        more than max_children, so the kernel never runs wider than that (a fixed set of compiled variants, whatever
        k a client asks for); the columns beyond are -inf / -1."""
        kk = min(k, self.max_children)
        values, codes = constrained_topk(logits, node, self.child_ptr, self.child_code, base, kk, self.max_children)
        if kk < k:
            values = torch.cat([values, values.new_full((len(values), k - kk), float("-inf"))], 1)
            codes = torch.cat([codes, codes.new_full((len(codes), k - kk), -1)], 1)
        return values, codes

    def priority(self, logits: torch.Tensor, node: torch.Tensor, value: torch.Tensor, lam: float):
        """VED's entropy over each row's valid children and priority G = value + lam * H: (H (R,), G (R,))."""
        return node_priority(logits, node, value, self.child_ptr, self.child_code, lam, self.max_children)

    def warm_up_kernels(self) -> None:
        """Compile every kernel variant decoding over this trie can ask for (a no-op where the reference runs)."""
        warm_up(self.child_ptr, self.child_code, self.vocab, self.max_children)

    def exclusion(self, seen: torch.Tensor | Sequence[Sequence[int] | None]) -> "Exclusion":
        """The items each row must never get back: a (B, S) tensor of catalog rows (-1 = padding) or one list per
        row (None or empty: nothing excluded)."""
        if not isinstance(seen, torch.Tensor):
            seen = pad_rows(seen, self.child_ptr.device)
        seen = seen.to(self.child_ptr.device)
        rows = torch.arange(len(seen), device=seen.device).unsqueeze(1).expand_as(seen)
        ok = (seen >= 0) & (seen < self.n_items)
        items = torch.unique(rows[ok] * self.n_items + seen[ok])  # sorted, each (row, item) once
        row, item = items // self.n_items, items % self.n_items
        # A prefix is dead for a row when every item below it is excluded: count the row's excluded items per node.
        nodes = (row.unsqueeze(1) * self.n_nodes + self.item_path[item]).reshape(-1)
        nodes, count = torch.unique(nodes, return_counts=True)
        dead = nodes[count >= self.node_items[nodes % self.n_nodes]]
        return Exclusion(items, dead, self.n_items, self.n_nodes)


@dataclass
class Exclusion:
    """Per row of a batch, the items never to return and the prefixes holding only such items, as sorted keys
    row * N + item and row * n_nodes + node (see Trie.exclusion)."""

    items: torch.Tensor
    dead: torch.Tensor
    n_items: int
    n_nodes: int

    def blocks(self, row: torch.Tensor, target: torch.Tensor, items: bool) -> torch.Tensor:
        """row (broadcastable to target), target (R, C) item rows (items=True) or trie nodes, -1 = none -> bool:
        True where that row must not take that target."""
        keys, size = (self.items, self.n_items) if items else (self.dead, self.n_nodes)
        return _member(keys, row * size + target.clamp_min(0)) & (target >= 0)


def pad_rows(rows: Sequence[Sequence[int] | None], device="cpu") -> torch.Tensor:
    """Lists of catalog rows -> (B, S) long, -1 right padding."""
    width = max([len(r) for r in rows if r is not None] + [0])
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r is not None and len(r):
            out[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
    return out.to(device)
