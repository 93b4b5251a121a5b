"""Triton kernels against their torch references, through the Triton interpreter on CPU (TRITON_INTERPRET=1, set in
conftest): odd shapes, dead rows, one valid child, all children valid, ties, -inf logits, k beyond the fan-out."""

import itertools

import numpy as np
import pytest
import torch

from genrec.kernels import LAUNCHED, constrained_topk, node_priority
from genrec.kernels.constrained_topk import constrained_topk_torch, constrained_topk_triton, masked_log_softmax
from genrec.kernels.ved_scores import node_priority_torch, node_priority_triton, ved_scores_torch
from genrec.models.semantic_ids import PrefixTrie
from genrec.models.trie import Trie


def csr(trie: PrefixTrie):
    return torch.as_tensor(trie.child_ptr), torch.as_tensor(trie.child_code)


@pytest.fixture(scope="module")
def odd_trie():
    """Depth 3, vocab (7, 5, 3): a root with 7 children, nodes with a single child and nodes with all children."""
    rng = np.random.default_rng(3)
    full = [(0, b, c) for b in range(5) for c in range(3)]  # under code 0: every child valid at both levels
    single = [(1, 2, 1)]  # under code 1: one child, then one child
    rest = {tuple(int(x) for x in rng.integers(0, [7, 5, 3])) for _ in range(40)} - set(full) - set(single)
    rest = [t for t in rest if t[0] >= 2]
    codes = np.array(full + single + sorted(rest))
    return PrefixTrie(codes, (7, 5, 3))


def all_rows(trie: PrefixTrie) -> torch.Tensor:
    """Every internal node once, plus dead rows (-1)."""
    internal = np.flatnonzero(trie.node_depth < trie.depth)
    return torch.as_tensor(np.r_[internal, -1, internal[:3], -1])


@pytest.mark.parametrize("k", [1, 2, 3, 7, 9])
def test_constrained_topk_matches_reference(odd_trie, k):
    g = torch.Generator().manual_seed(k)
    node = all_rows(odd_trie)
    logits = torch.randn(len(node), 7, generator=g) * 3
    logits[::4, 1] = float("-inf")  # -inf logits on some valid children
    logits[5] = float("-inf")  # a row whose every logit is -inf
    logits[6, :] = 0.25  # a row of ties
    base = torch.randn(len(node), generator=g)
    base[2] = float("-inf")  # a dead beam's score
    ptr, code = csr(odd_trie)
    want_v, want_c = constrained_topk_torch(logits, node, ptr, code, base, k)
    got_v, got_c = constrained_topk_triton(logits, node, ptr, code, base, k)
    assert torch.equal(got_c, want_c)
    torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-5)


def test_constrained_topk_reference_is_the_masked_log_softmax(odd_trie):
    """The reference against first principles: each row's valid children, brute force."""
    node = all_rows(odd_trie)
    logits = torch.randn(len(node), 7, generator=torch.Generator().manual_seed(0))
    base = torch.zeros(len(node))
    values, codes = constrained_topk_torch(logits, node, *csr(odd_trie), base, 7)
    for r, n in enumerate(node.tolist()):
        kids = [] if n < 0 else [c for c in range(7) if odd_trie.child(n, c) >= 0]
        assert sorted(c for c in codes[r].tolist() if c >= 0) == kids
        if kids:
            lp = torch.log_softmax(logits[r, kids], 0)
            got = {c: v for c, v in zip(codes[r].tolist(), values[r].tolist()) if c >= 0}
            assert [got[c] for c in kids] == pytest.approx(lp.tolist(), abs=1e-5)
        if n >= 0 and len(kids) == 1:
            assert values[r, 0].item() == 0.0  # a single valid child is certain


def test_ties_go_to_the_smaller_code(odd_trie):
    root = torch.tensor([0])
    values, codes = constrained_topk_triton(torch.zeros(1, 7), root, *csr(odd_trie), torch.zeros(1), 4)
    assert codes[0].tolist() == [0, 1, 2, 3]
    assert values[0].tolist() == pytest.approx([-np.log(7)] * 4)


def test_masked_log_softmax_never_nan():
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3])
    valid = torch.tensor([[True, True, False], [True, True, False]])
    out = masked_log_softmax(logits, valid)
    assert not out.isnan().any()
    assert out[0, 0].item() == 0.0 and (out[0, 1:] == float("-inf")).all() and (out[1] == float("-inf")).all()


def random_forest(trie: PrefixTrie, users: int, slots: int, seed: int):
    """Random VED trees: live slots hold internal nodes at their depth; some slots are dead; the root is slot 0."""
    g = torch.Generator().manual_seed(seed)
    internal = np.flatnonzero(trie.node_depth < trie.depth)
    pick = torch.as_tensor(internal)[torch.randint(len(internal), (users, slots), generator=g)]
    pick[:, 0] = 0
    dead = torch.rand(users, slots, generator=g) < 0.3
    dead[:, 0] = False
    tnode = torch.where(dead, torch.full_like(pick, -1), pick)
    depth = torch.as_tensor(trie.node_depth)[tnode.clamp_min(0)]
    value = torch.randn(users, slots, generator=g)
    visits = torch.randint(0, 6, (users, slots), generator=g)
    logits = torch.randn(users, slots, trie.vocab, generator=g) * 2
    return logits, tnode, depth, value, visits


