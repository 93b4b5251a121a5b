"""Cached decoding against uncached, beam search against exhaustive enumeration, and the constraint property."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.core.config import RecommenderConfig, SemanticIdConfig
from genrec.models.decoding import Trie, beam_search, masked_log_softmax
from genrec.models.recommender import Recommender
from genrec.models.semantic_ids import PrefixTrie, build_semantic_ids

N_ITEMS = 400


@pytest.fixture(scope="module", params=["code-heads", "node-heads"])
def setup(request):
    """The same checks for both output heads: codes only, and codes plus per-node vectors (node_embedding)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_ITEMS, 16)).astype(np.float32)
    sid = build_semantic_ids(x, SemanticIdConfig(codebook_size=8, kmeans_iters=5, unique_last_level=False))
    trie = PrefixTrie(sid.codes, sid.vocab_sizes)
    torch.manual_seed(0)
    nodes = request.param == "node-heads"
    cfg = RecommenderConfig(d_model=32, n_heads=2, n_layers=2, n_code_layers=2, dropout=0.0,
                            constrained_loss=nodes, node_embedding=nodes)
    model = Recommender(cfg, sid.vocab_sizes, torch.as_tensor(sid.codes), Trie.from_prefix_trie(trie)).eval()
    with torch.no_grad():  # larger weights give peaked, distinctive distributions
        for p in model.parameters():
            p.mul_(8.0)
    return model, sid, model.trie


def exact_item_logprobs(model, sid, trie, history):
    """Slow reference: log P(item | history) for every item, one uncached decoder pass per item."""
    ctx = model.context(history[None])[0]
    out = torch.empty(N_ITEMS)
    with torch.no_grad():
        for item in range(N_ITEMS):
            codes = torch.as_tensor(sid.codes[item])
            states = model.decode_all(ctx[None], codes[None, :-1])[0]
            node, total = 0, 0.0
            for lv in range(len(codes)):
                valid = trie.child(torch.tensor(node), torch.arange(sid.vocab_sizes[lv])) >= 0
                logits = model.level_logits(states[lv][None], lv, torch.tensor([node]))[0]
                logp = masked_log_softmax(logits, valid)
                total += float(logp[codes[lv]])
                node = int(trie.child(torch.tensor(node), codes[lv]))
            out[item] = total
    return out


def test_cached_decoding_equals_uncached(setup):
    model, sid, _ = setup
    history = torch.tensor([[-1, -1, 3, 17, 42], [5, 6, 7, 8, 9]])
    ctx = model.context(history)
    codes = torch.as_tensor(sid.codes[[11, 250]])
    with torch.no_grad():
        full = model.decode_all(ctx, codes[:, :-1])  # (2, D, d)
        state, cache = model.start(ctx)
        cached = [state]
        for lv in range(codes.shape[1] - 1):
            cached.append(model.step(codes[:, lv], lv, cache))
    # fp32: the masked and the cached attention sum in different orders; states are O(10) after the x8 scaling
    torch.testing.assert_close(torch.stack(cached, 1), full, atol=2e-4, rtol=1e-4)


def test_history_padding_is_ignored_and_never_nan(setup):
    model, _, _ = setup
    short = torch.tensor([[3, 17, 42]])
    padded = torch.tensor([[-1, -1, -1, 3, 17, 42]])
    with torch.no_grad():
        a, b = model.context(short), model.context(padded)
        allpad = model.encode_history(torch.full((1, 4), -1))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(allpad).all()


def test_wide_beam_finds_the_exact_top_k(setup):
    model, sid, trie = setup
    history = torch.tensor([[1, 2, 3, 4]])
    exact = exact_item_logprobs(model, sid, trie, history[0])
    rec = beam_search(model, trie, history, beam_width=N_ITEMS, k=10)
    top = exact.topk(10)
    assert rec.items[0].tolist() == top.indices.tolist()
    torch.testing.assert_close(rec.scores[0], top.values, atol=1e-4, rtol=1e-4)
    assert torch.logsumexp(exact, 0).item() == pytest.approx(0.0, abs=1e-4)  # a distribution over real items


