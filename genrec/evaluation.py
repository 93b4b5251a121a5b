"""Full-catalog evaluation (leave-one-out, Recall/NDCG@5/10) of the recommender and its baselines.

Metrics are computed from the ranked lists that are also written as predictions, so anyone can recompute them.
The "window" split is the horizon evaluation (DESIGN.md, Rewards): the validation context against its window of the
last two items, scored by window-Recall/NDCG@10 next to the next-item metrics of the same lists.
A missing or invalid slot (no item, a duplicate) is a miss and counts in the invalid rate. Two protocols: TIGER's
(nothing filtered) and, with `filter_seen`, the eSASRec / RecTools one, where the items a user already has are kept
out of every model's list (the 5-core data hold no repeated items, so a seen item is never the target).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from genrec.core.atomic import atomic_file
from genrec.core.bundle import Bundle
from genrec.core.config import EmbedderConfig, VedConfig
from genrec.core.data import Dataset, Split, eval_split, load_dataset, popularity, seen_items, window_split
from genrec.core.device import resolve_device
from genrec.core.metrics import hit_ranks, metrics_from_ranks, ranking_metrics, window_metrics
from genrec.models.decoding import Trie, beam_search
from genrec.models.embedder import Embedder
from genrec.models.loading import SASREC_FILE, load_recommender, load_sasrec, load_value_head
from genrec.models.recommender import Recommender
from genrec.models.sasrec import SASRec
from genrec.models.value import ValueHead
from genrec.models.ved import beam_budget, ved_decode


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def seen_mask(seen: list[np.ndarray] | None, rows: slice, n_items: int) -> torch.Tensor | None:
    """(B, N) bool: the items users `rows` of `seen` already have (None when nothing is filtered)."""
    if seen is None:
        return None
    part = seen[rows]
    mask = torch.zeros(len(part), n_items, dtype=torch.bool)
    mask[torch.as_tensor(np.repeat(np.arange(len(part)), [len(s) for s in part])),
         torch.as_tensor(np.concatenate(part) if part else np.zeros(0, dtype=np.int64))] = True
    return mask


@torch.no_grad()
def generate_topk(model: Recommender, trie: Trie, histories: np.ndarray, k: int, beam_width: int,
                  batch_size: int = 256, decoding: str = "beam", value_head: ValueHead | None = None,
                  budget: int | None = None, ved: VedConfig = VedConfig(),
                  seen: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, T) histories -> (N, k) catalog rows, their scores, and the model forwards spent per user, by constrained
    beam search (k <= beam_width; its forwards are 1 + (D - 1) * beam_width) or VED (any k, within `budget`).
    seen: per user, items never to return."""
    items = [np.zeros((0, k), dtype=np.int64)]  # a shard may have no users: (0, k), not an error
    scores, forwards = [np.zeros((0, k), dtype=np.float32)], [np.zeros(0, dtype=np.int64)]
    device = model_device(model)
    for s in range(0, len(histories), batch_size):
        h = torch.as_tensor(histories[s: s + batch_size])
        h = h[:, -max(1, int((h >= 0).sum(1).max())):].to(device)  # drop columns of padding for the whole batch
        exclude = None if seen is None else trie.exclusion(seen[s: s + batch_size])
        if decoding == "ved":
            rec = ved_decode(model, value_head, trie, h, k, beam_width, budget, ved, exclude)
            forwards.append(rec.forwards.cpu().numpy())
        else:
            rec = beam_search(model, trie, h, beam_width, min(k, beam_width), exclude)
            forwards.append(np.full(len(h), beam_budget(trie.depth, beam_width)))
        got = rec.items.shape[1]
        items.append(np.pad(rec.items.cpu().numpy(), ((0, 0), (0, k - got)), constant_values=-1))
        scores.append(np.pad(rec.scores.float().cpu().numpy(), ((0, 0), (0, k - got)), constant_values=-np.inf))
    return np.concatenate(items), np.concatenate(scores), np.concatenate(forwards)


@torch.no_grad()
def sasrec_topk(model: SASRec, histories: np.ndarray, k: int, batch_size: int = 512,
                seen: list[np.ndarray] | None = None) -> np.ndarray:
    out = [np.zeros((0, k), dtype=np.int64)]
    device = model_device(model)
    for s in range(0, len(histories), batch_size):
        scores = model.scores(torch.as_tensor(histories[s: s + batch_size]).to(device))  # (B, N)
        exclude = seen_mask(seen, slice(s, s + batch_size), model.n_items)
        if exclude is not None:
            scores = scores.masked_fill(exclude.to(device), float("-inf"))
        out.append(scores.topk(k, dim=1).indices.cpu().numpy())
    return np.concatenate(out)


