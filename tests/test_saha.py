"""Contrastive fine-tuning of the embedder: item-to-next-item pairs, SaHa mining and packing against slow references,
the masked InfoNCE loss, retrieval ranks, and a real training run with resume."""

import json

import numpy as np
import torch

from genrec.core.config import EmbedderConfig, EmbedderTrainConfig
from genrec.core.data import load_dataset, train_sequences
from genrec.evaluation import heldout_pairs, retrieval_ranks
from genrec.models.embedder import CONFIG_FILE, Embedder, load_embedder_config
from genrec.training.embedder import (ContrastiveModel, fill_batches, hard_clusters, hard_negatives_per_row,
                                      nearest_positives, next_item_pairs, train_embedder)
from genrec.training.loop import random_batches, read_checkpoint
from tests.tiny_backbones import save_tiny_qwen2


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pairs_come_from_training_positions_only(tiny_data):
    pairs = next_item_pairs([np.array([1, 2, 2, 3]), np.array([3, 1]), np.array([5])])
    assert pairs.tolist() == [[1, 2], [2, 3], [3, 1]]  # sorted, distinct, self-pairs dropped
    ds = load_dataset(tiny_data)
    train = {tuple(p) for p in next_item_pairs(train_sequences(ds)).tolist()}
    valid, test = heldout_pairs(ds, "valid"), heldout_pairs(ds, "test")
    s = next(s for s in ds.sequences if len(s) >= 3 and s[-3] != s[-2] and s[-2] != s[-1])
    assert [s[-3], s[-2]] in valid.tolist() and [s[-2], s[-1]] in test.tolist()
    seqs = train_sequences(ds)  # the last two positions are held out
    assert all(len(t) == len(s) - 2 for t, s in zip(seqs, ds.sequences) if len(s) >= 3)
    assert train == {tuple(p) for p in next_item_pairs([s[:-2] if len(s) >= 3 else s for s in ds.sequences]).tolist()}


def slow_clusters(q, near, pairs, k, seed):
    """The rules as stated, one anchor at a time with sets: anchors in the seeded order; candidates are its near
    documents that are not its query item nor known to follow it; for each, its least similar free owner not sharing
    the anchor's query item; the k of those least like the anchor."""
    leads_to, owners_of = {}, {}
    for i, (qa, pa) in enumerate(pairs):
        leads_to.setdefault(qa, set()).add(pa)
        owners_of.setdefault(pa, []).append(i)
    used, clusters = set(), []
    for a in np.random.default_rng(seed).permutation(len(pairs)):
        if a in used:
            continue
        qa = pairs[a, 0]
        sim = lambda o: float(q[pairs[o, 0]] @ q[qa])  # noqa: E731
        picked = []
        for c in near[a]:
            if c < 0 or c == qa or c in leads_to[qa]:
                continue
            free = [o for o in owners_of[c] if o not in used and pairs[o, 0] != qa]
            if free:
                picked.append(min(free, key=lambda o: (sim(o), o)))
        picked = sorted(picked, key=lambda o: (sim(o), o))[:k]
        used.update([a, *picked])
        clusters.append([a, *picked])
    return clusters


def random_pairs(seed, n_items, n_pairs):
    rng = np.random.default_rng(seed)
    q, d = unit(rng.normal(size=(n_items, 8))), unit(rng.normal(size=(n_items, 8)))
    pairs = np.unique(rng.integers(0, n_items, size=(n_pairs, 2)), axis=0)
    return q, d, pairs[pairs[:, 0] != pairs[:, 1]]