def test_beam_scores_are_the_items_log_probabilities(setup):
    model, sid, trie = setup
    history = torch.tensor([[7, 8, 9]])
    exact = exact_item_logprobs(model, sid, trie, history[0])
    rec = beam_search(model, trie, history, beam_width=5, k=5)
    torch.testing.assert_close(rec.scores[0], exact[rec.items[0]], atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), beam=st.integers(1, 40), batch=st.integers(1, 6), length=st.integers(1, 8),
       exclude_seen=st.booleans())
def test_beam_search_returns_only_distinct_valid_items(setup, seed, beam, batch, length, exclude_seen):
    model, sid, trie = setup
    rng = np.random.default_rng(seed)
    history = torch.as_tensor(rng.integers(-1, N_ITEMS, (batch, length)))
    history[:, -1] = torch.as_tensor(rng.integers(0, N_ITEMS, batch))
    k = int(rng.integers(1, beam + 1))
    exclude = None
    if exclude_seen:
        exclude = torch.zeros(batch, N_ITEMS, dtype=torch.bool)
        for b in range(batch):
            exclude[b, history[b][history[b] >= 0]] = True
    rec = beam_search(model, trie, history, beam, k, exclude=trie.exclusion(history) if exclude_seen else None)
    assert rec.items.shape == (batch, k)
    for b in range(batch):
        items = rec.items[b].tolist()
        assert all(0 <= i < N_ITEMS for i in items), items
        assert len(set(items)) == len(items)
        assert torch.isfinite(rec.scores[b]).all() and (rec.scores[b][:-1] >= rec.scores[b][1:] - 1e-6).all()
        if exclude is not None:
            assert not exclude[b, rec.items[b]].any()


def test_constrained_loss_is_the_decoders_item_log_probability(setup, tmp_path):
    model, sid, trie = setup
    # Positions counted from the oldest item, so a window's earlier pairs see what inference on that prefix sees
    # (counted from the newest, each state of a window is positioned from the window's end, as SASRec trains).
    cfg = model.cfg.model_copy(update={"constrained_loss": True, "positions": "oldest"})
    oldest = Recommender(cfg.model_copy(update={"constrained_loss": model.cfg.constrained_loss}), sid.vocab_sizes,
                         torch.as_tensor(sid.codes), trie).eval()
    oldest.load_state_dict(model.state_dict())
    model = oldest
    constrained = Recommender(cfg, sid.vocab_sizes, torch.as_tensor(sid.codes), trie).eval()
    plain = Recommender(cfg.model_copy(update={"constrained_loss": False, "node_embedding": False}),
                        sid.vocab_sizes, torch.as_tensor(sid.codes)).eval()
    constrained.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict(), strict=False)  # everything but the node vectors
    exact = exact_item_logprobs(model, sid, trie, torch.tensor([5, 9]))
    with torch.no_grad():
        loss = constrained(torch.tensor([[5, 9, 123]]))["loss"]  # pairs: ([5] -> 9) and ([5, 9] -> 123)
        plain_loss = plain(torch.tensor([[5, 9, 123]]))["loss"]
        first = constrained(torch.tensor([[5, 9]]))["loss"]
    exact_first = exact_item_logprobs(model, sid, trie, torch.tensor([5]))[9]
    assert first.item() == pytest.approx(-exact_first.item(), abs=1e-4)
    assert loss.item() == pytest.approx(-(exact_first.item() + exact[123].item()) / 2, abs=1e-4)
    if not cfg.node_embedding:  # renormalising over valid children can only raise each probability
        assert loss.item() < plain_loss.item()
    constrained.save(tmp_path / "m.safetensors")
    loaded = Recommender.load(tmp_path / "m.safetensors", torch.as_tensor(sid.codes), trie)
    assert loaded.cfg.constrained_loss and torch.equal(loaded.code_emb.weight, constrained.code_emb.weight)
    with torch.no_grad():
        assert loaded(torch.tensor([[5, 9, 123]]))["loss"].item() == pytest.approx(loss.item(), abs=1e-5)