def popularity_topk(counts: np.ndarray, n_users: int, k: int, seen: list[np.ndarray] | None = None,
                    batch_size: int = 512) -> np.ndarray:
    """The k most popular items for every user (ties to the lower row), leaving out each user's seen items."""
    order = np.argsort(-counts, kind="stable")
    if seen is None:
        return np.tile(order[:k], (n_users, 1))
    rank = torch.as_tensor(np.argsort(order).astype(np.float32))  # item -> its popularity rank
    out = []
    for s in range(0, n_users, batch_size):
        exclude = seen_mask(seen, slice(s, s + batch_size), len(counts))
        out.append((-rank).expand(len(exclude), -1).masked_fill(exclude, float("-inf")).topk(k, dim=1).indices.numpy())
    return np.concatenate(out)


def invalid_rate(topk: np.ndarray) -> float:
    """Share of the K slots per user that hold no valid, distinct catalog item."""
    bad = (topk < 0).sum()
    for row in topk:
        real = row[row >= 0]
        bad += len(real) - len(np.unique(real))
    return float(bad / topk.size) if topk.size else 0.0


def recommender_ranks(model: Recommender, trie: Trie, split: Split, beam_width: int, shard=(0, 1)) -> np.ndarray:
    """Ranks of the targets for one shard of users (used by the trainer's validation)."""
    rank, world = shard
    h, t = split.histories[rank::world], split.targets[rank::world]
    topk, _, _ = generate_topk(model, trie, h, min(10, beam_width), beam_width)
    return hit_ranks(topk, t)


def sasrec_ranks(model: SASRec, split: Split, shard=(0, 1)) -> np.ndarray:
    rank, world = shard
    return hit_ranks(sasrec_topk(model, split.histories[rank::world], 10), split.targets[rank::world])


def write_predictions(path: Path, split: Split, topk_rows: np.ndarray, scores: np.ndarray | None,
                      item_ids: np.ndarray) -> None:
    with atomic_file(path) as f:
        for i, user in enumerate(split.users):
            row = topk_rows[i]
            rec = {"user": int(user), "target": int(item_ids[split.targets[i]]),
                   "topk": [int(item_ids[r]) if r >= 0 else None for r in row]}
            if split.window is not None:
                rec["window"] = [int(item_ids[w]) for w in split.window[i] if w >= 0]
            if scores is not None:
                rec["scores"] = [round(float(s), 5) if np.isfinite(s) else None for s in scores[i]]
            f.write(json.dumps(rec) + "\n")


def fit_of(bundle: Bundle, model: str) -> str:
    """'valid' (trained on all but the last two items of each user) or 'test' (the validation item included)."""
    return bundle.manifest.get("training", {}).get(model, {}).get("fit", "valid")


