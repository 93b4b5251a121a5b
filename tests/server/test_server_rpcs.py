"""Every RPC through a real channel, checked against the bundle computed directly (the slow, obviously right way)."""

from __future__ import annotations

import json
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genrec.core.bundle import Bundle
from genrec.models.decoding import beam_search
from genrec.models.loading import load_recommender, load_value_head
from genrec.models.ved import ved_decode
from genrec.server.app import SERVICE_NAMES
from genrec.v1 import embed_pb2, info_pb2, recommend_pb2, search_pb2

from serverfixtures import LIMITS

pytest_plugins = ["serverfixtures"]


@pytest.fixture(scope="module")
def bundle(served_bundle):
    return Bundle.load(served_bundle)


def direct_beam(bundle, history_ids, k, beam_width, exclude_seen=False):
    """The reference: beam search on the bundle's model, one request alone."""
    model = load_recommender(bundle)
    rows = torch.as_tensor(bundle.catalog.rows(history_ids))
    hist = rows[-model.cfg.max_history:][None]
    exclude = model.trie.exclusion(rows[None]) if exclude_seen else None
    recs = beam_search(model, model.trie, hist, beam_width, k, exclude)
    keep = recs.items[0] >= 0
    return bundle.catalog.ids[recs.items[0][keep].numpy()].tolist(), recs.scores[0][keep].tolist()


def test_recommend_matches_direct_beam_search(shared_server, bundle):
    ids = bundle.catalog.ids[[3, 17, 42, 5]].tolist()
    resp = shared_server.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids, k=7), timeout=30)
    want_ids, want_scores = direct_beam(bundle, ids, 7, max(7, bundle.preset.sft.beam_width))
    assert [it.item_id for it in resp.items] == want_ids
    np.testing.assert_allclose([it.score for it in resp.items], want_scores, rtol=1e-5, atol=1e-5)
    assert len(set(want_ids)) == 7 and set(want_ids) <= set(bundle.catalog.index)
    assert [it.title for it in resp.items] == [bundle.catalog.items[bundle.catalog.index[i]].title for i in want_ids]
    t = resp.metadata.timings
    assert resp.metadata.batch_size >= 1 and t.total_ms >= t.compute_ms > 0 and t.queue_ms >= 0


def test_recommend_with_ved_matches_direct_ved(shared_server, bundle):
    ids = bundle.catalog.ids[[3, 17, 42, 5]].tolist()
    req = recommend_pb2.RecommendRequest(history=ids, k=6, decoding=recommend_pb2.Decoding(
        strategy=recommend_pb2.DECODING_STRATEGY_VED, beam_width=4, budget=17))
    resp = shared_server.stubs.recommend.Recommend(req, timeout=30)
    model = load_recommender(bundle)
    trie = model.trie
    hist = torch.as_tensor(bundle.catalog.rows(ids))[-model.cfg.max_history:][None]
    want = ved_decode(model, load_value_head(bundle), trie, hist, 6, 4, 17, bundle.preset.ved)
    assert want.forwards.item() <= 17
    keep = want.items[0] >= 0
    assert [it.item_id for it in resp.items] == bundle.catalog.ids[want.items[0][keep].numpy()].tolist()
    np.testing.assert_allclose([it.score for it in resp.items], want.scores[0][keep].tolist(), rtol=1e-5, atol=1e-5)
    assert len({it.item_id for it in resp.items}) == len(resp.items) > 0


def test_recommend_beam_width_and_exclude_seen(shared_server, bundle):
    ids = bundle.catalog.ids[[1, 2, 3]].tolist()
    # Make the history the model's own favourites, so exclusion has something to remove.
    top, _ = direct_beam(bundle, ids, 5, 16)
    history = ids + top[:3]
    req = recommend_pb2.RecommendRequest(history=history, k=5, exclude_seen=True,
                                         decoding=recommend_pb2.Decoding(
                                             strategy=recommend_pb2.DECODING_STRATEGY_BEAM, beam_width=16))
    resp = shared_server.stubs.recommend.Recommend(req, timeout=30)
    got = [it.item_id for it in resp.items]
    assert not set(got) & set(history)
    assert got == direct_beam(bundle, history, 5, 16, exclude_seen=True)[0]


def test_long_history_is_cut_to_the_most_recent(shared_server, bundle):
    ids = bundle.catalog.ids[np.arange(60) % len(bundle.catalog)].tolist()  # longer than max_history (20)
    resp = shared_server.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids, k=5), timeout=30)
    recent = shared_server.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids[-20:], k=5),
                                                     timeout=30)
    assert [it.item_id for it in resp.items] == [it.item_id for it in recent.items]


