import numpy as np
import pytest

from genrec.core.config import SemanticIdConfig
from genrec.models.semantic_ids import PrefixTrie, build_semantic_ids, unique_assign


def clustered(n=2000, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, dim))
    x = centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("unique_last_level", [True, False])
def test_codes_are_a_bijection_and_the_trie_holds_every_item(unique_last_level):
    x = clustered()
    sid = build_semantic_ids(x, SemanticIdConfig(codebook_size=16, kmeans_iters=10, unique_last_level=unique_last_level))
    assert len({tuple(c) for c in sid.codes}) == len(x)  # injective, hence a bijection onto its tuples
    assert all(sid.codes[:, lv].max() < v for lv, v in enumerate(sid.vocab_sizes))
    trie = PrefixTrie(sid.codes, sid.vocab_sizes)
    for row in range(len(x)):  # walking an item's codes from the root ends at that item
        node = 0
        for code in sid.codes[row]:
            node = trie.child(node, code)
        assert node == row
    # each node's CSR run lists exactly the codes its items continue with, ascending, and `child` finds each of them
    continuations = {}
    for codes in sid.codes.tolist():
        node = 0
        for code in codes:
            continuations.setdefault(node, set()).add(code)
            node = int(trie.child(node, code))
    for node in range(trie.n_nodes):
        lo, hi = trie.child_ptr[node], trie.child_ptr[node + 1]
        assert trie.child_code[lo:hi].tolist() == sorted(continuations.get(node, ()))
        assert (trie.child(node, np.arange(trie.vocab)) >= 0).sum() == hi - lo
    assert trie.child_ptr[-1] == trie.n_nodes - 1 + len(x)  # one edge into every node but the root, and each leaf


def test_unique_last_level_reduces_collisions():
    x = clustered(3000)
    plain = build_semantic_ids(x, SemanticIdConfig(codebook_size=16, kmeans_iters=10, unique_last_level=False))
    unique = build_semantic_ids(x, SemanticIdConfig(codebook_size=16, kmeans_iters=10, unique_last_level=True))
    assert unique.stats()["collision_rate"] < plain.stats()["collision_rate"]
    assert unique.stats()["utilisation"][0] == 1.0


@pytest.mark.parametrize("collision_code", ["auto", "always"])
def test_the_collision_code_is_appended_only_when_items_collide(collision_code):
    x = np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32)  # about 8 items per first code
    sid = build_semantic_ids(x, SemanticIdConfig(levels=2, codebook_size=16, kmeans_iters=10,
                                                 collision_code=collision_code))
    assert sid.stats()["collision_rate"] == 0.0
    if collision_code == "auto":
        assert sid.depth == 2 and sid.vocab_sizes == (16, 16)
    else:  # a level of one code
        assert sid.depth == 3 and sid.vocab_sizes == (16, 16, 1) and (sid.codes[:, 2] == 0).all()
    PrefixTrie(sid.codes, sid.vocab_sizes)
    crowded = build_semantic_ids(clustered(3000), SemanticIdConfig(levels=1, codebook_size=16, kmeans_iters=10))
    assert crowded.depth == 2 and crowded.vocab_sizes[1] > 1  # 3000 items under 16 codes must collide
    assert len({tuple(c) for c in crowded.codes}) == 3000


def test_duplicate_codes_are_rejected():
    codes = np.array([[0, 1, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="not a bijection"):
        PrefixTrie(codes, (2, 2, 1))


def test_too_small_catalog_says_what_to_change():
    with pytest.raises(ValueError, match="lower semantic_ids.codebook_size"):
        build_semantic_ids(clustered(10), SemanticIdConfig(codebook_size=16))


def test_unique_assign_is_the_cheapest_one_to_one_matching():
    from itertools import permutations

    rng = np.random.default_rng(3)
    for n, k in ((1, 4), (4, 4), (5, 7)):
        residual, centroids = rng.normal(size=(n, 3)), rng.normal(size=(k, 3))
        cost = ((residual[:, None] - centroids[None]) ** 2).sum(-1)
        got = unique_assign(residual, centroids)
        assert len(set(got.tolist())) == n  # one item per code
        best = min(cost[np.arange(n), list(p)].sum() for p in permutations(range(k), n))  # brute force
        assert cost[np.arange(n), got].sum() == pytest.approx(best)


def test_codes_outside_their_vocabulary_are_refused():
    with pytest.raises(ValueError, match="must lie in"):
        PrefixTrie(np.array([[0, 1], [0, 5]]), (4, 4))  # 5 would alias into the next node's CSR run
    with pytest.raises(ValueError, match="must lie in"):
        PrefixTrie(np.array([[0, -1]]), (4, 4))
