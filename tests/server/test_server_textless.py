"""A catalog of ids and interactions only: built from behaviour, trained, evaluated and served like any other."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest

from genrec.core.bundle import Bundle
from genrec.core.config import load_preset
from genrec.core.data import DatasetError, load_dataset
from genrec.training.build import build_bundle
from genrec.v1 import embed_pb2, info_pb2, recommend_pb2, search_pb2

from serverutil import running


@pytest.fixture(scope="module")
def textless_data(tmp_path_factory, tiny_data):
    """The tiny dataset without items.jsonl."""
    out = tmp_path_factory.mktemp("textless") / "data"
    out.mkdir()
    shutil.copy(tiny_data / "sequential_data.txt", out)
    return out


def test_without_items_the_catalog_is_the_interacted_ids(textless_data, tiny_data, tmp_path):
    ds, full = load_dataset(textless_data), load_dataset(tiny_data)
    assert not ds.catalog.has_text and full.catalog.has_text
    used = sorted({int(full.catalog.ids[r]) for s in full.sequences for r in s})
    assert ds.catalog.ids.tolist() == used
    assert [ds.catalog.ids[s].tolist() for s in ds.sequences] == [full.catalog.ids[s].tolist() for s in full.sequences]
    # Items whose records carry neither a title nor a text: no text either (categories alone do not count).
    blank = tmp_path / "blank"
    blank.mkdir()
    shutil.copy(tiny_data / "sequential_data.txt", blank)
    with open(tiny_data / "items.jsonl") as f, open(blank / "items.jsonl", "w") as g:
        for line in f:
            rec = json.loads(line)
            g.write(json.dumps({"item_id": rec["item_id"], "title": "", "categories": rec.get("categories")}) + "\n")
    assert not load_dataset(blank).catalog.has_text
    (blank / "items.jsonl").unlink()
    (blank / "sequential_data.txt").write_text("1 5 -3 7\n")
    with pytest.raises(DatasetError, match="unknown item id -3 .item ids are non-negative integers"):
        load_dataset(blank)


@pytest.fixture(scope="module")
def textless_bundle(tmp_path_factory, textless_data):
    from genrec.training.sft import train_sft

    out = tmp_path_factory.mktemp("textless-bundle") / "b"
    build_bundle(textless_data, out, load_preset("tiny"), "tiny", log=lambda *a: None)
    train_sft(out, textless_data, run_dir=tmp_path_factory.mktemp("runs") / "sft", log=lambda *a: None,
              overrides={"max_epochs": 2, "eval_every": 2})
    return out


def test_a_textless_bundle_is_tokenized_from_behaviour_and_served(textless_bundle, textless_data):
    bundle = Bundle.load(textless_bundle)
    assert bundle.manifest["embedder"]["text"] is False
    vectors = bundle.item_vectors
    assert vectors.shape[1] == load_preset("tiny").semantic_ids.collaborative_dim
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5) and (norms > 0).mean() > 0.9
    ds = load_dataset(textless_data)
    with running(textless_bundle) as r:
        info = r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=30)
        assert info.has_recommender and not info.accepts_images and info.embedding_dim == vectors.shape[1]
        history = ds.catalog.ids[ds.sequences[0][:3]].tolist()
        rec = r.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=history, k=5), timeout=30)
        assert len({i.item_id for i in rec.items}) == 5 and all(i.item_id in ds.catalog.index for i in rec.items)
        row = int(np.flatnonzero(norms > 0)[0])
        found = r.stubs.search.Search(search_pb2.SearchRequest(
            vector=search_pb2.Vector(values=vectors[row].tolist()), k=3), timeout=30)
        assert found.items[0].item_id == int(ds.catalog.ids[row])  # an item is its own nearest neighbour
        for call in (lambda: r.stubs.embed.Embed(embed_pb2.EmbedRequest(inputs=[embed_pb2.EmbedInput(text="soap")]),
                                                 timeout=30),
                     lambda: r.stubs.search.Search(search_pb2.SearchRequest(text="soap", k=3), timeout=30)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "without titles or texts" in e.value.details() and "by vector" in e.value.details()