@pytest.mark.parametrize("users,slots", [(1, 1), (3, 5), (2, 17), (5, 9)])
def test_node_priority_matches_reference(odd_trie, users, slots):
    logits, tnode, depth, value, visits = random_forest(odd_trie, users, slots, seed=users * 100 + slots)
    logits[0, -1, :2] = float("-inf")
    logits[-1, 0] = float("-inf")  # a node whose every logit is -inf (all children excluded)
    rows = (logits.view(users * slots, -1), tnode.view(-1), value.view(-1), *csr(odd_trie), 0.1)
    want = node_priority_torch(*rows)
    got = node_priority_triton(*rows)
    for name, a, b in zip(["entropy", "G"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert (want[0][tnode.view(-1) < 0] == 0).all() and (want[1][tnode.view(-1) < 0] == 0).all()


def test_kernel_variants_are_compiled_at_warm_up_only(odd_trie, monkeypatch):
    """A server warms the kernels up once; then no beam width, k or batch a client sends launches a new variant
    (each would be a compilation on the request path on a GPU)."""
    monkeypatch.setenv("GENREC_KERNELS", "triton")
    trie = Trie.from_prefix_trie(odd_trie)
    LAUNCHED.clear()
    trie.warm_up_kernels()
    warmed = set(LAUNCHED)
    assert trie.max_children == 7 and {v[1] for v in warmed if v[0] == "constrained_topk"} == {1, 2, 4, 8}
    assert len([v for v in warmed if v[0] == "node_priority"]) == 1
    g = torch.Generator().manual_seed(0)
    for k in range(1, 21):
        node = all_rows(odd_trie)[: 1 + k % 7]
        logits = torch.randn(len(node), 7, generator=g)
        values, codes = trie.topk(logits, node, torch.zeros(len(node)), k)
        want = constrained_topk_torch(logits, node, *csr(odd_trie), torch.zeros(len(node)), k)
        assert codes.shape == (len(node), k) and torch.equal(codes, want[1])
        trie.priority(logits, node, torch.zeros(len(node)), 0.1)
    assert LAUNCHED == warmed


def test_ved_scores_reference_by_hand(odd_trie):
    """One user, three live nodes: the entropy, G, UCB and gate computed by hand."""
    ptr, code = csr(odd_trie)
    root_kids = [c for c in range(7) if odd_trie.child(0, c) >= 0]
    single = int(odd_trie.child(0, 1))  # the node under code 1 has one child
    full = int(odd_trie.child(0, 0))  # the node under code 0 has all five children
    tnode = torch.tensor([[0, single, full, -1]])
    depth = torch.tensor([[0, 1, 1, 0]])
    value = torch.tensor([[0.2, 0.3, -0.1, 9.0]])
    visits = torch.tensor([[3, 1, 0, 0]])
    logits = torch.zeros(1, 4, 7)
    h, g, u, gate = ved_scores_torch(logits, tnode, depth, value, visits, ptr, code, 0.1, 1.0, 3)
    expect_h = [np.log(len(root_kids)), 0.0, np.log(5), 0.0]  # uniform over valid children; one child: no entropy
    assert h[0].tolist() == pytest.approx(expect_h, abs=1e-5)
    expect_g = [0.2 + 0.1 * expect_h[0], 0.3, -0.1 + 0.1 * np.log(5), 0.0]
    assert g[0].tolist() == pytest.approx(expect_g, abs=1e-5)
    bonus = [np.sqrt(np.log(4) / (n + 1)) for n in (3, 1, 0)]
    assert u[0, :3].tolist() == pytest.approx([a + b for a, b in zip(expect_g, bonus)], abs=1e-5)
    assert u[0, 3].item() == 0.0
    # depth 1 mean G = (0.3 + (-0.1 + 0.1 ln 5)) / 2: the single-child node is above it, the other below
    assert gate[0].tolist() == [True, True, False, False]


def test_dispatch_uses_the_reference_on_cpu_and_triton_when_forced(odd_trie, monkeypatch):
    node = all_rows(odd_trie)
    logits = torch.randn(len(node), 7, generator=torch.Generator().manual_seed(1))
    base = torch.zeros(len(node))
    ref = constrained_topk(logits, node, *csr(odd_trie), base, 3)
    monkeypatch.setenv("GENREC_KERNELS", "triton")
    forced = constrained_topk(logits, node, *csr(odd_trie), base, 3)
    assert torch.equal(ref[1], forced[1]) and torch.allclose(ref[0], forced[0], atol=1e-5)
    monkeypatch.setenv("GENREC_KERNELS", "bogus")
    with pytest.raises(ValueError, match="GENREC_KERNELS"):
        node_priority(torch.zeros(1, 7), torch.zeros(1, dtype=torch.long), torch.zeros(1), *csr(odd_trie), 0.1)


def test_itertools_full_trie_every_child_valid():
    """A trie in which every code is valid at every level: the kernel sees full rows."""
    codes = np.array(list(itertools.product(range(4), range(3))))
    trie = PrefixTrie(codes, (4, 3))
    node = torch.as_tensor(np.flatnonzero(trie.node_depth < trie.depth))
    logits = torch.randn(len(node), 4, generator=torch.Generator().manual_seed(2))
    want = constrained_topk_torch(logits, node, *csr(trie), torch.zeros(len(node)), 4)
    got = constrained_topk_triton(logits, node, *csr(trie), torch.zeros(len(node)), 4)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-5)
    assert (got[1][1:, 3] == -1).all()  # level-2 nodes have three children: the fourth slot is empty
