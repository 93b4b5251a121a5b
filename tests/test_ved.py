"""VED against beam search and first principles: valid distinct items, the budget counted in real forwards, batch
independence, determinism, and exact log-probability scores."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.core.config import RecommenderConfig, SemanticIdConfig, VedConfig
from genrec.models.decoding import Trie, beam_search
from genrec.models.recommender import Recommender
from genrec.models.semantic_ids import PrefixTrie, build_semantic_ids
from genrec.models.value import ValueHead, level_rewards, td_targets, window_level_rewards
from genrec.kernels.ved_scores import ved_scores_torch
from genrec.models.ved import beam_budget, grow_forest, ved_decode

N_ITEMS = 300


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1)
    sid = build_semantic_ids(rng.normal(size=(N_ITEMS, 16)).astype(np.float32),
                             SemanticIdConfig(codebook_size=8, kmeans_iters=5, unique_last_level=False))
    trie = PrefixTrie(sid.codes, sid.vocab_sizes)
    torch.manual_seed(1)
    cfg = RecommenderConfig(d_model=32, n_heads=2, n_layers=1, n_code_layers=2, dropout=0.0,
                            constrained_loss=True, node_embedding=True)
    model = Recommender(cfg, sid.vocab_sizes, torch.as_tensor(sid.codes), Trie.from_prefix_trie(trie)).eval()
    head = ValueHead(32).eval()
    with torch.no_grad():
        for p in [*model.parameters(), *head.parameters()]:
            p.mul_(6.0)
    return model, head, model.trie, sid


class CountingModel:
    """Wraps the recommender and counts the prefixes it is run on (the budget's unit): decoder starts and steps."""

    def __init__(self, model):
        self.model, self.forwards = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def start(self, ctx):
        self.forwards += len(ctx)
        return self.model.start(ctx)

    def step(self, code, level, cache):
        self.forwards += len(code)
        return self.model.step(code, level, cache)


@torch.no_grad()
def exact_logp(model, trie, history, item, codes):
    """log P(item | history) by teacher forcing, without any search."""
    ctx = model.context(history[None])
    states = model.decode_all(ctx, torch.as_tensor(codes[item][None, :-1]))[0]
    node, total = 0, 0.0
    for lv in range(trie.depth):
        logits = model.level_logits(states[lv][None], lv, torch.tensor([node]))[0]
        valid = trie.valid(torch.tensor([node]), logits.shape[0])[0]
        total += float(torch.log_softmax(logits.masked_fill(~valid, float("-inf")), 0)[codes[item][lv]])
        node = int(trie.child(torch.tensor(node), torch.tensor(codes[item][lv])))
    return total


def test_a_full_initial_beam_is_beam_search(setup):
    model, head, trie, _ = setup
    history = torch.tensor([[1, 2, 3], [-1, 7, 9], [4, 4, 4]])
    for width in (1, 3, 8):
        ved = ved_decode(model, head, trie, history, width, width, cfg=VedConfig(init_depth=trie.depth - 1))
        beam = beam_search(model, trie, history, width, width)
        assert torch.equal(ved.items, beam.items)
        torch.testing.assert_close(ved.scores, beam.scores)
        assert (ved.forwards == beam_budget(trie.depth, width)).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 5), width=st.integers(1, 6), extra=st.integers(-3, 30),
       k=st.integers(1, 25), init_depth=st.integers(0, 2), temperature=st.sampled_from([0.0, 1.0]),
       score=st.sampled_from(["logp", "value", "mix"]), exclude_seen=st.booleans())
def test_ved_returns_distinct_valid_items_within_budget(setup, seed, batch, width, extra, k, init_depth, temperature,
                                                        score, exclude_seen):
    model, head, trie, _ = setup
    rng = np.random.default_rng(seed)
    history = torch.as_tensor(rng.integers(0, N_ITEMS, (batch, 4)))
    exclude = None
    if exclude_seen:
        exclude = torch.zeros(batch, N_ITEMS, dtype=torch.bool)
        exclude[torch.arange(batch).repeat_interleave(4), history.view(-1)] = True
    budget = max(1, beam_budget(trie.depth, width) + extra)
    counted = CountingModel(model)
    cfg = VedConfig(init_depth=init_depth, temperature=temperature, score=score, seed=seed)
    res = ved_decode(counted, head, trie, history, k, width, budget, cfg,
                     trie.exclusion(history) if exclude_seen else None)
    assert res.items.shape == (batch, k)
    assert (res.forwards <= budget).all() and counted.forwards == int(res.forwards.sum())  # every forward counted
    for b in range(batch):
        items = [i for i in res.items[b].tolist() if i >= 0]
        assert all(0 <= i < N_ITEMS for i in items) and len(set(items)) == len(items)
        assert (res.items[b][len(items):] == -1).all()  # results first, padding after
        if exclude is not None:
            assert not exclude[b, items].any()
        if score == "logp" and items:
            assert (res.scores[b][: len(items) - 1] >= res.scores[b][1: len(items)]).all()


