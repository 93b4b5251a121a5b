"""Collaborative item vectors from co-occurrence: which items users take near each other, with no model to train.

Semantic IDs clustered from text alone put items that read alike under one prefix, even when different people buy
them; joined with these vectors they also follow behaviour (the idea of LETTER and ETEGRec's collaborative
tokenizers), and a catalog without text can be tokenized from them alone. The vectors are the truncated SVD of the
positive pointwise mutual information (PPMI) of items that appear within `window` positions of each other in the
training sequences (Levy & Goldberg's word-embedding result, applied to item sequences).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds


def cooccurrence(seqs: list[np.ndarray], n_items: int, window: int) -> sp.csr_matrix:
    """Symmetric (N, N) counts of item pairs at most `window` positions apart in a sequence (a repeated item with
    itself is not counted)."""
    rows, cols = [], []
    for s in seqs:
        s = np.asarray(s, dtype=np.int64)
        for gap in range(1, min(window, len(s) - 1) + 1):
            rows.append(s[:-gap])
            cols.append(s[gap:])
    if not rows:
        return sp.csr_matrix((n_items, n_items), dtype=np.float64)
    r, c = np.concatenate(rows), np.concatenate(cols)
    keep = r != c
    r, c = r[keep], c[keep]
    counts = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(n_items, n_items)).tocsr()
    return counts + counts.T


def ppmi(counts: sp.csr_matrix) -> sp.csr_matrix:
    """max(0, log(P(i, j) / (P(i) P(j)))) on the non-zero counts."""
    counts = counts.tocoo()
    total = counts.sum()
    marginal = np.asarray(counts.sum(1)).ravel()
    pmi = np.log(counts.data * total / (marginal[counts.row] * marginal[counts.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (counts.row[keep], counts.col[keep])), shape=counts.shape)


def cooccurrence_vectors(seqs: list[np.ndarray], n_items: int, dim: int = 64, window: int = 3,
                         seed: int = 0) -> np.ndarray:
    """(N, dim) float32 unit vectors, U sqrt(S) of the PPMI matrix's top `dim` singular triplets; items that never
    co-occur with another get a zero row (the caller falls back on their text)."""
    m = ppmi(cooccurrence(seqs, n_items, window))
    k = min(dim, n_items - 1, max(1, m.nnz))
    if m.nnz == 0:
        return np.zeros((n_items, dim), dtype=np.float32)
    u, s, _ = svds(m, k=k, random_state=seed)  # ascending singular values; the order does not matter downstream
    vectors = np.zeros((n_items, dim), dtype=np.float32)
    vectors[:, :k] = u * np.sqrt(s)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def join_vectors(text: np.ndarray, collaborative: np.ndarray, weight: float) -> np.ndarray:
    """The vectors the semantic IDs are clustered from: [sqrt(1 - w) text, sqrt(w) collaborative] of unit parts, so
    `weight` is the collaborative share of every squared distance; an item without collaborative signal keeps its
    text part alone."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    return np.hstack([np.sqrt(1 - weight) * unit(text), np.sqrt(weight) * collaborative]).astype(np.float32)
