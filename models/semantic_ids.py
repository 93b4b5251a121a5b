"""Semantic IDs: residual k-means (FAISS) over item vectors, a collision code, and the prefix trie (TIGER, RQ-KMeans).

Every item gets a tuple (c_1, ..., c_L, c_dedup), or (c_1, ..., c_L) when no two items share their residual codes. The map items <-> tuples is a bijection, and the trie of all tuples
constrains decoding so that every generated tuple is a real item.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment

from genrec.core.config import SemanticIdConfig


@dataclass
class SemanticIds:
    codes: np.ndarray  # (N, L) or (N, L + 1) int64: L residual codes, then the collision code if there is one
    codebooks: np.ndarray  # (L, K, D) float32 centroids
    vocab_sizes: tuple[int, ...]  # codes per position: K for each level, then the largest collision group

    @property
    def n_items(self) -> int:
        return len(self.codes)

    @property
    def depth(self) -> int:
        return self.codes.shape[1]

    def stats(self) -> dict:
        """Codebook utilisation per level and collisions on the residual codes (before the collision code)."""
        levels = len(self.codebooks)
        _, group = np.unique(self.codes[:, :levels], axis=0, return_counts=True)
        return {
            "utilisation": [len(np.unique(self.codes[:, lv])) / self.codebooks.shape[1] for lv in range(levels)],
            "collision_rate": float(group[group > 1].sum() / self.n_items),
            "largest_collision_group": int(group.max()),
            "distinct_prefixes": int(len(group)),
        }


def unique_assign(residual: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """One-to-one assignment of n <= K items to centroids with the least total squared distance (exact: the
    Hungarian method, milliseconds for K = 256)."""
    d = ((residual[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (n, K)
    rows, cols = linear_sum_assignment(d)
    assigned = np.empty(len(residual), dtype=np.int64)
    assigned[rows] = cols
    return assigned


def build_semantic_ids(vectors: np.ndarray, cfg: SemanticIdConfig, verbose: bool = False) -> SemanticIds:
    """Residual k-means: level l clusters the residuals left by levels < l. Returns codes and codebooks."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    k = cfg.codebook_size
    if n < k:
        raise ValueError(f"{n} items are fewer than codebook_size={k}: lower semantic_ids.codebook_size "
                         f"to at most {n} (the demo preset uses 32)")
    residual = vectors.copy()
    codes = np.zeros((n, cfg.levels + 1), dtype=np.int64)
    codebooks = np.zeros((cfg.levels, k, dim), dtype=np.float32)
    for level in range(cfg.levels):
        km = faiss.Kmeans(dim, k, niter=cfg.kmeans_iters, seed=cfg.seed + level, verbose=verbose,
                          max_points_per_centroid=100_000, spherical=False)
        km.train(residual)
        centroids = km.centroids.copy()
        _, assign = km.index.search(residual, 1)
        assign = assign[:, 0].astype(np.int64)
        if level == cfg.levels - 1 and cfg.unique_last_level and cfg.levels > 1:
            prefix = codes[:, :level]
            _, group_of = np.unique(prefix, axis=0, return_inverse=True)
            for g in np.unique(group_of):
                members = np.flatnonzero(group_of == g)
                if len(members) > 1 and len(members) <= k:
                    assign[members] = unique_assign(residual[members], centroids)
        codes[:, level] = assign
        codebooks[level] = centroids
        residual -= centroids[assign]
    # Collision code: the rank of an item inside its group of identical residual codes.
    _, group_of = np.unique(codes[:, : cfg.levels], axis=0, return_inverse=True)
    order = np.argsort(group_of, kind="stable")
    sorted_groups = group_of[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    codes[order, cfg.levels] = rank
    if cfg.collision_code == "auto" and rank.max() == 0:  # no collisions: the residual codes name each item
        return SemanticIds(codes[:, : cfg.levels].copy(), codebooks, (k,) * cfg.levels)
    return SemanticIds(codes, codebooks, tuple([k] * cfg.levels + [int(rank.max()) + 1]))


class PrefixTrie:
    """All SID tuples as a trie, held as CSR arrays only (no dense node x code table: that is 2 GB at a million
    items). Node 0 is the root; a node at depth d < D has children keyed by code; the children of the last inner
    level are the item rows themselves.

    Node n's valid codes are `child_code[child_ptr[n]:child_ptr[n + 1]]` (ascending), their targets `child_target[...]`.
    CSR order is node-major with ascending codes, so the edge keys node * vocab + code are sorted: a binary search
    finds any child (`child`).
    """

    def __init__(self, codes: np.ndarray, vocab_sizes: tuple[int, ...]):
        n, depth = codes.shape
        if len(vocab_sizes) != depth or (codes < 0).any() or (codes >= np.asarray(vocab_sizes)).any():
            raise ValueError(f"semantic ID codes must lie in [0, vocab size) at each of the {len(vocab_sizes)} "
                             f"positions {tuple(vocab_sizes)}")
        self.depth, self.vocab, self.n_items = depth, max(vocab_sizes), n
        node_of = np.zeros(n, dtype=np.int64)  # each item's prefix node at the current depth (the root first)
        next_id, edges, node_depth = 1, [], [np.zeros(1, dtype=np.int64)]
        for d in range(depth):
            if d < depth - 1:  # internal nodes: one per distinct prefix of length d + 1
                _, first, inv = np.unique(codes[:, : d + 1], axis=0, return_index=True, return_inverse=True)
                edges.append((node_of[first], codes[first, d], next_id + np.arange(len(first))))
                node_of = next_id + inv.reshape(-1)
                next_id += len(first)
                node_depth.append(np.full(len(first), d + 1, dtype=np.int64))
            else:  # leaves: the item rows themselves
                edges.append((node_of, codes[:, d], np.arange(n)))
        self.n_nodes = next_id
        self.node_depth = np.concatenate(node_depth)
        parent, code, target = (np.concatenate(e).astype(np.int64) for e in zip(*edges))
        key = parent * self.vocab + code
        order = np.argsort(key, kind="stable")
        self.child_key = key[order]
        if (np.diff(self.child_key) == 0).any():
            raise ValueError("two items share one semantic ID: the item <-> SID map is not a bijection")
        self.child_ptr = np.r_[0, np.cumsum(np.bincount(parent, minlength=self.n_nodes))].astype(np.int64)
        self.child_code = code[order]
        self.child_target = target[order]

    def child(self, node, code) -> np.ndarray:
        """The child of `node` under `code` (broadcast): a node id, or the item row below the last inner level;
        -1 where the code is not a valid child (or node is -1)."""
        node, code = np.broadcast_arrays(np.asarray(node, dtype=np.int64), np.asarray(code, dtype=np.int64))
        key = node * self.vocab + code
        at = np.minimum(np.searchsorted(self.child_key, key), len(self.child_key) - 1)
        hit = (self.child_key[at] == key) & (node >= 0) & (code >= 0) & (code < self.vocab)
        return np.where(hit, self.child_target[at], -1)
