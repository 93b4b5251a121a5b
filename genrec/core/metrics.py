"""Top-K ranking metrics for leave-one-out evaluation (one relevant item per user)."""

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
