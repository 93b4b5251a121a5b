"""`serve --backend onnx`: the bundle's embedder exported to ONNX answers Embed and Search like the torch backend."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from genrec.v1 import embed_pb2, search_pb2

from conftest import run_cli
from serverutil import running

pytest_plugins = ["serverfixtures"]

TEXTS = ["red lipstick", "a moisturiser for dry skin with shea butter", "nail polish remover"]


def embed(r, texts):
    resp = r.stubs.embed.Embed(embed_pb2.EmbedRequest(inputs=[embed_pb2.EmbedInput(text=t) for t in texts]),
                               timeout=30)
    return np.array([e.values for e in resp.embeddings])


def test_onnx_backend_serves_what_torch_serves(tmp_path, served_bundle):
    bundle = tmp_path / "tiny"
    shutil.copytree(served_bundle, bundle)
    with running(bundle) as r:
        want = embed(r, TEXTS)
        hits = r.stubs.search.Search(search_pb2.SearchRequest(text="lipstick", k=5), timeout=30).items
    from genrec.core.bundle import BundleError

    with pytest.raises(BundleError, match="embedder export-onnx"):
        with running(bundle, backend="onnx"):
            pass
    run_cli("embedder", "export-onnx", "--bundle", bundle)
    with running(bundle, backend="onnx") as r:
        got = embed(r, TEXTS)
        onnx_hits = r.stubs.search.Search(search_pb2.SearchRequest(text="lipstick", k=5), timeout=30).items
    assert (got * want).sum(1).min() >= 0.9999
    assert [h.item_id for h in onnx_hits] == [h.item_id for h in hits]
