"""`genrec train embedder` and `genrec eval embedder`: item-to-next-item retrieval with contrastive fine-tuning and
SaHa self-aware hard negatives (DESIGN.md, The embedder).

The task: from the training part of every sequence (never the validation or test positions), pairs (item, the item
the same user took next); the query is the first item's text, the positive the next item's text. Evaluation pairs come
from the held-out positions (validation: second-to-last item -> the item before it as query; test: last item), and
the true next item is ranked against the whole catalog (the query item itself excluded).

SaHa, once per epoch with the model's current weights: embed every catalog item as a query and as a document; for
each anchor pair retrieve a pool of the documents nearest its query; map each candidate document back to a pair that
owns it (a pair whose positive it is); drop likely false negatives by keeping the k owners whose *queries* are least
similar to the anchor's query; pack the anchor and those k pairs into the same batch, so every positive in the
cluster is a hard negative for the others. Loss: InfoNCE over the in-batch positives at temperature 0.02. Known
false negatives never count: a candidate that is the row's own query item, or any item the row's query item is known
to lead to in the training pairs (its own positive and the copies of it included), is masked in the loss and never
mined. Under DDP every rank embeds its share of a batch and scores its queries against the documents of the whole
batch (gathered from all ranks, gradients flowing back), so a SaHa cluster split between ranks keeps its hard
negatives and two ranks train like one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from genrec.core.atomic import atomic_dir, atomic_file
from genrec.core.config import EmbedderConfig, EmbedderTrainConfig
from genrec.core.data import load_dataset, train_sequences
from genrec.evaluation import evaluate_retrieval, heldout_pairs
from genrec.models.embedder import CONFIG_FILE
from genrec.training.loop import (Dist, Supervised, barrier, broadcast_from_main, gather_objects, init_distributed,
                                  load_best, random_batches, run, run_summary, supervised_loop)
from genrec.training.shards import sample_mask


def next_item_pairs(seqs: list[np.ndarray]) -> np.ndarray:
    """(P, 2) distinct (item, next item) catalog rows from training sequences, repeats of the same item skipped."""
    pairs = [np.stack([s[:-1], s[1:]], 1) for s in seqs if len(s) >= 2]
    p = np.unique(np.concatenate(pairs or [np.zeros((0, 2), dtype=np.int64)]), axis=0)
    return p[p[:, 0] != p[:, 1]].astype(np.int64)


def pair_keys(queries, positives, n_items: int) -> np.ndarray:
    return np.asarray(queries, dtype=np.int64) * n_items + np.asarray(positives, dtype=np.int64)


def known_keys(pairs: np.ndarray, n_items: int) -> np.ndarray:
    """The sorted pair_keys of `pairs`, for is_known."""
    return np.sort(pair_keys(pairs[:, 0], pairs[:, 1], n_items))


def is_known(keys: np.ndarray, known: np.ndarray) -> np.ndarray:
    """keys in the sorted array `known` (np.isin would sort `known` again on every call)."""
    if len(known) == 0:
        return np.zeros(np.shape(keys), dtype=bool)
    at = np.searchsorted(known, keys).clip(max=len(known) - 1)
    return known[at] == keys


def known_false_negatives(queries: np.ndarray, candidates: np.ndarray, known: np.ndarray, n_items: int) -> np.ndarray:
    """(Q, C) bool: candidate c is query q's own item, or an item q is known to lead to (`known`: sorted pair_keys
    of the training pairs). The one rule for what is never a negative: in the loss, in mining and in the counts."""
    q, c = np.asarray(queries)[:, None], np.asarray(candidates)[None, :]
    return is_known(pair_keys(q, c, n_items), known) | (c == q)


def nearest_positives(query_vecs: np.ndarray, doc_vecs: np.ndarray, pairs: np.ndarray, pool: int,
                      chunk: int = 1024) -> np.ndarray:
    """(P, pool + 2) catalog rows: the positive items nearest each pair's query, nearest first (-1 past the end).
    The 2 extra leave room for the pair's own positive and query item, which mining drops."""
    positives = np.unique(pairs[:, 1])
    index = faiss.IndexFlatIP(doc_vecs.shape[1])
    index.add(np.ascontiguousarray(doc_vecs[positives]))
    near = np.full((len(pairs), pool + 2), -1, dtype=np.int64)
    width = min(pool + 2, len(positives))
    for s in range(0, len(pairs), chunk):
        _, found = index.search(np.ascontiguousarray(query_vecs[pairs[s: s + chunk, 0]]), width)
        near[s: s + chunk, :width] = np.where(found >= 0, positives[found.clip(0)], -1)
    return near


