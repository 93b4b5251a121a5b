"""The FAISS index: approximate structures against exact search, item-id mapping, search knobs, save and load."""

import faiss
import numpy as np
import pytest

from genrec.core.config import IndexConfig
from genrec.models.index import build_index, load_index, recall_against_exact, resolve_factory


def clustered(n=4000, d=32, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("factory, floor", [("HNSW32", 0.97), ("IVF64,Flat", 0.97), ("IVF64,PQ16x4,RFlat", 0.9)])
def test_approximate_recall_against_exact(factory, floor):
    x = clustered()
    ids = np.arange(len(x)) * 7 + 1000  # item ids are not rows
    index = build_index(x, ids, IndexConfig(factory=factory, ef_search=512, nprobe=16))
    report = recall_against_exact(index, x, ids, clustered(300, seed=1))
    assert report["recall@10"] >= floor, report
    _, found = index.search(x[:5], 1)
    assert found[:, 0].tolist() == ids[:5].tolist()  # each item finds itself, by id


def test_search_knobs_change_recall_and_survive_save_and_load(tmp_path):
    x, q = clustered(), clustered(300, seed=1)
    ids = np.arange(len(x))
    low = build_index(x, ids, IndexConfig(factory="IVF64,Flat", nprobe=1))
    high = build_index(x, ids, IndexConfig(factory="IVF64,Flat", nprobe=32))
    r_low, r_high = (recall_against_exact(i, x, ids, q)["recall@10"] for i in (low, high))
    assert r_low < r_high
    faiss.write_index(high, str(tmp_path / "index.faiss"))
    again = load_index(tmp_path / "index.faiss", IndexConfig(factory="IVF64,Flat", nprobe=32))
    assert recall_against_exact(again, x, ids, q)["recall@10"] == r_high
    lowered = load_index(tmp_path / "index.faiss", IndexConfig(factory="IVF64,Flat", nprobe=1))  # the config wins
    assert faiss.extract_index_ivf(lowered.index).nprobe == 1
    assert recall_against_exact(lowered, x, ids, q)["recall@10"] == r_low


def test_exact_index_is_exact_and_auto_picks_by_size():
    x = clustered(500)
    index = build_index(x, np.arange(500) + 1, IndexConfig(factory="auto"))
    scores, found = index.search(x[:3], 3)
    brute = np.argsort(-(x[:3] @ x.T), 1)[:, :3] + 1
    assert (found == brute).all() and np.allclose(scores[:, 0], 1, atol=1e-5)
    assert resolve_factory("auto", 100_000) == "Flat" and resolve_factory("auto", 100_001) == "HNSW32"


def test_bad_factories_say_what_to_do():
    x = clustered(100)
    with pytest.raises(ValueError, match="not a FAISS factory string"):
        build_index(x, np.arange(100), IndexConfig(factory="Nonsense12"))
    with pytest.raises(ValueError, match="1024 inverted lists but only 100 items.*fewer lists"):
        build_index(x, np.arange(100), IndexConfig(factory="IVF1024,Flat"))