def test_clusters_match_a_slow_reference():
    q, d, pairs = random_pairs(0, 60, 150)
    near = nearest_positives(q, d, pairs, pool=10, chunk=7)
    fast = hard_clusters(q, near, pairs, k=3, seed=3)
    assert [c.tolist() for c in fast] == slow_clusters(q, near, pairs, 3, 3)
    assert sorted(np.concatenate(fast).tolist()) == list(range(len(pairs)))  # every pair exactly once
    known = {tuple(p) for p in pairs.tolist()}
    for a, *owners in fast:
        assert len({pairs[o, 1] for o in owners}) == len(owners)  # every owner brings a different document
        for o in owners:  # a mined negative is never a known positive of the anchor's query, nor that item
            assert (pairs[a, 0], pairs[o, 1]) not in known and pairs[o, 1] != pairs[a, 0] and pairs[o, 1] in near[a]
    positives = np.unique(pairs[:, 1])  # nearest_positives against sorting
    for a in range(len(pairs)):
        order = positives[np.argsort(-(d[positives] @ q[pairs[a, 0]]), kind="stable")[:12]]
        assert near[a].tolist() == order.tolist()


def test_clusters_stay_full_when_everyone_mines_the_same_owners():
    """Popular documents sit in every anchor's pool and a few odd queries are least like all anchors: clusters must
    fall back to other free owners instead of shrinking to lone anchors."""
    q, d, pairs = random_pairs(1, 400, 4000)
    d[:] = d[0]  # every document alike: every anchor's pool is the same 42 items (pool + 2), ~400 owner pairs
    near = nearest_positives(q, d, pairs, pool=40)
    sizes = np.array([len(c) for c in hard_clusters(q, near, pairs, k=7, seed=0)])
    assert (sizes[:40] == 8).all()  # 280 owners taken before any cluster comes up short


def test_clusters_never_offer_the_query_item_itself():
    """With queries and documents embedded alike, an anchor's own query item is its nearest document (cosine 1)."""
    rng = np.random.default_rng(4)
    v = unit(rng.normal(size=(40, 6)))
    pairs = np.array([[i, (i + 1) % 40] for i in range(40)] + [[i, (i + 7) % 40] for i in range(0, 40, 3)])
    for a, *owners in hard_clusters(v, nearest_positives(v, v, pairs, pool=12), pairs, k=5, seed=0):
        assert pairs[a, 0] not in pairs[owners, 1]


def test_clusters_keep_the_owners_least_similar_to_the_anchor():
    """Positives 10..13 are all near the anchor's query; their owners' queries get less and less similar to it."""
    q = unit(np.array([[1, 0, 0], [1, 0.1, 0], [1, 1, 0], [0, 1, 0], [-0.3, 0, 1]], dtype=np.float32))
    d = unit(np.zeros((14, 3)) + [1, 0, 0] + np.linspace(0, 0.1, 14)[:, None] * [0, 0, 1])
    pairs = np.array([[0, 9], [1, 10], [2, 11], [3, 12], [4, 13]])
    q = np.pad(q, ((0, 9), (0, 0)))
    near = nearest_positives(q, d, pairs, pool=4)
    for seed in range(20):
        clusters = hard_clusters(q, near, pairs, k=2, seed=seed)
        if clusters[0][0] == 0:
            assert clusters[0].tolist() == [0, 4, 3]  # the two owners whose queries are least like query 0
            return
    raise AssertionError("no seed put pair 0 first")


def test_hard_negatives_per_row_match_a_slow_count():
    q, d, pairs = random_pairs(5, 50, 120)
    near = nearest_positives(q, d, pairs, pool=8)
    known = {tuple(p) for p in pairs.tolist()}
    for batches in (random_batches(len(pairs), 16, 2), fill_batches(hard_clusters(q, near, pairs, 3, 1), 16)):
        fast = hard_negatives_per_row(batches, near, pairs)
        for b in batches:
            for i in b:
                slow = sum(1 for j in b if j != i and pairs[j, 1] in near[i] and pairs[j, 1] != pairs[i, 0]
                           and (pairs[i, 0], pairs[j, 1]) not in known)
                assert fast[i] == slow


def test_saha_batches_hold_more_hard_negatives_than_random_ones():
    q, d, pairs = random_pairs(6, 1000, 3000)
    near = nearest_positives(q, d, pairs, pool=10)
    saha = hard_negatives_per_row(fill_batches(hard_clusters(q, near, pairs, 3, 1), 32), near, pairs)
    plain = hard_negatives_per_row(random_batches(len(pairs), 32, 2), near, pairs)
    assert saha.mean() > 2 * plain.mean()


