"""Deadlines, overload, health transitions, graceful shutdown, and hot swap under load, through real servers.

The 'held' batching (batches of 4, a 10 s wait, 3 places in the queue) keeps requests queued for as long as a test
needs them there, so outcomes depend on state that the tests wait for, never on how fast this machine is.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrec.core.bundle import Bundle
from genrec.server.config import BatchingConfig, LimitsConfig
from genrec.v1 import embed_pb2, info_pb2, recommend_pb2, search_pb2

from serverutil import running, wait_for

pytest_plugins = ["serverfixtures"]

HELD = BatchingConfig(max_batch_size=4, max_wait_ms=10_000, max_queue=3)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def ids(served_bundle):
    return Bundle.load(served_bundle).catalog.ids.tolist()


@pytest.fixture(scope="module")
def held(served_bundle):
    with running(served_bundle, batching=HELD) as r:
        yield r


def _depth(r, queue="recommend"):
    return r.metric("genrec_queue_depth", queue=queue)


def test_a_request_whose_deadline_passes_while_queued_is_dropped(held, ids):
    computed = held.metric("genrec_batch_size_count", queue="recommend")
    with pytest.raises(grpc.RpcError) as e:
        held.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids[:3], k=5), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: held.metric("genrec_dropped_total", queue="recommend", reason="deadline") == 1,
             what="the server to drop the expired request")
    assert _depth(held) == 0  # it holds no place in the queue
    assert held.metric("genrec_batch_size_count", queue="recommend") == computed  # and was never computed


def test_overload_is_refused_with_resource_exhausted(held, ids):
    queued = [held.stubs.recommend.Recommend.future(recommend_pb2.RecommendRequest(history=ids[:2], k=3),
                                                    timeout=60) for _ in range(3)]
    wait_for(lambda: _depth(held) == 3, what="a full queue")
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as e:
            held.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids[:2], k=3), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "recommend queue is full (3 requests waiting)" in e.value.details()
        assert "retry with backoff" in e.value.details()
    assert held.metric("genrec_requests_total", method="RecommendService/Recommend", code="RESOURCE_EXHAUSTED") == 2
    # Clients that give up free their places at once (grpc tells the server; the queue forgets them).
    for f in queued:
        f.cancel()
    wait_for(lambda: _depth(held) == 0, what="cancelled requests to leave the queue")
    assert held.metric("genrec_dropped_total", queue="recommend", reason="cancelled") == 3


def test_health_transitions_and_graceful_shutdown(served_bundle, shared_server, ids):
    requests = [recommend_pb2.RecommendRequest(history=ids[:4], k=5),
                recommend_pb2.RecommendRequest(history=ids[10:12], k=3, exclude_seen=True),
                recommend_pb2.RecommendRequest(history=ids[20:30], k=8, decoding=recommend_pb2.Decoding(
                    strategy=recommend_pb2.DECODING_STRATEGY_BEAM, beam_width=12))]
    alone = [shared_server.stubs.recommend.Recommend(r, timeout=30) for r in requests]  # one at a time

    with running(served_bundle, warm=False, batching=HELD) as r:
        health = health_pb2_grpc.HealthStub(r.channel)
        check = lambda name="": health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status  # noqa
        assert check() == NOT_SERVING and check("genrec.v1.RecommendService") == NOT_SERVING
        r.server.warm_up()
        assert check() == SERVING and check("genrec.v1.SearchService") == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="genrec.v1.RecommendService"), timeout=60)
        assert next(watch).status == SERVING

        in_flight = [r.stubs.recommend.Recommend.future(req, timeout=60) for req in requests]
        wait_for(lambda: _depth(r) == 3, what="three queued requests")
        t0 = time.monotonic()
        stopper = threading.Thread(target=r.server.stop, kwargs={"grace": 30})
        stopper.start()
        assert next(watch).status == NOT_SERVING  # load balancers stop sending before the port closes
        watch.cancel()  # an open Watch stream is itself in flight and would hold shutdown for the whole grace
        stopper.join(60)
        assert not stopper.is_alive() and time.monotonic() - t0 < 30  # drained, not cut off at the grace limit
        # Every in-flight request finished on the server; the client may see the last bytes a moment after stop returns.
        responses = [f.result(timeout=10) for f in in_flight]
        with pytest.raises(grpc.RpcError) as e:  # and the port is closed now
            r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    # The drain ran the three as one batch, and batching changed no answer.
    assert [resp.metadata.batch_size for resp in responses] == [3, 3, 3]
    for got, want in zip(responses, alone):
        assert [it.item_id for it in got.items] == [it.item_id for it in want.items]
        assert [it.score for it in got.items] == pytest.approx([it.score for it in want.items], abs=1e-5)


def test_hot_swap_under_load_fails_no_request(served_bundle, second_bundle, tiny_bundle, ids):
    root = Path(os.path.commonpath([served_bundle, second_bundle, tiny_bundle]))
    with running(served_bundle, allow_unauthenticated_reload=True, reload_root=root) as r:
        first = r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10).bundle_id
        stop, lock = threading.Event(), threading.Lock()
        seen, errors, calls = [], [], [0]

        def client(worker: int):
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if (worker + i) % 3 == 0:
                        resp = r.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(
                            history=ids[i % 50: i % 50 + 5], k=5), timeout=60)
                    elif (worker + i) % 3 == 1:
                        resp = r.stubs.search.Search(search_pb2.SearchRequest(text=f"soap {i}", k=5), timeout=60)
                    else:
                        resp = r.stubs.embed.Embed(embed_pb2.EmbedRequest(
                            inputs=[embed_pb2.EmbedInput(text=f"candle {i}")]), timeout=60)
                    with lock:
                        seen.append(resp.metadata.bundle_id)
                        calls[0] += 1
                except grpc.RpcError as e:
                    with lock:
                        errors.append(f"{e.code().name}: {e.details()}")

        workers = [threading.Thread(target=client, args=(w,)) for w in range(6)]
        for w in workers:
            w.start()
        try:
            swapped_to = []
            for target in (second_bundle, served_bundle, second_bundle):
                n = calls[0]
                wait_for(lambda: calls[0] >= n + 15, timeout=120, what="traffic before the swap")
                info = r.stubs.admin.Reload(info_pb2.ReloadRequest(bundle_path=str(target)), timeout=120)
                assert info.bundle_path == str(target)
                swapped_to.append(info.bundle_id)
            n = calls[0]
            wait_for(lambda: calls[0] >= n + 15, timeout=120, what="traffic after the last swap")
        finally:
            stop.set()
            for w in workers:
                w.join(60)

        assert errors == []
        second = swapped_to[0]
        assert second != first and swapped_to == [second, first, second]
        assert {first, second} == set(seen)
        # A request that arrives after Reload returned is answered by the new bundle.
        resp = r.stubs.search.Search(search_pb2.SearchRequest(text="soap", k=1), timeout=30)
        assert resp.metadata.bundle_id == second
        assert r.metric("genrec_reloads_total", result="ok") == 3

        # A bundle that cannot load leaves the current one serving.
        with pytest.raises(grpc.RpcError) as e:
            r.stubs.admin.Reload(info_pb2.ReloadRequest(bundle_path=str(served_bundle / "nope")), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not a bundle" in e.value.details()
        assert r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10).bundle_id == second
        assert r.metric("genrec_reloads_total", result="failed") == 1

        # A bundle without a recommender still serves Search and says why Recommend cannot be answered.
        info = r.stubs.admin.Reload(info_pb2.ReloadRequest(bundle_path=str(tiny_bundle)), timeout=120)
        assert not info.has_recommender and list(info.decoding_strategies) == []
        with pytest.raises(grpc.RpcError) as e:
            r.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids[:3], k=5), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "genrec train sft" in e.value.details()
        assert len(r.stubs.search.Search(search_pb2.SearchRequest(text="soap", k=3), timeout=30).items) == 3


def test_health_is_never_refused_by_the_concurrency_limit(served_bundle, ids):
    """Four calls held in a batch fill a limit of 4: a fifth genrec.v1 call is refused, and counted; health
    checks still answer (before, gRPC's own limit counted them too and refused them with RESOURCE_EXHAUSTED)."""
    batching = BatchingConfig(max_batch_size=8, max_wait_ms=10_000, max_queue=100)
    with running(served_bundle, batching=batching, max_concurrent_rpcs=4) as r:
        held = [r.stubs.recommend.Recommend.future(recommend_pb2.RecommendRequest(history=ids[:3], k=3),
                                                   timeout=60) for _ in range(4)]
        wait_for(lambda: _depth(r) == 4, what="four held calls")
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 concurrent calls" in e.value.details()
        health = health_pb2_grpc.HealthStub(r.channel)
        statuses = [health.Check(health_pb2.HealthCheckRequest(), timeout=10).status for _ in range(20)]
        assert statuses == [SERVING] * 20
        assert r.metric("genrec_requests_total", method="InfoService/GetInfo", code="RESOURCE_EXHAUSTED") == 3
        r.server.batchers["recommend"].flush()  # release the held batch: all four answered
        assert [len(f.result(timeout=60).items) for f in held] == [3] * 4
        assert r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10).catalog_size > 0  # admitted again


