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
mined. Under DDP each rank's share of a batch is its own set of candidates.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from genrec.atomic import atomic_dir, atomic_file
from genrec.config import EmbedderConfig, EmbedderTrainConfig
from genrec.data import Dataset, load_dataset, train_sequences
from training.loop import Dist, fit, init_distributed, metrics_from_ranks, run_summary

CONFIG_FILE = "genrec_embedder.json"  # the prompt settings a tuned backbone was trained with, beside its weights


def next_item_pairs(seqs: list[np.ndarray]) -> np.ndarray:
    """(P, 2) distinct (item, next item) catalog rows from training sequences, repeats of the same item skipped."""
    pairs = [np.stack([s[:-1], s[1:]], 1) for s in seqs if len(s) >= 2]
    if not pairs:
        raise ValueError("no training pairs: the sequences need at least two items each")
    p = np.unique(np.concatenate(pairs), axis=0)
    return p[p[:, 0] != p[:, 1]].astype(np.int64)


def heldout_pairs(ds: Dataset, split: str) -> np.ndarray:
    """(P, 2): (the item just before the held-out item of `split`, that held-out item), for users with >= 3 items."""
    cut = {"valid": 2, "test": 1}[split]
    rows = [(s[len(s) - cut - 1], s[len(s) - cut]) for s in ds.sequences if len(s) >= 3]
    p = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return p[p[:, 0] != p[:, 1]]