def test_batches_keep_clusters_together_and_use_each_pair_once():
    clusters = np.array_split(np.random.default_rng(1).permutation(100), 30)
    batches = fill_batches(clusters, 8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(100)) and all(len(b) <= 8 for b in batches)
    where = {int(x): i for i, b in enumerate(batches) for x in b}
    assert all(len({where[int(x)] for x in c}) == 1 for c in clusters)
    assert len(batches) <= 15  # clusters of 3 and 4 in batches of 8: at most 2 places empty per batch
    sevens, singles = [np.arange(i * 7, i * 7 + 7) for i in range(8)], [np.array([56 + i]) for i in range(8)]
    big_then_small = fill_batches(sevens + singles, 8)
    assert [len(b) for b in big_then_small] == [8] * 8  # a later single fills the gap an earlier cluster left
    plain = random_batches(100, 8, seed=0)
    assert sorted(np.concatenate(plain).tolist()) == list(range(100)) and all(len(b) <= 8 for b in plain)


def test_infonce_masks_known_false_negatives():
    class Fixed(torch.nn.Module):
        """Stands in for the backbone with fixed vectors per text, so the loss can be checked by hand."""

        def __init__(self, vectors):
            super().__init__()
            self.vectors = torch.nn.Parameter(torch.as_tensor(vectors))
            self.inputs = self

        def batch(self, texts, role, truncate):
            return [int(t) for t in texts]

        def forward(self, rows):
            return torch.nn.functional.normalize(self.vectors[rows], dim=-1)

    vec = unit(np.random.default_rng(0).normal(size=(8, 4)))
    known = np.array([[0, 3], [1, 4], [2, 3], [5, 0], [0, 6], [1, 7]])  # item 0 is known to lead to 3 and 6
    model = ContrastiveModel(Fixed(vec), [str(i) for i in range(8)], temperature=0.5, known_pairs=known)
    batch = torch.tensor([[0, 3], [1, 4], [2, 3], [5, 0], [7, 6], [6, 1]])
    loss = model(batch)["loss"]
    q, p = batch[:, 0].tolist(), batch[:, 1].tolist()
    pairs = {tuple(x) for x in known.tolist()}
    v = torch.as_tensor(vec)
    logits = v[q] @ v[p].T / 0.5
    expected = []
    for i in range(len(q)):
        keep = [j for j in range(len(q)) if j == i or ((q[i], p[j]) not in pairs and p[j] != q[i])]
        expected.append(-(logits[i, i] - torch.logsumexp(logits[i, keep], 0)))
    assert torch.allclose(loss, torch.stack(expected).mean())
    masked = model.false_negatives(batch, batch)
    assert masked[0, 2] and masked[2, 0]  # in-batch copies of the positive 3
    assert masked[0, 3] and masked[5, 4] and masked[1, 5]  # a candidate that is the row's own query item
    assert masked[0, 4]  # item 0 is known to lead to 6, row 4's positive
    assert not masked[0, 1] and not masked[3].any() and not masked[4].any() and not masked.diagonal().any()


def test_length_buckets_give_the_whole_batch_embeddings_in_order():
    texts = ["serum", "a very long description of a moisturising night cream with retinol and peptides", "lipstick",
             "nail polish in a deep shade of red", "eye cream", "shampoo for dry hair with argan oil", "toner"]
    embedder = Embedder(EmbedderConfig())  # eval mode: no dropout, so the two paths must agree
    items = [3, 1, 6, 0, 1, 5, 2, 4]
    reference = embedder(embedder.inputs.batch([texts[i] for i in items], "query", truncate=True))
    for rows in (1, 3, 16):
        bucketed = ContrastiveModel(embedder, texts, 0.02, np.array([[0, 1]]), bucket_rows=rows).embed(items, "query")
        assert torch.allclose(bucketed, reference, atol=1e-5), rows