def test_expensive_calls_do_not_hold_cheap_ones(served_bundle, ids):
    """VED calls at a large budget wait in their own queue: beam calls sent while they compute are answered
    before they are (on one shared queue they waited behind the VED batch)."""
    with running(served_bundle, limits=LimitsConfig(max_ved_budget=4096)) as r:  # calls of seconds, on purpose
        ved = recommend_pb2.Decoding(strategy=recommend_pb2.DECODING_STRATEGY_VED, beam_width=32, budget=4096)
        heavy = [r.stubs.recommend.Recommend.future(recommend_pb2.RecommendRequest(
            history=ids[i:i + 5], k=10, decoding=ved), timeout=300) for i in range(8)]
        wait_for(lambda: r.metric("genrec_queue_depth", queue="recommend-heavy") <= 4, what="a heavy batch to start")
        t0 = time.monotonic()
        cheap = [r.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids[i:i + 3], k=5), timeout=60)
                 for i in range(5)]
        cheap_s = time.monotonic() - t0
        assert not all(f.done() for f in heavy), "the cheap calls were answered only after every heavy one"
        assert all(len(c.items) == 5 and c.metadata.batch_size == 1 for c in cheap)
        assert [len(f.result(timeout=300).items) for f in heavy] == [10] * 8
        assert r.metric("genrec_batch_size_count", queue="recommend-heavy") >= 2  # batches of at most 4
        assert cheap_s < time.monotonic() - t0