@pytest.mark.parametrize("excluded", [40, 120, 200])
def test_exclusion_applies_inside_the_search(setup, excluded):
    """The items beam search ranks first are excluded: VED still returns k allowed items at a width-k beam's budget
    (before, it searched as if nothing were excluded and masked its final list, returning fewer than k)."""
    model, head, trie, _ = setup
    history = torch.tensor([[1, 2, 3], [9, 8, 7]])
    best = beam_search(model, trie, history, excluded, excluded).items
    exclude = torch.zeros(2, N_ITEMS, dtype=torch.bool)
    exclude[torch.arange(2).repeat_interleave(excluded), best.reshape(-1)] = True
    res = ved_decode(model, head, trie, history, 10, 10, None, VedConfig(), trie.exclusion(best))
    beam = beam_search(model, trie, history, 10, 10, trie.exclusion(best))
    for b in range(2):
        items = res.items[b].tolist()
        assert -1 not in items and len(set(items)) == 10 and not exclude[b, items].any(), items
        assert -1 not in beam.items[b].tolist()  # beam search, at the same budget, manages it too


def test_scores_are_exact_log_probabilities_and_budget_is_spent(setup):
    model, head, trie, sid = setup
    history = torch.tensor([[5, 6, 7], [8, 9, 10]])
    res = ved_decode(model, head, trie, history, 10, 4, budget=30)
    assert (res.forwards == 30).all()  # the tree is far larger than the budget: all of it is spent
    for b in range(2):
        for item, score in zip(res.items[b].tolist(), res.scores[b].tolist()):
            if item >= 0:
                assert score == pytest.approx(exact_logp(model, trie, history[b], item, sid.codes), abs=1e-4)


def test_batching_and_seed_determine_the_answer(setup):
    model, head, trie, _ = setup
    history = torch.as_tensor(np.random.default_rng(0).integers(0, N_ITEMS, (6, 5)))
    together = ved_decode(model, head, trie, history, 8, 3, budget=20)
    again = ved_decode(model, head, trie, history, 8, 3, budget=20)
    assert torch.equal(together.items, again.items)
    for b in range(len(history)):
        alone = ved_decode(model, head, trie, history[b: b + 1], 8, 3, budget=20)
        assert torch.equal(alone.items[0], together.items[b])
        torch.testing.assert_close(alone.scores[0], together.scores[b], atol=1e-5, rtol=1e-5)


def test_level_rewards_and_td_targets_by_hand():
    generated = torch.tensor([[1, 2, 3, 0], [1, 5, 3, 0], [4, 2, 3, 0]])
    target = torch.tensor([[1, 2, 3, 0]] * 3)
    cosine = torch.tensor([1.0, 0.5, -1.0])
    r = level_rewards(generated, target, cosine, (0.3, 0.5, 1.0))
    assert r[0].tolist() == pytest.approx([0.3, 0.5, 1.0, 0.0])  # the target itself; the collision level earns 0
    assert r[1].tolist() == pytest.approx([0.3, -0.25, -0.5, 0.0])  # wrong from level 2 on: -w * (1 - 0.5)
    assert r[2].tolist() == pytest.approx([-0.6, -1.0, -2.0, 0.0])  # a later match after a miss does not count
    values = torch.tensor([[0.1, 0.2, 0.4, 0.8]])
    t = td_targets(values, r[:1], gamma=0.5)
    assert t[0].tolist() == pytest.approx([0 + 0.5 * 0.2, 0.3 + 0.5 * 0.4, 0.5 + 0.5 * 0.8, 1.0 + 0.5 * 0.0])