def hard_clusters(query_vecs: np.ndarray, near: np.ndarray, pairs: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """SaHa clusters covering every pair once: anchors in random order; each takes, among the pairs not yet in a
    cluster whose positives are its `near` documents (from nearest_positives), the k whose queries are least similar
    to its own, one per document (an item is the positive of many pairs: its least similar free owner stands for
    it). Taking owners as they are still free matters: the least similar owners are much the same for every anchor
    (a few odd queries are far from all), and fixed lists would leave most anchors with none after the first few
    thousand clusters. Never offered: candidates the anchor's query item is known to lead to (its own positive among
    them), the anchor's query item itself, and owners that share the anchor's query item."""
    n_items = len(query_vecs)
    known = known_keys(pairs, n_items)
    by_positive = np.argsort(pairs[:, 1], kind="stable")  # the owners of item c: by_positive[first[c]: first[c + 1]]
    first = np.searchsorted(pairs[by_positive, 1], np.arange(n_items + 1))
    used = np.zeros(len(pairs), dtype=bool)
    clusters = []
    for a in np.random.default_rng(seed).permutation(len(pairs)):
        if used[a]:
            continue
        qa = pairs[a, 0]
        cand = near[a][near[a] >= 0]
        cand = cand[~known_false_negatives(pairs[a: a + 1, 0], cand, known, n_items)[0]]
        n = first[cand + 1] - first[cand]  # their owners, listed one candidate after another
        owner = by_positive[np.repeat(first[cand], n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)]
        item = np.repeat(cand, n)
        free = ~used[owner] & (pairs[owner, 0] != qa)
        owner, item = owner[free], item[free]
        sim = (query_vecs @ query_vecs[qa])[pairs[owner, 0]]
        o = np.lexsort((sim, item))  # per document, least similar owner first
        head = o[np.r_[True, item[o][1:] != item[o][:-1]]] if len(o) else o
        chosen = owner[head][np.lexsort((owner[head], sim[head]))[:k]]  # ties: lower pair index first
        cluster = np.concatenate([[a], chosen]).astype(np.int64)
        used[cluster] = True
        clusters.append(cluster)
    return clusters


def hard_negatives_per_row(batches: list[np.ndarray], near: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(P,) for every pair, how many other positives in its batch are among its query's `near` documents and not
    masked as known false negatives: the hard negatives the loss actually sees for that row."""
    n_items = int(pairs.max()) + 1
    known = known_keys(pairs, n_items)
    count = np.zeros(len(pairs), dtype=np.int64)
    for b in batches:
        q, p = pairs[b, 0], pairs[b, 1]
        hit = (near[b][:, :, None] == p[None, None, :]).any(1)  # (B, B): row i's near list holds positive j
        masked = known_false_negatives(q, p, known, n_items)
        count[b] = (hit & ~masked & ~np.eye(len(b), dtype=bool)).sum(1)
    return count


def fill_batches(clusters: list[np.ndarray], batch_size: int, window: int = 8) -> list[np.ndarray]:
    """Clusters into batches of at most batch_size, a cluster never split across two: each goes into the first of the
    last `window` open batches it fits in (first fit), so short clusters fill the gaps the long ones leave."""
    done, open_batches = [], []
    for cluster in clusters:
        if len(cluster) > batch_size:
            raise ValueError(f"a cluster of {len(cluster)} pairs does not fit a batch of {batch_size}")
        home = next((b for b in open_batches if len(b) + len(cluster) <= batch_size), None)
        if home is None:
            home = []
            open_batches.append(home)
        home += cluster.tolist()
        done += [b for b in open_batches if len(b) == batch_size]
        open_batches = [b for b in open_batches if len(b) < batch_size]
        if len(open_batches) > window:
            done.append(open_batches.pop(0))
    return [np.array(b) for b in done + open_batches]


class ContrastiveModel(torch.nn.Module):
    """forward((B, 2) pair rows) -> InfoNCE loss of the queries against the batch's positives."""

    has_unused_parameters = True  # e.g. BERT's pooler: computed by the backbone, not pooled from

    def __init__(self, embedder, texts: list[str], temperature: float, known_pairs: np.ndarray,
                 bucket_rows: int = 16):
        super().__init__()
        self.embedder, self.texts, self.temperature, self.bucket_rows = embedder, texts, temperature, bucket_rows
        self.known = known_keys(known_pairs, len(texts))

    def false_negatives(self, pairs: torch.Tensor, candidates: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(B, C) bool: candidate j (of the whole batch's pairs, this rank's rows from `offset`) is row i's own query
        item, or an item row i's query item is known to lead to (which covers in-batch copies of row i's positive);
        never row i's own positive."""
        q, c = pairs[:, 0].numpy(), candidates[:, 1].numpy()
        known = torch.as_tensor(known_false_negatives(q, c, self.known, len(self.texts)))
        known[torch.arange(len(q)), offset + torch.arange(len(q))] = False
        return known

    def embed(self, items: list[int], role: str) -> torch.Tensor:
        """(B, D) for these catalog rows, run bucket_rows at a time in length order (a text's embedding does not
        depend on its batch mates, so this only saves the padding), returned in the given order."""
        order = np.argsort([len(self.texts[i]) for i in items], kind="stable")
        prep, step = self.embedder.inputs, self.bucket_rows
        parts = [self.embedder(prep.batch([self.texts[items[i]] for i in order[s: s + step]], role, truncate=True))
                 for s in range(0, len(items), step)]
        return torch.cat(parts)[torch.as_tensor(np.argsort(order, kind="stable"), device=parts[0].device)]

    def forward(self, pairs: torch.Tensor) -> dict[str, torch.Tensor]:
        pairs = pairs.cpu()  # catalog ids: they index texts and the known-pair table on the host
        q = self.embed(pairs[:, 0].tolist(), "query")
        d = self.embed(pairs[:, 1].tolist(), "document")
        all_pairs, all_d, offset = gather_batch(pairs, d)
        logits = q.float() @ all_d.float().T / self.temperature  # (B, whole batch); fp32: / 0.02 magnifies bf16 steps
        logits = logits.masked_fill(self.false_negatives(pairs, all_pairs, offset).to(logits.device), float("-inf"))
        targets = offset + torch.arange(len(pairs), device=logits.device)
        # The mean over the whole batch: DDP averages the ranks' gradients, so each rank's sum is scaled by world / B
        # (the logged loss is rank 0's: its rows' mean when the batch splits evenly).
        world = dist.get_world_size() if dist.is_initialized() else 1
        loss = F.cross_entropy(logits, targets, reduction="sum") * (world / len(all_pairs))
        return {"loss": loss}


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-shaped tensors along dim 0; backward: every rank's gradient summed, this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def gather_batch(pairs: torch.Tensor, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's (pairs, document embeddings) in rank order, and where this rank's rows start; the identity
    outside DDP. Gradients flow back from every rank's loss to the rank that embedded the document."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return pairs, docs, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    every = [None] * world
    dist.all_gather_object(every, pairs)  # a few ids, no gradient
    sizes = [len(p) for p in every]
    pad = max(sizes) - len(pairs)  # all_gather wants equal shapes; a batch may not split evenly
    docs_every = _GatherRows.apply(F.pad(docs, (0, 0, 0, pad))).view(world, -1, docs.shape[1])
    all_docs = torch.cat([x[:n] for x, n in zip(docs_every, sizes)])
    return torch.cat(every), all_docs, sum(sizes[:rank])


def train_embedder(data: str | Path, out: str | Path, embedder_cfg: EmbedderConfig, cfg: EmbedderTrainConfig,
                   run_dir: str | Path | None = None, resume: bool = False, max_steps: int | None = None,
                   log=print, device: str = "auto") -> dict:
    """Fine-tune the embedder on the dataset's item-to-next-item pairs; writes the best backbone to `out` (a model
    directory for `genrec build --backbone`)."""
    from genrec.models.embedder import Embedder

    d = init_distributed(device)
    ds = load_dataset(data, shard=(d.rank, d.world))  # this rank's users; the catalog (the texts) is whole
    texts = [it.text for it in ds.catalog.items]
    # The training pairs are a few ids each, and every rank needs all of them (mining, the known-negative mask): each
    # rank derives its users' pairs and the process group joins them into the set one process derives.
    pairs = np.unique(np.concatenate(gather_objects(next_item_pairs(train_sequences(ds)), d)), axis=0)
    if not len(pairs):  # every rank sees the same joined set, so every rank stops here
        raise ValueError("no training pairs: the sequences need at least two different items in a row")
    valid, positions = heldout_pairs(ds, "valid", with_positions=True)
    valid = valid[sample_mask(positions, cfg.valid_users, cfg.seed, d)]  # this rank's part of one seeded sample
    n_valid = sum(gather_objects(len(valid), d))
    run_dir = Path(run_dir or Path("runs") / Path(out).name / "embedder")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    # fp32 weights on every device: AdamW's updates at lr 2e-5 vanish in bf16 weights; CUDA computes under bf16
    # autocast instead (the loop's Supervised task). The saved settings keep the serving dtype the config asks.
    embedder = Embedder(embedder_cfg.model_copy(update={"dtype": "float32"}), str(d.device))
    model = ContrastiveModel(embedder, texts, cfg.temperature, pairs, cfg.bucket_rows)
    if d.main:
        log(f"embedder: {len(pairs)} training pairs, {n_valid} validation pairs, {len(texts)} items; "
            f"{f'SaHa hard negatives (k {cfg.k}, pool {cfg.pool})' if cfg.hard_negatives else 'in-batch negatives'}; "
            f"run dir {run_dir}")

    if d.main and not resume:  # batches mined by an earlier run in this directory belong to its weights
        for stale in run_dir.glob("*-epoch*.npz"):
            stale.unlink()
    barrier(d)  # no rank reads a stale cache before the main rank has removed it

    def batches(epoch: int) -> list[np.ndarray]:
        seed = cfg.seed * 1000 + epoch
        if not cfg.hard_negatives:
            return random_batches(len(pairs), cfg.batch_size, seed)
        # Mined with the weights at the epoch's start and kept for --resume; keyed by what shapes the batches.
        cache = run_dir / f"clusters-epoch{epoch}-b{cfg.batch_size}-k{cfg.k}-p{cfg.pool}-s{cfg.seed}.npz"
        mined = None
        if d.main and cache.exists():
            with np.load(cache) as z:
                mined = np.split(z["flat"], z["bounds"])
        elif d.main:
            was_training = model.training
            model.eval()
            v = embedder.encode(texts, "document", truncate=True, progress=True)
            q = v if embedder.inputs.roles_alike else embedder.encode(texts, "query", truncate=True, progress=True)
            model.train(was_training)
            near = nearest_positives(q, v, pairs, cfg.pool)
            clusters = hard_clusters(q, near, pairs, cfg.k, seed)
            # Late anchors find their pools taken: shuffled, their short clusters fill the gaps between full ones
            # instead of making the end of the epoch plain in-batch.
            shuffled = [clusters[i] for i in np.random.default_rng(seed + 1).permutation(len(clusters))]
            mined = fill_batches(shuffled, cfg.batch_size)
            full = np.mean([len(b) == cfg.batch_size for b in mined])
            per_row = hard_negatives_per_row(mined, near, pairs)
            owners = np.mean([len(c) - 1 for c in clusters])
            log(f"embedder: epoch {epoch} mined: {len(clusters)} clusters, {owners:.1f} hard pairs per anchor, "
                f"{len(mined)} batches ({full:.0%} full); a row sees {per_row.mean():.2f} hard negatives on average, "
                f"{(per_row > 0).mean():.0%} of rows at least one")
            with atomic_file(cache, "wb") as f:  # kept on the main rank's disk for --resume
                np.savez(f, flat=np.concatenate(mined), bounds=np.cumsum([len(b) for b in mined])[:-1])
        return broadcast_from_main(mined, d)  # the other ranks may be on machines without this disk

    def evaluate(m, dd: Dist) -> np.ndarray:
        return evaluate_retrieval(embedder, texts, valid)  # this rank's validation pairs; the loop gathers

    task = Supervised(model, pairs, cfg, evaluate, d, batches=batches)
    recipe = {**cfg.model_dump(), "embedder": embedder_cfg.model_dump()}
    st = run(task, supervised_loop(cfg, max_steps, log_every=10), run_dir, recipe, resume, d, desc="embedder")
    summary = {**run_summary(st, cfg, pairs=int(len(pairs))), "embedder": embedder_cfg.model_dump()}
    best = summary["valid"]
    if d.main:
        load_best(task, run_dir)
        out = Path(out)
        with atomic_dir(out) as tmp:
            embedder.save_pretrained(tmp)
            settings = embedder_cfg.model_dump(exclude={"backbone"})
            (tmp / CONFIG_FILE).write_text(json.dumps(settings, indent=2))
            (tmp / "training.json").write_text(json.dumps(summary, indent=2))
        log(f"embedder: best validation recall@10 {best.get('recall@10', float('nan')):.4f} ndcg@10 "
            f"{best.get('ndcg@10', float('nan')):.4f} at step {st.best_step}; {st.step} steps in "
            f"{st.elapsed / 60:.1f} min; backbone written to {out}")
    return summary