def evaluate(bundle: Bundle, ds: Dataset, split_name: str, k: int = 10, beam_width: int = 20,
             predictions: Path | None = None, log=print, decoding: str = "beam", budget: int | None = None,
             filter_seen: bool = False, rescore: float | None = None, device: str = "cpu") -> dict:
    """Evaluate the bundle's recommender and the baselines on one split, on `device`; returns the results as a dict.
    decoding "beam" (width beam_width) or "ved" (initial beam beam_width, `budget` forwards, default the beam's).
    filter_seen keeps each user's earlier items out of every list (the eSASRec protocol). rescore: the weight of
    the item-level score in the beam's ranking, instead of the bundle's."""
    bundle.check_catalog(ds)
    if split_name not in ("valid", "test", "window"):
        raise ValueError(f"split must be valid, test or window, got {split_name!r}")
    context = "test" if split_name == "test" else "valid"  # the window split starts from the validation context
    if context == "valid" and fit_of(bundle, "sft") == "test":
        raise ValueError(f"{bundle.path}: the recommender was fitted with the validation items (`--fit test`), so "
                         f"the {split_name} split would be scored on its own training data: evaluate --split test")
    device = str(resolve_device(device))
    model = load_recommender(bundle, device)
    trie = model.trie
    if rescore is not None:
        model.cfg = model.cfg.model_validate({**model.cfg.model_dump(), "rescore": rescore})

    def split_of(max_history: int) -> Split:
        return window_split(ds, max_history) if split_name == "window" else eval_split(ds, split_name, max_history)

    def metrics_of(topk: np.ndarray) -> dict[str, float]:
        m = ranking_metrics(topk, split.targets)
        return {**m, **window_metrics(topk, split.window, (5, 10))} if split.window is not None else m

    split = split_of(model.cfg.max_history)
    seen = seen_items(ds, context) if filter_seen else None
    item_ids = bundle.catalog.ids
    value_head = load_value_head(bundle, device) if decoding == "ved" else None
    budget = budget or beam_budget(trie.depth, beam_width)
    results: dict = {"split": split_name, "users": int(len(split.targets)), "items": len(bundle.catalog),
                     "decoding": decoding, "beam_width": beam_width, "budget": budget, "k": k,
                     "filter_seen": filter_seen, "fit": fit_of(bundle, "sft"), "rescore": model.cfg.rescore,
                     "device": device}
    if decoding == "ved":
        results["ved"] = bundle.preset.ved.model_dump()
    t0 = time.time()
    topk, scores, forwards = generate_topk(model, trie, split.histories, k, beam_width, decoding=decoding,
                                           value_head=value_head, budget=budget, ved=bundle.preset.ved, seen=seen)
    elapsed = time.time() - t0
    metrics = metrics_of(topk)
    results.update(metrics)
    results["invalid_rate"] = invalid_rate(topk)
    results["forwards_per_user"] = round(float(forwards.mean()), 2)
    results["decode_seconds"] = round(elapsed, 2)
    results["users_per_second"] = round(len(topk) / elapsed, 1)
    if predictions is not None:
        write_predictions(Path(predictions), split, topk, scores, item_ids)

    counts = popularity(seen_items(ds, context), len(bundle.catalog))
    baselines = {"popularity": metrics_of(popularity_topk(counts, len(split.targets), k, seen))}
    if bundle.has(SASREC_FILE) and not (context == "valid" and fit_of(bundle, "sasrec") == "test"):
        sas = load_sasrec(bundle, device)
        histories = split_of(sas.cfg.max_history).histories  # its own window (e.g. 50 items)
        baselines["sasrec"] = metrics_of(sasrec_topk(sas, histories, k, seen=seen))
        results["fit_sasrec"] = fit_of(bundle, "sasrec")
    results["baselines"] = baselines
    for name, m in [("genrec", metrics), *baselines.items()]:
        log(f"{name:>12}: " + "  ".join(f"{key} {val:.4f}" for key, val in m.items()))
    log(f"{'':>12}  invalid rate {results['invalid_rate']:.4f}, {results['users']} users, "
        f"{results['users_per_second']} users/s")
    return results


# Item-to-next-item retrieval: the embedder's task (genrec embedder eval, and validation of genrec train embedder).

def heldout_pairs(ds: Dataset, split: str, with_positions: bool = False):
    """(P, 2): (the item just before the held-out item of `split`, that held-out item), for users with >= 3 items;
    with_positions: also each pair's user position in the whole dataset (P,), which places a shard's pairs."""
    cut = {"valid": 2, "test": 1}[split]
    users = np.array([i for i, s in enumerate(ds.sequences) if len(s) >= 3], dtype=np.int64)
    p = np.array([ds.sequences[i][len(ds.sequences[i]) - cut - 1: len(ds.sequences[i]) - cut + 1] for i in users],
                 dtype=np.int64).reshape(-1, 2)
    keep = p[:, 0] != p[:, 1]
    return (p[keep], ds.positions[users[keep]]) if with_positions else p[keep]


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


def eval_embedder(data: str | Path, embedder_cfg: EmbedderConfig, split: str = "test", log=print,
                  device: str = "cpu") -> dict:
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    ds = load_dataset(data)
    texts = [it.text for it in ds.catalog.items]
    pairs = heldout_pairs(ds, split)
    ranks = evaluate_retrieval(Embedder(embedder_cfg, str(resolve_device(device))), texts, pairs, progress=True)
    result = {"split": split, "pairs": int(len(pairs)), "items": len(texts), **metrics_from_ranks(ranks),
              "embedder": embedder_cfg.model_dump()}
    log(f"{split}: {len(pairs)} pairs over {len(texts)} items: recall@10 {result['recall@10']:.4f} "
        f"ndcg@10 {result['ndcg@10']:.4f}")
    return result
