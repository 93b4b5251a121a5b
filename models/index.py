"""The FAISS index of a bundle: inner product on unit vectors (= cosine), item ids mapped in the index itself.

The factory string picks the structure: Flat (exact) for small catalogs, HNSW for large ones that fit in memory,
IVF-PQ for very large ones (add ",RFlat" to re-rank the PQ candidates exactly). `auto` is Flat up to 100,000 items
and HNSW32 above. The search-time knobs (HNSW efSearch, IVF nprobe) come from the preset and are applied on load.
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

from genrec.core.config import IndexConfig

AUTO_EXACT_UP_TO = 100_000


def resolve_factory(factory: str, n_items: int) -> str:
    if factory == "auto":
        return "Flat" if n_items <= AUTO_EXACT_UP_TO else "HNSW32"
    return factory


def tune(index: faiss.Index, cfg: IndexConfig) -> faiss.Index:
    """Apply the search-time parameters to whatever structure sits inside the id map."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexRefine):
        inner.k_factor = cfg.refine_factor
        inner = faiss.downcast_index(inner.base_index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = cfg.ef_search
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.nprobe = cfg.nprobe
    return index


def build_index(vectors: np.ndarray, ids: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """(N, D) unit-norm float32 vectors of the items with these ids -> an id-mapped index (search returns ids)."""
    factory = resolve_factory(cfg.factory, len(vectors))
    try:
        inner = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"index.factory {factory!r} is not a FAISS factory string ({str(e).strip()}); try Flat, "
                         f"HNSW32 or IVF256,PQ32") from None
    if not inner.is_trained:
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None and len(vectors) < ivf.nlist:
            raise ValueError(f"index.factory {factory!r} has {ivf.nlist} inverted lists but only {len(vectors)} "
                             f"items to train them: use fewer lists (about 4 * sqrt(N)) or Flat")
        inner.train(vectors)
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids.astype(np.int64))
    return tune(index, cfg)


def load_index(path: Path, cfg: IndexConfig) -> faiss.Index:
    return tune(faiss.read_index(str(path)), cfg)


_GPU_RESOURCES: dict[int, object] = {}  # one set of FAISS GPU resources (streams, scratch memory) per device


def on_device(index: faiss.Index, device: str) -> faiss.Index:
    """The index on GPU `device` (cuda or cuda:N) where FAISS has GPU support (faiss-gpu, the `gpu` extra) and a GPU
    version of its structure (Flat, IVF; the id map comes along); else the index itself, searched on the host (HNSW
    is CPU-only in FAISS, and faiss-cpu has no GPU at all)."""
    if not str(device).startswith("cuda") or not hasattr(faiss, "StandardGpuResources"):
        return index
    gpu = int(str(device).partition(":")[2] or 0)
    resources = _GPU_RESOURCES.setdefault(gpu, faiss.StandardGpuResources())
    try:
        return faiss.index_cpu_to_gpu(resources, gpu, index)
    except RuntimeError:  # a structure FAISS has no GPU version of
        return index


def recall_against_exact(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray,
                         k: int = 10) -> dict:
    """Recall@k of `index` against exact search over the same vectors, and milliseconds per query of both."""
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    exact.add_with_ids(vectors, ids.astype(np.int64))
    t0 = time.perf_counter()
    _, truth = exact.search(queries, k)
    t1 = time.perf_counter()
    _, found = index.search(queries, k)
    t2 = time.perf_counter()
    hits = sum(len(set(a) & set(b)) for a, b in zip(truth.tolist(), found.tolist()))
    return {f"recall@{k}": hits / (k * len(queries)), "exact_ms_per_query": 1e3 * (t1 - t0) / len(queries),
            "index_ms_per_query": 1e3 * (t2 - t1) / len(queries), "queries": len(queries)}