def test_retrieval_ranks_match_sorting():
    rng = np.random.default_rng(2)
    q, d = unit(rng.normal(size=(30, 5))), unit(rng.normal(size=(30, 5)))
    pairs = rng.integers(0, 30, size=(40, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    ranks = retrieval_ranks(q, d, pairs, chunk=7)
    for (a, b), r in zip(pairs, ranks):
        order = [i for i in np.argsort(-(d @ q[a]), kind="stable") if i != a]
        assert order.index(b) == r
    tied = np.ones((3, 2), dtype=np.float32) / np.sqrt(2)  # every document scores the same: ties count against
    assert retrieval_ranks(tied, tied, np.array([[0, 1], [1, 2]])).tolist() == [1, 1]


def test_training_writes_a_tuned_backbone_and_resumes_exactly(tiny_data, tmp_path):
    """A tiny random Qwen2 (last-token pooling, the hierarchical prompt) keeps this fast; MiniLM takes the same path."""
    backbone = save_tiny_qwen2(tmp_path / "qwen2")
    cfg = EmbedderTrainConfig(batch_size=16, lr=1e-3, warmup_steps=1, max_epochs=2, max_minutes=5, k=3, pool=8,
                              checkpoint_every=2)
    emb = EmbedderConfig(backbone=str(backbone), max_length=160)
    quiet = lambda *a: None  # noqa: E731
    full = train_embedder(tiny_data, tmp_path / "full", emb, cfg, tmp_path / "run-full", max_steps=4, log=quiet)
    assert full["steps"] == 4 and 0 <= full["valid"]["recall@10"] <= 1
    train_embedder(tiny_data, tmp_path / "half", emb, cfg, tmp_path / "run-half", max_steps=2, log=quiet)
    train_embedder(tiny_data, tmp_path / "half", emb, cfg, tmp_path / "run-half", resume=True, max_steps=4,
                   log=quiet)
    (a, sa), (b, sb) = (read_checkpoint(tmp_path / r) for r in ("run-full", "run-half"))
    assert sa["step"] == sb["step"] == 4
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(x)] for r in ("run-full", "run-half")]
    assert losses[0][-1] == losses[1][-1]

    tuned = load_embedder_config(tmp_path / "full")
    assert tuned.backbone == str(tmp_path / "full") and tuned.max_length == 160
    start = Embedder(emb).model.state_dict()
    after = Embedder(tuned).model.state_dict()
    changed = [n for n in start if not torch.equal(start[n], after[n])]
    assert len(changed) == len(start)  # every tensor moved
    assert (tmp_path / "run-full" / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "full" / CONFIG_FILE).read_text())["max_length"] == 160


def test_two_ranks_train_like_one(tiny_data, tmp_path):
    """Under torchrun each rank embeds half of every batch and scores its queries against the documents of the whole
    batch (a SaHa cluster split between ranks keeps its hard negatives): two ranks reach the weights one process
    reaches (up to float summation order)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    backbone = save_tiny_qwen2(tmp_path / "qwen2")
    exe = str(Path(sys.executable).with_name("genrec"))
    args = ["train", "embedder", "--data", str(tiny_data), "--backbone", str(backbone), "--max-length", "160",
            "--max-steps", "2", "--batch-size", "15", "--k", "3", "--pool", "8", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, name in (([], "one"), ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2"], "two")):
        proc = subprocess.run([*launcher, exe, *args, "--out", str(tmp_path / f"out-{name}"), "--run-dir",
                               str(tmp_path / f"run-{name}")], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(next((tmp_path / "run-one").glob("clusters-epoch0-*.npz"))) as z:
        assert min(len(b) for b in np.split(z["flat"], z["bounds"])[:2]) >= 2  # two ranks skip a one-row batch
    summary = json.loads((tmp_path / "out-two" / "training.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["valid"]["recall@10"] <= 1
    one, two = (read_checkpoint(tmp_path / f"run-{n}")[0]["model"] for n in ("one", "two"))
    from transformers import Qwen2Model

    start = Qwen2Model.from_pretrained(backbone).state_dict()
    moved = 0.0
    for name, w in one.items():
        torch.testing.assert_close(two[name], w, atol=2e-5, rtol=1e-4, msg=name)
        moved = max(moved, float((w - start[name.removeprefix("embedder.model.")]).abs().max()))
    assert moved > 1e-4  # the two steps did move the weights