def test_newest_positions_train_the_last_pair_as_inference_sees_it(setup):
    """Counted from the newest item, the last pair of a window is positioned exactly as at inference."""
    model, sid, trie = setup
    assert model.cfg.positions == "newest"
    constrained = Recommender(model.cfg.model_copy(update={"constrained_loss": True}), sid.vocab_sizes,
                              torch.as_tensor(sid.codes), trie).eval()
    constrained.load_state_dict(model.state_dict())
    with torch.no_grad():
        loss = constrained(torch.tensor([[-1, 5, 17, 9]]))["loss"]
        last = constrained(torch.tensor([[-1, -1, 17, 9]]))["loss"]
    exact = exact_item_logprobs(model, sid, trie, torch.tensor([17]))[9]
    assert last.item() == pytest.approx(-exact.item(), abs=1e-4)
    assert loss.item() != pytest.approx(last.item(), abs=1e-3)  # two pairs now: ([5] -> 17) and ([5, 17] -> 9)


@pytest.fixture(scope="module")
def item_model(setup):
    """The setup model with item embeddings trained (here: random) for item_loss and rescoring."""
    model, sid, trie = setup
    cfg = model.cfg.model_copy(update={"item_embedding": True, "item_loss": 1.0, "item_negatives": 64})
    torch.manual_seed(1)
    with_items = Recommender(cfg, sid.vocab_sizes, torch.as_tensor(sid.codes), trie).eval()
    with_items.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        with_items.item_emb.weight.mul_(40.0)  # item scores of the same order as the path log-probabilities
    return with_items


@pytest.mark.parametrize("weight", [0.5, 3.0])
def test_rescoring_reranks_the_beams_items_by_path_plus_item_score(setup, item_model, weight):
    _, sid, trie = setup
    history = torch.tensor([[-1, 3, 17, 42], [5, 6, 7, 8]])
    plain = beam_search(item_model, trie, history, 12, 12)
    rescored_model = Recommender(item_model.cfg.model_copy(update={"rescore": weight}), sid.vocab_sizes,
                                 torch.as_tensor(sid.codes), trie).eval()
    rescored_model.load_state_dict(item_model.state_dict())
    rec = beam_search(rescored_model, trie, history, 12, 5)
    with torch.no_grad():
        ctx = item_model.context(history)
    for b in range(2):  # reference: every proposed item, scored one at a time
        proposed = plain.items[b].tolist()
        fused = {i: plain.scores[b, j].item() + weight * float(ctx[b] @ item_model.item_emb.weight[i].detach())
                 for j, i in enumerate(proposed)}
        best = sorted(fused, key=fused.get, reverse=True)[:5]
        assert rec.items[b].tolist() == best
        assert rec.scores[b].tolist() == pytest.approx([fused[i] for i in best], abs=1e-4)
    assert not torch.equal(rec.items, plain.items[:, :5])  # the item score changed the order


def test_item_loss_is_sampled_softmax_over_the_item_vectors(setup, item_model):
    _, sid, trie = setup
    window = torch.tensor([[-1, 5, 17, 9], [3, 4, 5, 6]])
    plain = Recommender(item_model.cfg.model_copy(update={"item_loss": 0.0}), sid.vocab_sizes,
                        torch.as_tensor(sid.codes), trie).eval()
    plain.load_state_dict(item_model.state_dict())
    torch.manual_seed(7)
    with torch.no_grad():
        out = item_model(window)
        states = item_model.encode_history(window[:, :-1])
    torch.manual_seed(7)
    negatives = torch.randint(0, N_ITEMS, (2, 64))
    reference = []  # one (history, target) pair at a time
    for b in range(2):
        for t in range(3):
            if window[b, t] < 0:
                continue
            candidates = torch.cat([window[b, t + 1: t + 2], negatives[b]])
            logits = item_model.item_emb.weight[candidates] @ states[b, t]
            reference.append(-logits.log_softmax(0)[0])
    assert out["item_loss"].item() == pytest.approx(torch.stack(reference).mean().item(), abs=1e-4)
    with torch.no_grad():
        assert out["loss"].item() == pytest.approx(plain(window)["loss"].item() + out["item_loss"].item(), abs=1e-4)