def test_a_ved_batch_stops_once_its_callers_left(served_bundle, ids):
    """A VED call whose deadline passes mid-search stops between rounds: the server spends a fraction of the full
    search on it (before, it ran to the end for nobody)."""
    ved = recommend_pb2.Decoding(strategy=recommend_pb2.DECODING_STRATEGY_VED, beam_width=32, budget=4096)
    request = recommend_pb2.RecommendRequest(history=ids[:5], k=10, decoding=ved)
    with running(served_bundle, limits=LimitsConfig(max_ved_budget=4096)) as r:  # a search of seconds
        # Search takes what is queued (a search costs less than any wait); Recommend waits to fill its batches.
        assert r.server.batchers["search"].cfg.max_wait_ms == 0 < r.server.batchers["recommend"].cfg.max_wait_ms
        compute = lambda: r.metric("genrec_batch_compute_seconds_sum", queue="recommend-heavy")  # noqa: E731
        r.stubs.recommend.Recommend(request, timeout=300)
        full = compute()
        with pytest.raises(grpc.RpcError) as e:
            r.stubs.recommend.Recommend(request, timeout=full / 10)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Dropped: by its deadline, or as cancelled when gRPC's end-of-call callback came first.
        dropped = lambda: sum(r.metric("genrec_dropped_total", queue="recommend-heavy", reason=reason)  # noqa: E731
                              for reason in ("deadline", "cancelled"))
        wait_for(lambda: dropped() == 1, timeout=60, what="the stopped batch to be counted")
        assert compute() - full < full / 2
        # A 1 ms deadline: DEADLINE_EXCEEDED, and the server stays healthy and answers the next call.
        with pytest.raises(grpc.RpcError) as e:
            r.stubs.recommend.Recommend(request, timeout=0.001)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        health = health_pb2_grpc.HealthStub(r.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        cheap = r.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids[:5], k=5), timeout=30)
        assert len(cheap.items) == 5