def test_embed_matches_the_item_vectors(shared_server, bundle):
    rows = [0, 7, 100]
    texts = [bundle.catalog.items[r].text for r in rows]
    for role in (embed_pb2.ROLE_QUERY, embed_pb2.ROLE_DOCUMENT):
        resp = shared_server.stubs.embed.Embed(
            embed_pb2.EmbedRequest(inputs=[embed_pb2.EmbedInput(text=t) for t in texts], role=role), timeout=30)
        got = np.array([e.values for e in resp.embeddings], dtype=np.float32)
        assert resp.dimension == got.shape[1] == bundle.item_vectors.shape[1]
        np.testing.assert_allclose(got, bundle.item_vectors[rows], atol=1e-4)  # same embedder built the bundle
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_search_by_text_and_vector_finds_the_item(shared_server, bundle):
    item = bundle.catalog.items[42]
    by_text = shared_server.stubs.search.Search(search_pb2.SearchRequest(text=item.text, k=3), timeout=30)
    assert by_text.items[0].item_id == item.item_id and by_text.items[0].score == pytest.approx(1.0, abs=1e-3)
    assert len(by_text.items) == 3 and by_text.items[0].score >= by_text.items[1].score >= by_text.items[2].score
    vec = bundle.item_vectors[42].tolist()
    by_vec = shared_server.stubs.search.Search(
        search_pb2.SearchRequest(vector=search_pb2.Vector(values=vec), k=5), timeout=30)
    exact = np.argsort(-(bundle.item_vectors @ bundle.item_vectors[42]), kind="stable")[:5]  # brute force
    assert [it.item_id for it in by_vec.items] == bundle.catalog.ids[exact].tolist()


def test_info_describes_the_bundle(shared_server, bundle, served_bundle):
    info = shared_server.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10)
    assert json.loads(info.manifest_json) == json.loads((served_bundle / "manifest.json").read_text())
    assert info.bundle_version == bundle.manifest["version"] and info.bundle_path == str(served_bundle)
    assert info.catalog_size == len(bundle.catalog) and info.embedding_dim == bundle.item_vectors.shape[1]
    assert info.max_history == 20 and info.max_k == 50 and info.has_recommender and not info.accepts_images
    assert (info.max_beam_width, info.max_ved_budget, info.max_history_items, info.cheap_beam_width) == (
        LIMITS.max_beam_width, LIMITS.max_ved_budget, LIMITS.max_history_items, 32)
    assert bundle.has("value.safetensors")  # VED is served with the bundle's value head
    assert list(info.decoding_strategies) == [recommend_pb2.DECODING_STRATEGY_BEAM, recommend_pb2.DECODING_STRATEGY_VED]
    assert {"grpcio", "torch", "genrec", "protobuf"} <= set(info.server_versions)
    resp = shared_server.stubs.search.Search(search_pb2.SearchRequest(text="soap", k=1), timeout=30)
    assert resp.metadata.bundle_id == info.bundle_id and resp.metadata.bundle_version == info.bundle_version


def test_health_serving_and_reflection_lists_the_services(shared_server):
    health = health_pb2_grpc.HealthStub(shared_server.channel)
    for name in ("", *SERVICE_NAMES):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="genrec.v1.Nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    stub = reflection_pb2_grpc.ServerReflectionStub(shared_server.channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=5))
    listed = {s.name for s in replies[0].list_services_response.service}
    assert set(SERVICE_NAMES) <= listed and "grpc.health.v1.Health" in listed
    assert {"genrec.v1.RecommendService", "genrec.v1.EmbedService", "genrec.v1.SearchService",
            "genrec.v1.InfoService", "genrec.v1.AdminService"} <= listed
    # The descriptors are served too, so grpcurl-style tools can build requests.
    files = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="genrec.v1.RecommendService")]), timeout=5))
    assert files[0].file_descriptor_response.file_descriptor_proto


def test_metrics_endpoint_counts_requests_by_method_and_status(shared_server, bundle):
    stubs = shared_server.stubs
    ok_before = shared_server.metric("genrec_requests_total", method="SearchService/Search", code="OK")
    bad_before = shared_server.metric("genrec_requests_total", method="SearchService/Search",
                                      code="INVALID_ARGUMENT")
    stubs.search.Search(search_pb2.SearchRequest(text="candle", k=2), timeout=30)
    with pytest.raises(grpc.RpcError):
        stubs.search.Search(search_pb2.SearchRequest(text="candle", k=0), timeout=30)
    port = shared_server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    ok = f'genrec_requests_total{{code="OK",method="SearchService/Search"}} {ok_before + 1}'
    bad = f'genrec_requests_total{{code="INVALID_ARGUMENT",method="SearchService/Search"}} {bad_before + 1}'
    assert ok in text and bad in text
    for family in ("genrec_request_latency_seconds_bucket", "genrec_batch_size_bucket", "genrec_queue_depth",
                   "genrec_queue_wait_seconds", "genrec_batch_compute_seconds", "genrec_bundle_info"):
        assert family in text, family
