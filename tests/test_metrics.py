import math

import numpy as np
import pytest

from genrec.core.metrics import hit_ranks, ranking_metrics


def test_hand_worked_example():
    topk = np.array([
        [7, 3, 9, 1, 2, 4, 5, 6, 8, 0],   # target 7 at rank 0
        [1, 2, 3, 4, 5, 6, 8, 0, 9, 7],   # target 7 at rank 9
        [1, 2, 3, 4, 5, 6, 8, 0, 9, 10],  # target 7 missing
        [1, 2, 7, 4, 5, 6, 8, 0, 9, 10],  # target 7 at rank 2
    ])
    targets = np.array([7, 7, 7, 7])
    assert hit_ranks(topk, targets).tolist() == [0, 9, -1, 2]
    m = ranking_metrics(topk, targets)
    assert m["recall@5"] == 2 / 4
    assert m["recall@10"] == 3 / 4
    assert math.isclose(m["ndcg@5"], (1.0 + 1 / math.log2(4)) / 4)
    assert math.isclose(m["ndcg@10"], (1.0 + 1 / math.log2(11) + 1 / math.log2(4)) / 4)


def test_padding_is_a_miss_and_a_duplicate_hit_counts_once():
    topk = np.array([[-1, -1, 5], [5, 5, 5], [-1, -1, -1]])
    assert hit_ranks(topk, np.array([5, 5, 3])).tolist() == [2, 0, -1]
    m = ranking_metrics(topk, np.array([5, 5, 3]), ks=(1, 3))
    assert m["recall@1"] == 1 / 3 and m["recall@3"] == 2 / 3
    assert math.isclose(m["ndcg@3"], (1 / math.log2(4) + 1.0) / 3)


def test_empty_input():
    assert ranking_metrics(np.zeros((0, 10), dtype=int), np.zeros(0, dtype=int))["ndcg@10"] == 0.0


def test_window_metrics_by_hand():
    """Gain 1 per window item in the list, ideal DCG over the window; a repeated item counts once; a window of one
    item (the sequence ended) is judged on that item alone."""
    from genrec.core.metrics import window_metrics

    top = np.array([[5, 3, 7, 1], [1, 2, 3, 4], [9, 9, 8, 0], [6, 0, 2, 3]])
    window = np.array([[3, 5], [8, 9], [9, -1], [2, 7]])
    got = window_metrics(top, window, ks=(4,))
    ideal2 = 1 + 1 / math.log2(3)
    ndcg = [1.0, 0.0, 1.0, (1 / math.log2(4)) / ideal2]
    assert got["window_ndcg@4"] == pytest.approx(sum(ndcg) / 4)
    assert got["window_recall@4"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
