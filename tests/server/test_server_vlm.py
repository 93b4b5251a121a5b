"""A bundle embedded with a (tiny, random) Qwen2-VL backbone: Embed and Search take images over gRPC."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest

from genrec.core.config import load_preset
from genrec.training.build import build_bundle
from genrec.v1 import embed_pb2, info_pb2, search_pb2
from tests.tiny_backbones import save_tiny_qwen2_vl

from serverutil import running

pytest_plugins = ["serverfixtures"]


def image(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm_bundle(tmp_path_factory, tiny_data):
    path = save_tiny_qwen2_vl(tmp_path_factory.mktemp("vl") / "model")
    preset = load_preset("tiny")
    preset = preset.model_copy(update={"embedder": preset.embedder.model_copy(
        update={"backbone": str(path), "max_length": 256})})
    out = tmp_path_factory.mktemp("bundles") / "vl"
    build_bundle(tiny_data, out, preset, "tiny", log=lambda *a: None)
    return out


def test_images_over_grpc(vlm_bundle):
    with running(vlm_bundle) as r:
        assert r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=30).accepts_images
        resp = r.stubs.embed.Embed(embed_pb2.EmbedRequest(inputs=[
            embed_pb2.EmbedInput(image=image((200, 0, 0))), embed_pb2.EmbedInput(text="red", image=image((200, 0, 0))),
            embed_pb2.EmbedInput(text="red")]), timeout=30)
        v = np.array([e.values for e in resp.embeddings])
        assert v.shape == (3, 32) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
        assert len({tuple(np.round(x, 5)) for x in v}) == 3  # image, image + text and text differ
        hits = r.stubs.search.Search(search_pb2.SearchRequest(image=image((0, 0, 200)), k=5), timeout=30).items
        assert len(hits) == 5 and len({h.item_id for h in hits}) == 5
        with pytest.raises(grpc.RpcError) as e:
            r.stubs.embed.Embed(embed_pb2.EmbedRequest(inputs=[
                embed_pb2.EmbedInput(text="ok"), embed_pb2.EmbedInput(image=b"\x89PNG garbage")]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs[1]: the image could not be decoded" in e.value.details()