def test_a_narrow_beam_never_walks_into_excluded_items(setup):
    """Exclusion prunes whole prefixes whose items are all excluded, so even a width-1 beam ends on an item."""
    model, sid, trie = setup
    history = torch.tensor([[7, 8, 9]])
    first = beam_search(model, trie, history, 1, 1).items[0, 0].item()
    exclude = torch.zeros(1, N_ITEMS, dtype=torch.bool)
    exclude[0, first] = True
    exclude[0, torch.as_tensor(sid.codes[:, 0] == sid.codes[first, 0])] = True  # its whole first-level branch
    seen = trie.exclusion(exclude.nonzero()[:, 1].view(1, -1))
    got = beam_search(model, trie, history, 1, 1, seen).items[0, 0].item()
    assert got >= 0 and not exclude[0, got] and sid.codes[got, 0] != sid.codes[first, 0]


def test_seeded_samples_follow_the_policy_whatever_the_batch(setup):
    """sample(seeds=): a user's draws are a function of its seed alone (the same in any batch, hence on any rank), and
    their frequencies are the policy's item probabilities (Gumbel-max over hashed noise is exact sampling)."""
    from genrec.models.decoding import noise_seeds, sample

    model, sid, trie = setup
    history = torch.tensor([[1, 2, 3], [-1, 4, 5], [-1, -1, 6]])
    seeds = noise_seeds(7, np.arange(3))
    whole, part = sample(model, trie, history, 4, seeds=seeds), sample(model, trie, history[1:], 4, seeds=seeds[1:])
    assert torch.equal(whole.items[1:], part.items) and torch.equal(whole.logp[1:], part.logp)
    hot = lambda seed: sample(model, trie, history, 8, 3.0, seeds=noise_seeds(seed, np.arange(3))).items  # noqa: E731
    assert torch.equal(hot(7), hot(7)) and not torch.equal(hot(7), hot(8))  # the seed, and only it, decides
    users = 64
    draws = sample(model, trie, history[:1].expand(users, -1), 256, seeds=noise_seeds(3, np.arange(users))).items
    freq = np.bincount(draws.flatten().numpy(), minlength=N_ITEMS) / draws.numel()
    exact = exact_item_logprobs(model, sid, trie, history[0]).exp().numpy()
    assert 0.5 * np.abs(freq - exact).sum() < 0.03  # total variation over 16,384 draws


def test_samples_carry_their_prefix_states_and_log_probabilities(setup):
    """The sampler's cached states and running log-probabilities equal a teacher-forced pass over the same codes."""
    from genrec.models.decoding import sample

    model, sid, trie = setup
    history = torch.tensor([[1, 2, 3], [-1, 4, 5]])
    s = sample(model, trie, history, 3, generator=torch.Generator().manual_seed(0))
    codes = s.codes.view(-1, trie.depth)
    with torch.no_grad():
        ctx = model.context(history).repeat_interleave(3, 0)
        torch.testing.assert_close(s.states.flatten(0, 1), model.decode_all(ctx, codes[:, :-1]), atol=2e-4, rtol=1e-4)
    assert (s.prefix_logp[..., 0] == 0).all() and (s.prefix_logp.diff(dim=-1) <= 1e-6).all()
    for b in range(2):
        exact = exact_item_logprobs(model, sid, trie, history[b][history[b] >= 0])
        torch.testing.assert_close(s.logp[b], exact[s.items[b]], atol=1e-4, rtol=1e-4)


