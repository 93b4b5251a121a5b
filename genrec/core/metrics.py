"""Top-K ranking metrics: leave-one-out (one relevant item per user), and over a window of the user's next items."""

from __future__ import annotations

import numpy as np


def hit_ranks(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """topk (N, K) ranked item ids, targets (N,) -> 0-based rank of the target in its row, or -1 if absent.
    Padding (-1) and duplicates after the first occurrence never count as a hit."""
    topk, targets = np.asarray(topk), np.asarray(targets)
    match = topk == targets[:, None]
    return np.where(match.any(1), match.argmax(1), -1)


def recall_at(ranks: np.ndarray, k: int) -> float:
    return float(((ranks >= 0) & (ranks < k)).mean()) if len(ranks) else 0.0


def ndcg_at(ranks: np.ndarray, k: int) -> float:
    """With one relevant item the ideal DCG is 1, so NDCG@k = 1 / log2(rank + 2) for a hit within k."""
    if not len(ranks):
        return 0.0
    hit = (ranks >= 0) & (ranks < k)
    return float(np.where(hit, 1.0 / np.log2(np.clip(ranks, 0, None) + 2.0), 0.0).mean())


def metrics_from_ranks(ranks: np.ndarray, ks=(5, 10)) -> dict[str, float]:
    """Recall and NDCG at each k from 0-based target ranks (-1 = miss)."""
    return {f"{m}@{k}": f(ranks, k) for k in ks for m, f in (("recall", recall_at), ("ndcg", ndcg_at))}


def ranking_metrics(topk: np.ndarray, targets: np.ndarray, ks=(5, 10)) -> dict[str, float]:
    """Recall and NDCG at each k of ranked lists (N, K) against one target per row."""
    return metrics_from_ranks(hit_ranks(topk, targets), ks)


def window_metrics(topk: np.ndarray, window: np.ndarray, ks=(10,)) -> dict[str, float]:
    """Ranked lists (N, K) against each user's window of next items (N, H), -1 = no item: window-Recall@k (share of
    the window's distinct items in the top k) and window-NDCG@k (gain 1 per window item, ideal DCG over the window)."""
    topk, window = np.asarray(topk), np.asarray(window)
    out = {}
    for k in ks:
        top = topk[:, :k]
        # A slot is a hit if it holds a window item not already counted earlier in the row.
        hit = (top[:, :, None] == window[:, None, :]).any(2) & (top >= 0)
        hit &= ~np.triu(top[:, :, None] == top[:, None, :], 1).any(1)  # a repeat of an earlier slot is no hit
        size = np.array([len(set(w[w >= 0].tolist())) for w in window])
        discount = 1.0 / np.log2(np.arange(k) + 2.0)
        dcg = (hit * discount[: top.shape[1]]).sum(1)
        ideal = np.array([discount[: min(n, k)].sum() for n in size])
        ok = size > 0
        out[f"window_recall@{k}"] = float((hit.sum(1)[ok] / size[ok]).mean()) if ok.any() else 0.0
        out[f"window_ndcg@{k}"] = float((dcg[ok] / ideal[ok]).mean()) if ok.any() else 0.0
    return out
