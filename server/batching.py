"""Micro-batching policy: which queued requests run together, and when. What they compute is not its business.

Each queue has one worker thread. The worker waits for the oldest request, then until the batch is full or the
oldest has waited `max_wait_ms`, takes up to `max_batch_size` requests and hands them to `run` as one list. The queue
is bounded: a request that finds it full is refused at once (Overloaded -> RESOURCE_EXHAUSTED), so overload shows up
as fast failures a client can back off from, not as unbounded latency. A request whose deadline passes or whose
client leaves while it waits is taken out of the queue at that moment: it is never computed and holds no place.
A long computation (VED) asks `batch_alive()` between its rounds and stops once every caller of its batch has left.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Iterable, TypeVar

from genrec.server.config import BatchingConfig
from genrec.server.errors import Abandoned, Cancelled, DeadlineExpired, Overloaded, Unavailable
from genrec.server.metrics import Metrics

P = TypeVar("P")  # a request payload
R = TypeVar("R")  # its result

log = logging.getLogger(__name__)

# Set while a batch computes, on its worker thread: () -> bool, whether any caller of the batch still waits.
_batch_alive: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("batch_alive", default=None)


def batch_alive() -> Callable[[], bool] | None:
    """For the computation of a batch: a check that some caller still waits for it (None outside a batch)."""
    return _batch_alive.get()


@dataclass
class Done(Generic[R]):
    """A computed result and where its time went."""

    result: R
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(eq=False)  # identity semantics: deque.remove must find this very request
class _Pending(Generic[P]):
    payload: P
    deadline: float | None  # time.monotonic() after which the result is useless
    enqueued: float = field(default_factory=time.monotonic)
    done: Done | None = None
    error: BaseException | None = None
    event: threading.Event = field(default_factory=threading.Event)
    gone: bool = False  # its RPC ended (deadline, cancel) while it was in a running batch

    def finish(self, done: Done | None = None, error: BaseException | None = None) -> None:
        self.done, self.error = done, error
        self.event.set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


DEADLINE_SLACK_S = 0.05


class MicroBatcher(Generic[P, R]):
    """submit(payload) blocks the calling (RPC) thread until its batch ran; run(list of payloads) -> list of results
    in the same order is called on the worker thread."""

    def __init__(self, name: str, run: Callable[[list[P]], list[R]], cfg: BatchingConfig, metrics: Metrics):
        self.name, self._run, self.cfg, self._metrics = name, run, cfg, metrics
        self._queue: deque[_Pending[P]] = deque()
        self._cond = threading.Condition()
        self._flush = False  # draining for shutdown: run what is queued now, do not wait for fuller batches
        self._closed = False
        self._depth = metrics.queue_depth.labels(name)
        self._worker = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    def submit(self, payload: P, timeout: float | None = None,
               on_rpc_done: Callable[[Callable[[], None]], object] | None = None) -> Done[R]:
        """Queue `payload` and wait for its result. `timeout`: seconds left until the client's deadline.
        `on_rpc_done`: registers a callback for the end of the RPC (grpc's context.add_callback), so a request
        whose client cancels leaves the queue at once."""
        now = time.monotonic()
        pending = _Pending(payload, None if timeout is None else now + timeout, enqueued=now)
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down: retry on another replica")
            if len(self._queue) >= self.cfg.max_queue:
                self._metrics.dropped.labels(self.name, "overload").inc()
                raise Overloaded(f"the {self.name} queue is full ({self.cfg.max_queue} requests waiting): retry "
                                 "with backoff, lower the request rate, or add replicas")
            self._queue.append(pending)
            self._depth.set(len(self._queue))
            self._cond.notify_all()
        if on_rpc_done is not None:
            on_rpc_done(lambda: self._abandon(pending))
        if not pending.event.wait(timeout):
            self._abandon(pending)
            if not pending.event.is_set():  # already in a running batch: its result will just be discarded
                raise DeadlineExpired(f"the deadline passed while the {self.name} batch ran: allow a longer "
                                      "deadline or lower the load")
        if pending.error is not None:
            raise pending.error
        return pending.done

    def _abandon(self, pending: _Pending[P]) -> None:
        """Take a request whose deadline passed or whose client left out of the queue (no-op once it was taken
        into a batch or finished)."""
        with self._cond:
            try:
                self._queue.remove(pending)
            except ValueError:
                pending.gone = True  # in a running batch (or done): the batch may stop once all its callers left
                return
            self._depth.set(len(self._queue))
        self._drop(pending, time.monotonic())

    def _drop(self, pending: _Pending[P], now: float) -> None:
        # gRPC ends a call at its own clock's deadline, which can fire a few ms before ours (taken when the request
        # was queued): a call that ends that close to its deadline timed out, it was not cancelled.
        if pending.expired(now + DEADLINE_SLACK_S):
            self._metrics.dropped.labels(self.name, "deadline").inc()
            pending.finish(error=DeadlineExpired(
                f"the deadline passed while the request waited in the {self.name} queue; it was not computed: "
                "allow a longer deadline or lower the load"))
        else:
            self._metrics.dropped.labels(self.name, "cancelled").inc()
            pending.finish(error=Cancelled("the client cancelled the request before it ran"))

    def flush(self) -> None:
        """Stop waiting for fuller batches (shutdown has begun); still accept requests."""
        with self._cond:
            self._flush = True
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, run the queued ones, stop the worker."""
        with self._cond:
            self._flush = self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)

    # ---- worker ----------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[_Pending[P]] | None:
        """Block until a batch is due; None once closed and drained."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                if len(self._queue) >= self.cfg.max_batch_size or self._flush:
                    break
                left = self._queue[0].enqueued + self.cfg.max_wait_ms / 1000 - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(len(self._queue), self.cfg.max_batch_size)
            batch = [self._queue.popleft() for _ in range(n)]
            self._depth.set(len(self._queue))
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            start = time.monotonic()
            live = []
            for p in batch:
                if p.expired(start):  # its RPC thread has not woken up yet to take it out
                    self._drop(p, start)
                else:
                    live.append(p)
                    self._metrics.queue_wait.labels(self.name).observe(start - p.enqueued)
            if live:
                self._compute(live, start)

    def _compute(self, live: list[_Pending[P]], start: float) -> None:
        def alive() -> bool:
            now = time.monotonic()
            return any(not p.gone and not p.expired(now) for p in live)

        token = _batch_alive.set(alive)
        try:
            results = self._run([p.payload for p in live])
            assert len(results) == len(live), f"{self.name}: run returned {len(results)} results for {len(live)}"
        except Abandoned:
            now = time.monotonic()
            self._metrics.compute.labels(self.name).observe(now - start)
            for p in live:
                self._drop(p, now)
            return
        except Exception as e:  # noqa: BLE001 - re-raised in each caller's thread
            if len(live) > 1:  # isolate the request that broke the batch: the others still get answers
                log.warning("%s: a batch of %d failed (%s); retrying one at a time", self.name, len(live), e)
                for p in live:
                    self._compute([p], time.monotonic())
                return
            live[0].finish(error=e)
            return
        finally:
            _batch_alive.reset(token)
        compute = time.monotonic() - start
        self._metrics.batch_size.labels(self.name).observe(len(live))
        self._metrics.compute.labels(self.name).observe(compute)
        for p, r in zip(live, results):
            p.finish(Done(r, start - p.enqueued, compute, len(live)))


def grouped(items: Iterable[P], key: Callable[[P], Hashable]) -> list[list[int]]:
    """Indices of `items` grouped by key, in first-seen order: requests that can share one model call."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())
