"""The serving mechanism: one loaded bundle and the batched computations the servicers ask of it.

An Engine is immutable once loaded and warmed. Hot swap (server/swap.py) builds a new Engine and replaces the
reference; every request carries the Engine that validated it, so its catalog rows are computed on the same bundle.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch

from genrec.core.bundle import Bundle, BundleError
from genrec.core.config import EmbedderConfig
from genrec.models.decoding import beam_search
from genrec.models.embedder import Embedder, EmbedInput, PromptTokenizer
from genrec.models.loading import load_recommender, load_search_index, load_value_head
from genrec.models.onnx_embedder import ONNX_FILE
from genrec.models.ved import SearchStopped, beam_budget, ved_decode
from genrec.server.batching import batch_alive, grouped
from genrec.server.errors import Abandoned

Role = Literal["query", "document"]
Backend = Literal["torch", "onnx"]


@dataclass(frozen=True)
class RecommendQuery:
    history: np.ndarray  # (T,) catalog rows, most recent last, T <= the model's max_history
    seen: np.ndarray  # (S,) every catalog row of the request's history (exclusion covers all of it)
    k: int
    beam_width: int
    exclude_seen: bool
    strategy: str = "beam"  # or "ved"
    budget: int = 0  # VED: model forwards to spend


@dataclass(frozen=True)
class EmbedQuery:
    inputs: tuple[EmbedInput, ...]
    role: Role


@dataclass(frozen=True)
class SearchQuery:
    k: int
    text: str | None = None
    image: bytes | None = None
    vector: np.ndarray | None = None  # (D,) float32, finite


@dataclass(frozen=True)
class Hit:
    item_id: int
    score: float
    title: str


class SharedEmbedder:
    """The bundle's embedder (torch, or its ONNX export under onnxruntime) behind a lock: the Embed and Search queues
    both call it, and a Hugging Face fast tokenizer raises 'Already borrowed' when two threads use it at once.
    Validation tokenizes with a second tokenizer under its own lock, so it never waits for a running batch.
    Shared across hot swaps when the config, device and backend are equal."""

    def __init__(self, cfg: EmbedderConfig, device: str = "cpu", backend: Backend = "torch",
                 onnx_path: Path | None = None, threads: int | None = None):
        self.cfg, self.device, self.backend, self.threads = cfg, device, backend, threads
        if backend == "onnx":
            from genrec.models.onnx_embedder import OnnxEmbedder

            if onnx_path is None or not onnx_path.exists():
                raise BundleError(f"--backend onnx needs {ONNX_FILE} in the bundle: run `genrec embedder export-onnx "
                                  f"--bundle {onnx_path.parent if onnx_path else 'BUNDLE'}` first, or serve with "
                                  f"--backend torch")
            cuda = torch.device(device)
            providers = [("CUDAExecutionProvider", {"device_id": cuda.index or 0}), "CPUExecutionProvider"] \
                if cuda.type == "cuda" else ["CPUExecutionProvider"]
            self._model = OnnxEmbedder(cfg, onnx_path, providers, threads)
        else:
            self._model = Embedder(cfg, device)
        self.dim, self.accepts_images = self._model.dim, self._model.accepts_images
        self._lock = threading.Lock()
        self._checker = PromptTokenizer(self._model.inputs.path, cfg, self._model.kind)
        self._check_lock = threading.Lock()

    def check(self, inputs: list[EmbedInput], role: Role, labels: list[str]) -> None:
        """Raises ValueError naming the input (by its label) that cannot be embedded: empty, an undecodable image,
        text over the token limit. Everything that passes here embeds without error."""
        with self._check_lock:
            self._checker.check(inputs, labels)
            self._checker.batch(inputs, role, truncate=False, labels=labels)

    def encode(self, inputs: list[EmbedInput], role: Role) -> np.ndarray:
        """(N, D) unit-norm float32; the prompt (if the backbone uses one) depends on the role."""
        with self._lock:
            return self._model.encode(inputs, role)


def set_compute_threads(threads: int = 0) -> int:
    """Threads of every compute library the server uses (torch intra-op, FAISS's OpenMP, ONNX Runtime sessions
    made from now on); 0 = the cores this process may run on. Each library otherwise picks its own count, and
    together with the RPC threads they oversubscribe the cores. Returns the count."""
    import os

    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    global _THREADS
    _THREADS = threads
    return threads


_THREADS: int | None = None


def compute_threads() -> int | None:
    """What set_compute_threads chose (None before it ran: each library's default)."""
    return _THREADS


def _manifest_bytes(path: Path) -> bytes | None:
    try:
        return (path / "manifest.json").read_bytes()
    except OSError:
        return None  # missing, or mid-swap (the directory is renamed away for a moment)


class Engine:
    """A bundle ready to serve: recommender + trie, FAISS index, embedder, catalog."""

    def __init__(self, bundle: Bundle, embedder: SharedEmbedder | None, device: str = "cpu"):
        self.bundle, self.embedder, self.device = bundle, embedder, device
        self.path = bundle.path
        self.catalog = bundle.catalog
        self.manifest_bytes = (bundle.path / "manifest.json").read_bytes()
        self.bundle_id = hashlib.sha256(self.manifest_bytes).hexdigest()[:16]
        self.version = int(bundle.manifest.get("version", 1))
        self.dim = int(bundle.item_vectors.shape[1])
        if embedder is not None and embedder.dim != self.dim:
            raise BundleError(f"{bundle.path}: the embedder makes {embedder.dim}-d vectors but the item vectors are "
                              f"{self.dim}-d; rebuild the bundle with its embedder")
        self.model = self.trie = None
        if bundle.has("recommender.safetensors"):
            self.model = load_recommender(bundle, device)
            self.trie = self.model.trie
        has_value = self.model is not None and bundle.has("value.safetensors")
        self.value_head = load_value_head(bundle, device) if has_value else None
        self.ved_config = bundle.preset.ved
        self.max_history = (self.model.cfg if self.model is not None else bundle.preset.recommender).max_history
        self.default_beam_width = bundle.preset.sft.beam_width  # the width the bundle was validated with
        self.index = load_search_index(bundle, device)
        # Indexes written before item ids were mapped inside them return catalog rows; translate those.
        self.row_ids = None if isinstance(self.index, faiss.IndexIDMap) else self.catalog.ids
        if self.index.ntotal != len(self.catalog):
            raise BundleError(f"{bundle.path}: the FAISS index holds {self.index.ntotal} vectors for "
                              f"{len(self.catalog)} items; rebuild the bundle")
        self.titles = [it.title for it in self.catalog.items]
        self.loaded_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    @classmethod
    def load(cls, path: str | Path, previous: "Engine | None" = None, device: str | None = None,
             backend: Backend | None = None, attempts: int = 3) -> "Engine":
        """Load a bundle onto `device` with the embedder `backend` (defaults: `previous`'s, else cpu and torch);
        reuse `previous`'s embedder when the bundle asks for the same one on the same device and backend (an ONNX
        embedder is always reloaded: its file belongs to the bundle).

        Every file is checked against its manifest hash (a tampered or truncated bundle is refused), and the load
        is one consistent version: when a writer publishes a new version meanwhile (the manifest changed between
        the start and the end of the load), it starts again on the new one."""
        path = Path(path)
        for _ in range(attempts):
            before = _manifest_bytes(path)
            try:
                engine = cls._load(path, previous, device, backend)
            except BundleError:
                if _manifest_bytes(path) == before:
                    raise
                continue  # a new version was published mid-load: its files, not a corrupt bundle
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                if _manifest_bytes(path) == before:
                    raise BundleError(f"{path}: cannot load ({type(e).__name__}: {e}); rebuild the bundle") from e
                continue
            if engine.manifest_bytes == before == _manifest_bytes(path):
                return engine
        raise BundleError(f"{path}: a new version was published during each of {attempts} loads; retry once the "
                          "writer is done")

    @classmethod
    def _load(cls, path: Path, previous: "Engine | None", device: str | None, backend: Backend | None) -> "Engine":
        device = device or (previous.device if previous is not None else "cpu")
        before = previous.embedder if previous is not None else None
        backend = backend or (before.backend if before is not None else "torch")
        bundle = Bundle.load(path, verify=True)
        if not bundle.manifest.get("embedder", {}).get("text", True):  # item vectors from behaviour: no embedder
            return cls(bundle, None, device)
        cfg = bundle.preset.embedder
        same = before is not None and backend == "torch" and before.backend == "torch" and before.cfg == cfg and \
            before.device == device
        threads = before.threads if before is not None else compute_threads()
        embedder = before if same else SharedEmbedder(cfg, device, backend, bundle.path / ONNX_FILE, threads)
        return cls(bundle, embedder, device)

    # ---- batched computations (called on batcher worker threads) -------------------------------------------
    @torch.inference_mode()
    def recommend(self, queries: list[RecommendQuery]) -> list[list[Hit]]:
        """One decoder call per distinct (strategy, beam width, budget); k only truncates the sorted results, so
        requests with different k share a call and each gets exactly what it would get alone."""
        assert self.model is not None, "validation must refuse Recommend on a bundle without a recommender"
        out: list[list[Hit]] = [[] for _ in queries]
        for idx in grouped(queries, key=lambda q: (q.strategy, q.beam_width, q.budget)):
            group = [queries[i] for i in idx]
            t = max(len(q.history) for q in group)
            history = torch.full((len(group), t), -1, dtype=torch.long)  # (B, T) left padding
            for r, q in enumerate(group):
                history[r, t - len(q.history):] = torch.as_tensor(q.history)
            # Each request's seen items, held sparsely: O(seen) per request, whatever the catalog's size.
            exclude = (self.trie.exclusion([q.seen if q.exclude_seen else None for q in group])
                       if any(q.exclude_seen for q in group) else None)
            first, k = group[0], max(q.k for q in group)
            if first.strategy == "ved":  # VED's top-k do not depend on k beyond truncation either
                alive = batch_alive()
                try:
                    recs = ved_decode(self.model, self.value_head, self.trie, history.to(self.device), k,
                                      first.beam_width, first.budget, self.ved_config, exclude,
                                      should_stop=None if alive is None else lambda: not alive())
                except SearchStopped as e:
                    raise Abandoned(f"every caller of this VED batch left ({e})") from None
            else:
                recs = beam_search(self.model, self.trie, history.to(self.device), first.beam_width, k, exclude)
            for r, (i, q) in enumerate(zip(idx, group)):
                out[i] = self._hits(recs.items[r, : q.k].tolist(), recs.scores[r, : q.k].tolist())
        return out

    def embed(self, queries: list[EmbedQuery]) -> list[np.ndarray]:
        """One encoder call per role over the inputs of every request in the batch."""
        out: list[np.ndarray] = [np.empty((0, self.dim), np.float32)] * len(queries)
        for idx in grouped(queries, key=lambda q: q.role):
            inputs = [x for i in idx for x in queries[i].inputs]
            vecs = self.embedder.encode(inputs, queries[idx[0]].role)  # (sum of inputs, D)
            start = 0
            for i in idx:
                n = len(queries[i].inputs)
                out[i], start = vecs[start: start + n], start + n
        return out

    def search(self, queries: list[SearchQuery]) -> list[list[Hit]]:
        """Texts and images are embedded together as queries, then one FAISS search at the largest k serves the
        batch."""
        vectors = np.zeros((len(queries), self.dim), dtype=np.float32)  # (B, D)
        rows = [i for i, q in enumerate(queries) if q.vector is None]
        if rows:
            inputs = [EmbedInput(queries[i].text or "", queries[i].image) for i in rows]
            vectors[rows] = self.embedder.encode(inputs, "query")
        for i, q in enumerate(queries):
            if q.vector is not None:
                vectors[i] = q.vector
        scores, found = self.index.search(vectors, max(q.k for q in queries))  # (B, k) item ids, -1 = none
        if self.row_ids is not None:
            found = np.where(found >= 0, self.row_ids[found.clip(0)], -1)
        rows = [self.catalog.rows(f[f >= 0]) for f in found]
        return [self._hits(r[: q.k].tolist(), scores[i, : len(r)][: q.k].tolist()) for i, (q, r) in
                enumerate(zip(queries, rows))]

    def beam_budget(self, beam_width: int) -> int:
        return beam_budget(self.trie.depth, beam_width)

    def _hits(self, rows: list[int], scores: list[float]) -> list[Hit]:
        return [Hit(int(self.catalog.items[r].item_id), float(s), self.titles[r]) for r, s in zip(rows, scores)
                if r >= 0]

    def warm_up(self) -> None:
        """Run every path once (allocations, lazy inits, first-call overheads, kernel compilations) before taking
        traffic."""
        if self.model is not None:
            self.trie.warm_up_kernels()
            first = np.zeros(1, dtype=np.int64)
            k = max(1, min(10, len(self.catalog) - 1))
            self.recommend([RecommendQuery(first, first, k, max(k, self.default_beam_width), True)])
        if self.embedder is not None:
            self.embed([EmbedQuery((EmbedInput("warm up"),), "query")])
            self.search([SearchQuery(k=1, text="warm up")])
        else:
            self.search([SearchQuery(k=1, vector=np.asarray(self.bundle.item_vectors[0], dtype=np.float32))])
