"""`genrec build`: dataset -> item vectors -> FAISS index -> semantic IDs -> a new bundle."""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

from genrec.core.bundle import write_bundle, write_catalog
from genrec.core.config import Preset
from genrec.core.device import resolve_device
from genrec.core.data import load_dataset, read_item_vectors, train_sequences
from genrec.models.collaborative import cooccurrence_vectors, join_vectors
from genrec.models.embedder import Embedder
from genrec.models.index import build_index, resolve_factory
from genrec.models.semantic_ids import PrefixTrie, build_semantic_ids


def _save_npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, **arrays)


def build_bundle(data: str | Path, out: str | Path, preset: Preset, preset_name: str, log=print,
                 vectors_file: str | Path | None = None, device: str = "auto") -> dict:
    """vectors_file: precomputed item vectors (see genrec.core.data.read_item_vectors) instead of embedding the
    catalog's text. They come from a model the server does not have, so such a bundle, like one without text, serves
    Search by vector but not Embed or text Search."""
    t0 = time.time()
    ds = load_dataset(data)
    log(f"dataset {ds.name}: {len(ds.catalog)} items, {len(ds.users)} users, {ds.n_interactions} interactions")
    precomputed = read_item_vectors(vectors_file, ds.catalog) if vectors_file is not None else None
    sid_cfg = preset.semantic_ids
    needs_behaviour = sid_cfg.collaborative > 0 or (precomputed is None and not ds.catalog.has_text)
    if needs_behaviour:
        # The training part only: the validation and test items of every user stay unseen by the tokenizer.
        collaborative = cooccurrence_vectors(train_sequences(ds, "valid"), len(ds.catalog), sid_cfg.collaborative_dim,
                                             sid_cfg.collaborative_window, sid_cfg.seed)
        log(f"collaborative vectors: {int((np.abs(collaborative).sum(1) > 0).sum())} of {len(ds.catalog)} items "
            f"co-occur in training")
    if precomputed is not None:
        vectors = precomputed
        log(f"precomputed item vectors from {vectors_file}: {vectors.shape[1]} dims")
        sid_vectors = join_vectors(vectors, collaborative, sid_cfg.collaborative) if needs_behaviour else vectors
    elif ds.catalog.has_text:
        # Catalog texts are documents; an over-long one is truncated, not refused.
        embedder = Embedder(preset.embedder, str(resolve_device(device)))
        vectors = embedder.encode([it.text for it in ds.catalog.items], "document", truncate=True, progress=True)
        log(f"embedded {len(vectors)} items -> {vectors.shape[1]} dims in {time.time() - t0:.1f}s")
        sid_vectors = join_vectors(vectors, collaborative, sid_cfg.collaborative) if needs_behaviour else vectors
    else:  # ids and interactions only: behaviour is all there is, for the semantic IDs and for Search alike
        log("the catalog has no titles or texts: semantic IDs and the search index come from the collaborative "
            "vectors alone (Embed and text or image Search are not served from this bundle)")
        vectors = sid_vectors = collaborative
    sids = build_semantic_ids(sid_vectors, sid_cfg)
    PrefixTrie(sids.codes, sids.vocab_sizes)  # raises if the map is not a bijection
    stats = sids.stats()
    util = ", ".join(f"L{i + 1} {u:.1%}" for i, u in enumerate(stats["utilisation"]))
    log(f"semantic IDs: utilisation {util}; collision rate {stats['collision_rate']:.2%} "
        f"(largest group {stats['largest_collision_group']}); vocab sizes {list(sids.vocab_sizes)}")
    index = build_index(vectors, ds.catalog.ids, preset.index)
    log(f"FAISS index {resolve_factory(preset.index.factory, len(vectors))} over {index.ntotal} items")
    manifest = {
        "name": Path(out).name, "version": 1, "preset_name": preset_name, "preset": preset.model_dump(),
        "dataset": {"name": ds.name, "path": str(Path(data).resolve()), "items": len(ds.catalog),
                    "users": len(ds.users), "interactions": ds.n_interactions},
        "embedder": {"dim": int(vectors.shape[1]), "text": ds.catalog.has_text and precomputed is None,
                     **({"vectors": str(Path(vectors_file).resolve())} if precomputed is not None else {}),
                     **preset.embedder.model_dump()},
        "semantic_ids": {**stats, "vocab_sizes": list(sids.vocab_sizes)},
    }
    writers = {
        "catalog.jsonl": lambda p: write_catalog(p, ds.catalog),
        "item_vectors.npy": lambda p: np.save(p, vectors),
        "index.faiss": lambda p: faiss.write_index(index, str(p)),
        "semantic_ids.npz": lambda p: _save_npz(p, codes=sids.codes, codebooks=sids.codebooks,
                                                vocab_sizes=np.array(sids.vocab_sizes)),
    }
    manifest = write_bundle(out, manifest, writers)
    log(f"bundle written to {out} in {time.time() - t0:.1f}s")
    return manifest