_MEMORY_PROBE = r"""
import resource, sys, numpy as np, torch
from genrec.core.config import RecommenderConfig
from genrec.models.decoding import Trie, beam_search
from genrec.models.recommender import Recommender
from genrec.models.semantic_ids import PrefixTrie
torch.manual_seed(0)
n, b, w = 300_000, 4, 128  # a (B*W, N) bool copy of the mask would be 150 MB
rng = np.random.default_rng(0)
codes = np.unique(rng.integers(0, 256, (n + n // 2, 3)), axis=0)[:n]
codes = codes[rng.permutation(len(codes))]
prefix = PrefixTrie(codes, (256, 256, 256))
trie = Trie.from_prefix_trie(prefix)
cfg = RecommenderConfig(d_model=16, n_heads=2, n_layers=1, n_code_layers=1, dropout=0.0, constrained_loss=True,
                        node_embedding=True)
model = Recommender(cfg, (256, 256, 256), torch.as_tensor(codes), trie).eval()
history = torch.as_tensor(rng.integers(0, len(codes), (b, 20)))
beam_search(model, trie, history, 8, 8, trie.exclusion(history))  # warm: allocator pools, lazy init
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = beam_search(model, trie, history, w, w, trie.exclusion(history))
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
assert (out.items >= 0).all() and not (out.items[:, :, None] == history[:, None, :]).any()
print(f"{grown:.0f}")
"""


def test_beam_search_exclusion_memory_does_not_grow_with_the_beam():
    """Peak memory of a wide beam with exclude_seen over 300,000 items stays far below one (B*W, N) copy of the
    mask (150 MB here), which the code before this test made at every level."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) < 60, f"peak RSS grew by {out.stdout.strip()} MB"


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5), seen=st.integers(0, 60))
def test_sparse_exclusion_equals_the_dense_masks(setup, seed, batch, seen):
    """Trie.exclusion against dense references: the (B, N) mask of seen items and, per row, the prefixes all of whose
    items are seen (whole branches are seen on purpose, so some prefixes die)."""
    _, sid, trie = setup
    rng = np.random.default_rng(seed)
    rows = [rng.choice(N_ITEMS, int(rng.integers(0, seen + 1)), replace=True) for _ in range(batch)]
    rows[0] = np.r_[rows[0], np.flatnonzero(sid.codes[:, 0] == sid.codes[int(rng.integers(N_ITEMS)), 0])]
    exclusion = trie.exclusion([r.tolist() for r in rows])
    mask = torch.zeros(batch, N_ITEMS, dtype=torch.bool)
    for b, r in enumerate(rows):
        mask[b, torch.as_tensor(r, dtype=torch.long)] = True
    items = torch.arange(-1, N_ITEMS).expand(batch, -1)
    want = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), mask], 1)
    assert torch.equal(exclusion.blocks(torch.arange(batch)[:, None], items, items=True), want)
    under = [[] for _ in range(trie.n_nodes)]  # the items below each node, from the codes alone
    for item, codes in enumerate(sid.codes.tolist()):
        node = 0
        for code in codes[:-1]:
            node = int(trie.child(torch.tensor(node), torch.tensor(code)))
            under[node].append(item)
    nodes = torch.arange(-1, trie.n_nodes).expand(batch, -1)
    dead = torch.tensor([[False] + [bool(under[n]) and bool(mask[b, under[n]].all()) for n in range(trie.n_nodes)]
                         for b in range(batch)])
    assert torch.equal(exclusion.blocks(torch.arange(batch)[:, None], nodes, items=False), dead)
    assert dead[0].any()  # the whole branch seen by row 0 is dead


def test_child_table_and_child_agree(setup):
    _, sid, trie = setup
    node = torch.arange(-1, trie.n_nodes)
    table = trie.child_table(node, trie.vocab)
    assert torch.equal(table, trie.child(node[:, None], torch.arange(trie.vocab)[None]))
    assert int((table >= 0).sum()) == trie.n_nodes - 1 + N_ITEMS  # one edge into every node but the root, and each leaf
