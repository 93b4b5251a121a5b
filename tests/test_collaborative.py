"""Co-occurrence vectors against dense references, and the joined vectors semantic IDs are clustered from."""

import numpy as np
import pytest

from genrec.models.collaborative import cooccurrence, cooccurrence_vectors, join_vectors, ppmi


def dense_cooccurrence(seqs, n, window):
    counts = np.zeros((n, n))
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(len(s), i + window + 1)):
                if s[i] != s[j]:
                    counts[s[i], s[j]] += 1
                    counts[s[j], s[i]] += 1
    return counts


def test_counts_and_ppmi_match_dense_references():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 12, rng.integers(1, 9)) for _ in range(40)]
    for window in (1, 3):
        counts = dense_cooccurrence(seqs, 12, window)
        np.testing.assert_array_equal(cooccurrence(seqs, 12, window).toarray(), counts)
        p = counts / counts.sum()
        marginal = p.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = np.nan_to_num(np.maximum(np.log(p / np.outer(marginal, marginal)), 0), neginf=0.0)
        np.testing.assert_allclose(ppmi(cooccurrence(seqs, 12, window)).toarray(), expected, atol=1e-12)


def test_items_bought_together_get_close_vectors():
    # Two communities of items: sequences mix items of one community only. Item 40 is never bought.
    rng = np.random.default_rng(1)
    seqs = [rng.choice(np.arange(0, 20) if u % 2 else np.arange(20, 40), 6, replace=False) for u in range(400)]
    v = cooccurrence_vectors(seqs, 41, dim=8, window=2)
    assert v.shape == (41, 8) and not v[40].any()
    np.testing.assert_allclose(np.linalg.norm(v[:40], axis=1), 1.0, atol=1e-5)
    sim = v[:40] @ v[:40].T
    np.fill_diagonal(sim, -np.inf)
    community = np.arange(40) // 20
    assert (community[sim.argmax(1)] == community).all()  # every item's nearest neighbour is bought with it
    within = np.r_[sim[:20, :20][~np.eye(20, dtype=bool)], sim[20:, 20:][~np.eye(20, dtype=bool)]]
    assert np.abs(sim[:20, 20:]).max() < 0.05 < 0.3 < within.mean()


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_weight_is_the_collaborative_share_of_squared_distances(weight):
    rng = np.random.default_rng(2)
    text, collab = rng.normal(size=(5, 6)) * 3, rng.normal(size=(5, 4))
    collab /= np.linalg.norm(collab, axis=1, keepdims=True)
    joined = join_vectors(text, collab, weight)
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    d_text, d_collab = ((unit[0] - unit[1]) ** 2).sum(), ((collab[0] - collab[1]) ** 2).sum()
    assert ((joined[0] - joined[1]) ** 2).sum() == pytest.approx((1 - weight) * d_text + weight * d_collab, rel=1e-5)