def test_ved_ranks_with_the_recommenders_rescore_as_beam_search_does(setup):
    """A model with rescore: a full initial beam (VED = beam search) still gives beam search's items and scores."""
    model, head, trie, sid = setup
    torch.manual_seed(2)
    cfg = model.cfg.model_copy(update={"item_embedding": True, "rescore": 1.0})
    rescored = Recommender(cfg, sid.vocab_sizes, torch.as_tensor(sid.codes),
                           trie).eval()
    missing, _ = rescored.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["item_emb.weight"]
    with torch.no_grad():
        rescored.item_emb.weight.mul_(3.0)  # item scores large enough to reorder the beam
    history = torch.tensor([[1, 2, 3], [-1, 7, 9]])
    for width in (3, 8):
        ved = ved_decode(rescored, head, trie, history, width, width, cfg=VedConfig(init_depth=trie.depth - 1))
        beam = beam_search(rescored, trie, history, width, width)
        assert torch.equal(ved.items, beam.items)
        torch.testing.assert_close(ved.scores, beam.scores)


@pytest.mark.parametrize("exclude_seen,gate", [(False, True), (True, True), (True, False)])
def test_incremental_scores_and_cached_forwards_equal_a_recomputation(setup, exclude_seen, gate):
    """The fast path against the slow one: after a search, every node's priority G, gate and UCB score as kept
    incrementally equal the whole forest scored from scratch (kernels.ved_scores.ved_scores_torch), and every node's
    logits and value, computed by one cached decoder step, equal an uncached forward of its whole prefix."""
    model, head, trie, _ = setup
    history = torch.as_tensor(np.random.default_rng(5).integers(0, N_ITEMS, (3, 4)))
    exclude = trie.exclusion(history) if exclude_seen else None
    cfg = VedConfig(gate=gate, lam=0.3)
    ctx = model.context(history)
    f, spent = grow_forest(model, head, trie, ctx, 4, 60, cfg, exclude)
    assert (spent == 60).all()
    h, g, ucb, want_gate = ved_scores_torch(f.logits, f.tnode, f.depth, f.value, f.visits, trie.child_ptr,
                                            trie.child_code, cfg.lam, cfg.beta, trie.depth)
    users, slots = torch.arange(3)[:, None].expand(3, 60), torch.arange(60).expand(3, 60)
    torch.testing.assert_close(f.g, g, atol=1e-5, rtol=1e-5)
    assert torch.equal(f.gate(users, slots), want_gate)
    torch.testing.assert_close(f.ucb(users, slots, f.visits[:, 0], cfg.beta), ucb, atol=1e-5, rtol=1e-5)
    assert (f.n_expanded == (f.child >= 0).sum(2)).all()
    with torch.no_grad():
        for u, s in zip(*torch.nonzero(f.tnode >= 0, as_tuple=True)):
            d, node = int(f.depth[u, s]), f.tnode[u, s][None]
            state = model.decode_all(ctx[u][None], f.prefix[u, s, :d][None])[:, d]
            logits = model.level_logits(state, d, node)
            if exclude is not None:
                kids = trie.child_table(node, logits.shape[1])
                banned = exclude.blocks(u[None, None], kids, items=d == trie.depth - 1)
                logits = logits.masked_fill(banned, float("-inf"))
            torch.testing.assert_close(f.logits[u, s, : logits.shape[1]], logits[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(f.value[u, s], head(state, f.logp[u, s][None])[0], atol=1e-4, rtol=1e-4)


def test_window_level_rewards_by_hand():
    """The dense reward against two next items, discounts (1, 0.7): the sum of each item's level rewards, weighted;
    a missing item (-1, the sequence ended) adds nothing; one item ahead is the next-item reward."""
    codes = torch.tensor([[1, 2, 3, 0], [1, 5, 3, 0], [4, 2, 3, 0]])
    vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    generated, items = codes[[0, 0]], torch.tensor([0, 0])
    window = torch.tensor([[0, 1], [1, -1]])
    got = window_level_rewards(generated, window, codes, vectors, items, (0.3, 0.5, 1.0), (1.0, 0.7))
    to_0 = level_rewards(codes[[0]], codes[[0]], torch.tensor([1.0]), (0.3, 0.5, 1.0))[0]
    to_1 = level_rewards(codes[[0]], codes[[1]], torch.tensor([0.6]), (0.3, 0.5, 1.0))[0]
    assert got[0].tolist() == pytest.approx((to_0 + 0.7 * to_1).tolist())
    assert to_1.tolist() == pytest.approx([0.3, -0.2, -0.4, 0.0])  # wrong from level 2: -w (1 - 0.6)
    assert got[1].tolist() == pytest.approx(to_1.tolist())
    one = window_level_rewards(generated, window[:, :1], codes, vectors, items, (0.3, 0.5, 1.0), (1.0,))
    assert one[0].tolist() == pytest.approx(to_0.tolist())