def retrieval_ranks(query_vecs: np.ndarray, doc_vecs: np.ndarray, pairs: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """0-based rank of each pair's next item among all catalog documents for its query (the query item excluded);
    ties count against the target."""
    docs = torch.as_tensor(doc_vecs)
    ranks = []
    for s in range(0, len(pairs), chunk):
        p = torch.as_tensor(pairs[s: s + chunk])
        scores = torch.as_tensor(query_vecs)[p[:, 0]] @ docs.T  # (B, N)
        scores[torch.arange(len(p)), p[:, 0]] = float("-inf")
        target = scores.gather(1, p[:, 1:2])
        ranks.append(((scores >= target).sum(1) - 1).numpy())
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def evaluate_retrieval(embedder, texts: list[str], pairs: np.ndarray, shard: tuple[int, int] = (0, 1),
                       progress: bool = False) -> np.ndarray:
    """Ranks for this shard of pairs: the whole catalog is embedded as documents, the shard's query items as
    queries."""
    pairs = np.array_split(pairs, shard[1])[shard[0]]
    docs = embedder.encode(texts, "document", truncate=True, progress=progress)
    if embedder.inputs.roles_alike:
        return retrieval_ranks(docs, docs, pairs)
    used = np.unique(pairs[:, 0])
    queries = np.zeros_like(docs)
    queries[used] = embedder.encode([texts[i] for i in used], "query", truncate=True, progress=progress)
    return retrieval_ranks(queries, docs, pairs)


def pair_keys(queries, positives, n_items: int) -> np.ndarray:
    return np.asarray(queries, dtype=np.int64) * n_items + np.asarray(positives, dtype=np.int64)


def mine_hard_owners(query_vecs: np.ndarray, doc_vecs: np.ndarray, pairs: np.ndarray, k: int, pool: int,
                     seed: int, chunk: int = 1024) -> np.ndarray:
    """(P, k) pair indices: for each anchor pair, k pairs whose positives are among the `pool` documents nearest the
    anchor's query, chosen as the ones whose queries are least similar to the anchor's (-1 where fewer exist).
    Dropped before that: candidates the anchor's query item is known to lead to (its own positive among them), the
    anchor's query item itself, and candidates whose owner shares the anchor's query item."""
    rng = np.random.default_rng(seed)
    n_items = len(query_vecs)
    known = np.sort(pair_keys(pairs[:, 0], pairs[:, 1], n_items))
    positives = np.unique(pairs[:, 1])
    # One owner per positive item, drawn at random each epoch (an item is the positive of many pairs).
    perm = rng.permutation(len(pairs))
    owner_of = np.full(int(pairs[:, 1].max()) + 1, -1, dtype=np.int64)
    owner_of[pairs[perm, 1]] = perm
    index = faiss.IndexFlatIP(doc_vecs.shape[1])
    index.add(np.ascontiguousarray(doc_vecs[positives]))
    out = np.full((len(pairs), k), -1, dtype=np.int64)
    for s in range(0, len(pairs), chunk):
        a = np.arange(s, min(s + chunk, len(pairs)))
        anchor_q = np.ascontiguousarray(query_vecs[pairs[a, 0]])
        _, found = index.search(anchor_q, min(pool + 2, len(positives)))  # +2: its own positive and query item
        cand_items = positives[found.clip(0)]
        owners = owner_of[cand_items]  # (A, pool+2)
        bad = (found < 0) | (cand_items == pairs[a, 0:1]) | (pairs[owners, 0] == pairs[a, 0:1]) | \
            np.isin(pair_keys(pairs[a, 0:1], cand_items, n_items), known)
        sim = np.einsum("ad,apd->ap", anchor_q, query_vecs[pairs[owners, 0]])
        sim[bad] = np.inf
        keep = np.argsort(sim, 1, kind="stable")[:, :k]
        chosen = np.take_along_axis(owners, keep, 1)
        out[a] = np.where(np.isfinite(np.take_along_axis(sim, keep, 1)), chosen, -1)
    return out


def pack_batches(hard: np.ndarray | None, n_pairs: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Each pair once per epoch. With `hard` (SaHa): anchors in random order, each pulling its not-yet-used hard
    owners into its cluster, clusters never split across batches. Without: random batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_pairs)
    if hard is None:
        return [order[i: i + batch_size] for i in range(0, n_pairs, batch_size)]
    used = np.zeros(n_pairs, dtype=bool)
    batches, current = [], []
    for a in order:
        if used[a]:
            continue
        cluster = [a] + [o for o in hard[a] if o >= 0 and not used[o]]
        used[cluster] = True
        if len(current) + len(cluster) > batch_size:
            batches.append(np.array(current))
            current = []
        current += cluster
    if current:
        batches.append(np.array(current))
    return batches


class ContrastiveModel(torch.nn.Module):
    """forward((B, 2) pair rows) -> InfoNCE loss of the queries against the batch's positives."""

    has_unused_parameters = True  # e.g. BERT's pooler: computed by the backbone, not pooled from

    def __init__(self, embedder, texts: list[str], temperature: float, known_pairs: np.ndarray,
                 bucket_rows: int = 16):
        super().__init__()
        self.embedder, self.texts, self.temperature, self.bucket_rows = embedder, texts, temperature, bucket_rows
        self.known = np.sort(pair_keys(known_pairs[:, 0], known_pairs[:, 1], len(texts)))

    def false_negatives(self, pairs: torch.Tensor) -> torch.Tensor:
        """(B, B) bool, off the diagonal: candidate j is row i's own query item, or an item row i's query item is
        known to lead to (which covers in-batch copies of row i's positive)."""
        q, p = pairs[:, 0].numpy(), pairs[:, 1].numpy()
        known = np.isin(pair_keys(q[:, None], p[None, :], len(self.texts)), self.known) | (p[None, :] == q[:, None])
        return torch.as_tensor(known) & ~torch.eye(len(q), dtype=torch.bool)

    def embed(self, items: list[int], role: str) -> torch.Tensor:
        """(B, D) for these catalog rows, run bucket_rows at a time in length order (a text's embedding does not
        depend on its batch mates, so this only saves the padding), returned in the given order."""
        order = np.argsort([len(self.texts[i]) for i in items], kind="stable")
        parts = [self.embedder(self.embedder.inputs.batch([self.texts[items[i]] for i in order[s: s + self.bucket_rows]],
                                                         role, truncate=True))
                 for s in range(0, len(items), self.bucket_rows)]
        return torch.cat(parts)[torch.as_tensor(np.argsort(order, kind="stable"), device=parts[0].device)]

    def forward(self, pairs: torch.Tensor) -> dict[str, torch.Tensor]:
        q = self.embed(pairs[:, 0].tolist(), "query")
        d = self.embed(pairs[:, 1].tolist(), "document")
        logits = q @ d.T / self.temperature  # (B, B)
        logits = logits.masked_fill(self.false_negatives(pairs).to(logits.device), float("-inf"))
        return {"loss": F.cross_entropy(logits, torch.arange(len(pairs), device=logits.device))}


def load_embedder_config(backbone: str | Path, base: EmbedderConfig | None = None) -> EmbedderConfig:
    """The embedder config for `backbone`: a tuned backbone's own prompt settings (its CONFIG_FILE) over `base`."""
    base = base or EmbedderConfig()
    saved = Path(backbone) / CONFIG_FILE
    extra = json.loads(saved.read_text()) if saved.exists() else {}
    return EmbedderConfig.model_validate({**base.model_dump(), **extra, "backbone": str(backbone)})


def train_embedder(data: str | Path, out: str | Path, embedder_cfg: EmbedderConfig, cfg: EmbedderTrainConfig,
                   run_dir: str | Path | None = None, resume: bool = False, max_steps: int | None = None,
                   log=print) -> dict:
    """Fine-tune the embedder on the dataset's item-to-next-item pairs; writes the best backbone to `out` (a model
    directory for `genrec build --backbone`)."""
    from models.embedder import Embedder

    d = init_distributed()
    ds = load_dataset(data)
    texts = [it.text for it in ds.catalog.items]
    pairs = next_item_pairs(train_sequences(ds))
    valid = heldout_pairs(ds, "valid")
    run_dir = Path(run_dir or Path("runs") / Path(out).name / "embedder")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    embedder = Embedder(embedder_cfg)
    model = ContrastiveModel(embedder, texts, cfg.temperature, pairs, cfg.bucket_rows)
    if d.main:
        log(f"embedder: {len(pairs)} training pairs, {len(valid)} validation pairs, {len(texts)} items; "
            f"{f'SaHa hard negatives (k {cfg.k}, pool {cfg.pool})' if cfg.hard_negatives else 'in-batch negatives'}; "
            f"run dir {run_dir}")

    if d.main and not resume:  # batches mined by an earlier run in this directory belong to its weights
        for stale in run_dir.glob("batches-epoch*.npz"):
            stale.unlink()
    if d.world > 1:
        torch.distributed.barrier()  # no rank reads a stale cache before the main rank has removed it

    def batches(epoch: int) -> list[np.ndarray]:
        seed = cfg.seed * 1000 + epoch
        if not cfg.hard_negatives:
            return pack_batches(None, len(pairs), cfg.batch_size, seed)
        # Mined with the weights at the epoch's start and kept for --resume; keyed by what shapes the batches.
        cache = run_dir / f"batches-epoch{epoch}-b{cfg.batch_size}-k{cfg.k}-p{cfg.pool}-s{cfg.seed}.npz"
        if d.main and not cache.exists():
            was_training = model.training
            model.eval()
            v = embedder.encode(texts, "document", truncate=True, progress=True)
            q = v if embedder.inputs.roles_alike else embedder.encode(texts, "query", truncate=True, progress=True)
            model.train(was_training)
            hard = mine_hard_owners(q, v, pairs, cfg.k, cfg.pool, seed)
            mined = pack_batches(hard, len(pairs), cfg.batch_size, seed)
            full = np.mean([len(b) == cfg.batch_size for b in mined])
            log(f"embedder: epoch {epoch} mined: {(hard >= 0).sum(1).mean():.1f} hard pairs per anchor, "
                f"{len(mined)} batches ({full:.0%} full)")
            with atomic_file(cache, "wb") as f:
                np.savez(f, flat=np.concatenate(mined), bounds=np.cumsum([len(b) for b in mined])[:-1])
        if d.world > 1:
            torch.distributed.barrier()  # the other ranks read what the main rank mined
        with np.load(cache) as z:
            return np.split(z["flat"], z["bounds"])

    def evaluate(m, dd: Dist) -> np.ndarray:
        return evaluate_retrieval(embedder, texts, valid, (dd.rank, dd.world))

    st = fit(model, pairs, evaluate, cfg, run_dir, resume=resume, d=d, max_steps=max_steps, desc="embedder",
             batches=batches, log_every=10)
    summary = {**run_summary(st, cfg, pairs=int(len(pairs))), "embedder": embedder_cfg.model_dump()}
    best = summary["valid"]
    if d.main:
        model.load_state_dict(load_file(str(run_dir / "best.safetensors")))
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


def eval_embedder(data: str | Path, embedder_cfg: EmbedderConfig, split: str = "test", log=print) -> dict:
    from models.embedder import Embedder

    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    ds = load_dataset(data)
    texts = [it.text for it in ds.catalog.items]
    pairs = heldout_pairs(ds, split)
    ranks = evaluate_retrieval(Embedder(embedder_cfg), texts, pairs, progress=True)
    result = {"split": split, "pairs": int(len(pairs)), "items": len(texts), **metrics_from_ranks(ranks),
              "embedder": embedder_cfg.model_dump()}
    log(f"{split}: {len(pairs)} pairs over {len(texts)} items: recall@10 {result['recall@10']:.4f} "
        f"ndcg@10 {result['ndcg@10']:.4f}")
    return result
