"""The micro-batching policy alone (no gRPC, no model): grouping, waiting, bounds, deadlines, cancellation, drain.

Timing never decides an outcome here: a gate event holds the worker inside `run` where a test needs it busy.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from genrec.server.batching import MicroBatcher, grouped
from genrec.server.config import BatchingConfig
from genrec.server.errors import Cancelled, DeadlineExpired, Overloaded, Unavailable
from genrec.server.metrics import Metrics

from serverutil import wait_for


class Recorder:
    """run(): records each batch, optionally blocks on a gate, fails on 'bad', returns payload * 2."""

    def __init__(self, gated: bool = False):
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, payloads):
        self.batches.append(list(payloads))
        self.entered.set()
        self.gate.wait(30)
        if "bad" in payloads:
            raise ValueError("bad payload")
        return [p * 2 for p in payloads]


def make(run, **cfg):
    metrics = Metrics()
    return MicroBatcher("t", run, BatchingConfig(**cfg), metrics), metrics


def submit_all(batcher, payloads, **kw):
    pool = ThreadPoolExecutor(len(payloads))
    return pool, [pool.submit(batcher.submit, p, **kw) for p in payloads]


def test_a_full_batch_runs_at_once_and_results_keep_their_order():
    run = Recorder()
    b, metrics = make(run, max_batch_size=4, max_wait_ms=10_000, max_queue=16)
    pool, futs = submit_all(b, ["a", "b", "c", "d"])
    done = [f.result(timeout=30) for f in futs]  # long before max_wait: the 4th request filled the batch
    assert [d.result for d in done] == ["aa", "bb", "cc", "dd"]
    assert len(run.batches) == 1 and sorted(run.batches[0]) == ["a", "b", "c", "d"]
    assert {d.batch_size for d in done} == {4}
    assert metrics.value("genrec_batch_size_sum", {"queue": "t"}) == 4
    b.close()


def test_a_lone_request_waits_at_most_max_wait():
    run = Recorder()
    b, _ = make(run, max_batch_size=8, max_wait_ms=50, max_queue=16)
    done = b.submit("x")
    assert done.result == "xx" and done.batch_size == 1 and done.queue_s >= 0.05
    b.close()


def test_batch_size_one_turns_batching_off():
    run = Recorder()
    b, _ = make(run, max_batch_size=1, max_wait_ms=10_000, max_queue=16)
    pool, futs = submit_all(b, list("abcdef"))
    assert sorted(f.result(timeout=30).result for f in futs) == ["aa", "bb", "cc", "dd", "ee", "ff"]
    assert all(len(batch) == 1 for batch in run.batches) and len(run.batches) == 6
    b.close()


def test_a_full_queue_refuses_at_once():
    run = Recorder(gated=True)
    b, metrics = make(run, max_batch_size=1, max_wait_ms=0, max_queue=2)
    pool, futs = submit_all(b, ["busy"])
    assert run.entered.wait(30)  # the worker is inside run(), holding "busy"
    _, queued = submit_all(b, ["q1", "q2"])
    wait_for(lambda: metrics.value("genrec_queue_depth", {"queue": "t"}) == 2, what="two queued requests")
    with pytest.raises(Overloaded, match="queue is full"):
        b.submit("refused")
    assert metrics.value("genrec_dropped_total", {"queue": "t", "reason": "overload"}) == 1
    run.gate.set()
    assert sorted(f.result(timeout=30).result for f in futs + queued) == ["busybusy", "q1q1", "q2q2"]
    assert "refused" not in [p for batch in run.batches for p in batch]
    b.close()


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_not_computed():
    run = Recorder(gated=True)
    b, metrics = make(run, max_batch_size=1, max_wait_ms=0, max_queue=8)
    pool, futs = submit_all(b, ["busy"])
    assert run.entered.wait(30)
    with pytest.raises(DeadlineExpired, match="was not computed"):
        b.submit("late", timeout=0.2)
    assert metrics.value("genrec_dropped_total", {"queue": "t", "reason": "deadline"}) == 1
    assert metrics.value("genrec_queue_depth", {"queue": "t"}) == 0  # it left the queue when it expired
    run.gate.set()
    futs[0].result(timeout=30)
    b.close()
    assert [p for batch in run.batches for p in batch] == ["busy"]


def test_a_cancelled_request_leaves_the_queue():
    run = Recorder(gated=True)
    b, metrics = make(run, max_batch_size=1, max_wait_ms=0, max_queue=8)
    pool, futs = submit_all(b, ["busy"])
    assert run.entered.wait(30)
    callbacks = []
    _, (gone,) = submit_all(b, ["gone"], on_rpc_done=callbacks.append)
    wait_for(lambda: callbacks, what="the request to be queued")
    callbacks[0]()  # what grpc does when the client cancels
    with pytest.raises(Cancelled):
        gone.result(timeout=30)
    run.gate.set()
    futs[0].result(timeout=30)
    b.close()
    assert [p for batch in run.batches for p in batch] == ["busy"]
    assert metrics.value("genrec_dropped_total", {"queue": "t", "reason": "cancelled"}) == 1


def test_a_failing_request_fails_alone():
    run = Recorder()
    b, _ = make(run, max_batch_size=3, max_wait_ms=10_000, max_queue=8)
    pool, futs = submit_all(b, ["a", "bad", "c"])
    results = {}
    for f in futs:
        try:
            results[f.result(timeout=30).result] = "ok"
        except ValueError as e:
            results["bad"] = str(e)
    assert results == {"aa": "ok", "cc": "ok", "bad": "bad payload"}
    b.close()


def test_close_runs_what_is_queued_then_refuses():
    run = Recorder()
    b, _ = make(run, max_batch_size=8, max_wait_ms=10_000, max_queue=8)
    pool, futs = submit_all(b, ["a", "b", "c"])
    wait_for(lambda: b._metrics.value("genrec_queue_depth", {"queue": "t"}) == 3, what="three queued requests")
    b.close(timeout=30)  # does not wait out max_wait: the three run as one batch now
    assert sorted(f.result(timeout=1).result for f in futs) == ["aa", "bb", "cc"]
    assert len(run.batches) == 1
    with pytest.raises(Unavailable, match="shutting down"):
        b.submit("late")


def test_grouped_keeps_first_seen_order():
    assert grouped([3, 1, 3, 2, 1], key=lambda x: x) == [[0, 2], [1, 4], [3]]
