"""Contrastive fine-tuning of the embedder: item-to-next-item pairs, SaHa mining and packing against slow references,
the masked InfoNCE loss, retrieval ranks, and a real training run with resume."""

import json

import numpy as np
import torch

from genrec.config import EmbedderConfig, EmbedderTrainConfig
from genrec.data import load_dataset, train_sequences
from models.embedder import Embedder
from tests.tiny_backbones import save_tiny_qwen2
from training.embedder import (CONFIG_FILE, ContrastiveModel, heldout_pairs, load_embedder_config, mine_hard_owners,
                               next_item_pairs, pack_batches, retrieval_ranks, train_embedder)


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


def slow_mine(q, d, pairs, k, pool, owner_of):
    """The rules as stated, one anchor at a time: the pool + 2 nearest positives, then no known positive of the anchor's
    query item, not that item itself, no owner sharing its query item; the k owners least like the anchor."""
    positives = np.unique(pairs[:, 1])
    leads_to = {}
    for qa, pa in pairs:
        leads_to.setdefault(qa, set()).add(pa)
    out = []
    for a, (qa, pa) in enumerate(pairs):
        near = positives[np.argsort(-(d[positives] @ q[qa]), kind="stable")[: pool + 2]]
        owners = [owner_of[i] for i in near if i not in leads_to[qa] and i != qa and pairs[owner_of[i], 0] != qa]
        owners.sort(key=lambda o: float(q[pairs[o, 0]] @ q[qa]))
        out.append((owners[:k] + [-1] * k)[:k])
    return np.array(out)


def test_mining_matches_a_slow_reference():
    rng = np.random.default_rng(0)
    n_items = 60
    q, d = unit(rng.normal(size=(n_items, 8))), unit(rng.normal(size=(n_items, 8)))
    pairs = np.unique(rng.integers(0, n_items, size=(150, 2)), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    fast = mine_hard_owners(q, d, pairs, k=4, pool=10, seed=3, chunk=7)
    # The owner drawn for each positive item is the last pair with that positive in the seeded permutation.
    perm = np.random.default_rng(3).permutation(len(pairs))
    owner_of = {}
    for p in perm:
        owner_of[pairs[p, 1]] = p
    assert (fast == slow_mine(q, d, pairs, 4, 10, owner_of)).all()
    known = {tuple(p) for p in pairs.tolist()}
    for a, row in enumerate(fast):
        for o in row[row >= 0]:  # a mined negative is never a known positive of the anchor's query, nor that item
            assert (pairs[a, 0], pairs[o, 1]) not in known and pairs[o, 1] != pairs[a, 0]


def test_mining_never_offers_the_query_item_itself():
    """With queries and documents embedded alike, an anchor's own query item is its nearest document (cosine 1)."""
    rng = np.random.default_rng(4)
    v = unit(rng.normal(size=(40, 6)))
    pairs = np.array([[i, (i + 1) % 40] for i in range(40)] + [[i, (i + 7) % 40] for i in range(0, 40, 3)])
    hard = mine_hard_owners(v, v, pairs, k=5, pool=12, seed=0)
    for a, row in enumerate(hard):
        assert pairs[a, 0] not in pairs[row[row >= 0], 1]


def test_mining_keeps_the_owners_least_similar_to_the_anchor():
    """Positives 10..13 are all near the anchor's query; their owners' queries get less and less similar to it."""
    q = unit(np.array([[1, 0, 0], [1, 0.1, 0], [1, 1, 0], [0, 1, 0], [-0.3, 0, 1]], dtype=np.float32))
    d = unit(np.zeros((14, 3)) + [1, 0, 0] + np.linspace(0, 0.1, 14)[:, None] * [0, 0, 1])
    pairs = np.array([[0, 9], [1, 10], [2, 11], [3, 12], [4, 13]])
    hard = mine_hard_owners(np.pad(q, ((0, 9), (0, 0))), d, pairs, k=2, pool=4, seed=0)
    assert hard[0].tolist() == [4, 3]  # the two owners whose queries are least like query 0


def test_packing_keeps_clusters_together_and_uses_each_pair_once():
    rng = np.random.default_rng(1)
    hard = rng.integers(-1, 100, size=(100, 3))
    batches = pack_batches(hard, 100, 8, seed=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(100)) and all(len(b) <= 8 for b in batches)
    used, where = set(), {int(x): i for i, b in enumerate(batches) for x in b}
    order = np.random.default_rng(0).permutation(100)
    for a in order:  # every anchor's unused hard owners sit in its batch
        if a in used:
            continue
        cluster = [a] + [o for o in hard[a] if o >= 0 and o not in used]
        used.update(cluster)
        assert {where[c] for c in cluster} == {where[a]}
    plain = pack_batches(None, 100, 8, seed=0)
    assert sorted(np.concatenate(plain).tolist()) == list(range(100))


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
    masked = model.false_negatives(batch)
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
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False) for r in ("run-full", "run-half"))
    assert a["state"]["step"] == b["state"]["step"] == 4
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


def test_torchrun_two_processes(tiny_data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    backbone = save_tiny_qwen2(tmp_path / "qwen2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(sys.executable).with_name("genrec")), "train", "embedder", "--data", str(tiny_data), "--out",
           str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--backbone", str(backbone), "--max-length",
           "160", "--max-steps", "2", "--batch-size", "16", "--k", "3", "--pool", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "training.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["valid"]["recall@10"] <= 1
