"""The composition root: `create_server(config) -> (server, port)` wires the Engine, the batch queues, the
servicers, health, reflection, interceptors and metrics. Nothing else in server/ constructs these."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genrec.server.batching import MicroBatcher, grouped
from genrec.server.config import ServerConfig
from genrec.server.engine import Engine, set_compute_threads
from genrec.server.interceptors import AuthInterceptor, ObservabilityInterceptor
from genrec.server.metrics import Metrics
from genrec.server.servicers import AdminServicer, EmbedServicer, InfoServicer, RecommendServicer, SearchServicer
from genrec.server.swap import EngineSlot
from genrec.v1 import (embed_pb2, embed_pb2_grpc, info_pb2, info_pb2_grpc, recommend_pb2, recommend_pb2_grpc,
                       search_pb2, search_pb2_grpc)

log = logging.getLogger(__name__)

HEADROOM = 64  # RPCs beyond the genrec.v1 limit: probes, reflection, and refusals

# Full names of the genrec.v1 services, for health, reflection and the interceptors.
SERVICE_NAMES = tuple(svc.full_name for mod in (recommend_pb2, embed_pb2, search_pb2, info_pb2)
                      for svc in mod.DESCRIPTOR.services_by_name.values())


def per_engine(method: str):
    """A batch runner over (engine, query) payloads: one call of `Engine.<method>` per engine in the batch (two
    engines only meet in one batch during a hot swap)."""

    def run(payloads: list[tuple[Engine, object]]) -> list:
        out = [None] * len(payloads)
        for idx in grouped(payloads, key=lambda p: id(p[0])):
            engine = payloads[idx[0]][0]
            for i, result in zip(idx, getattr(engine, method)([payloads[i][1] for i in idx])):
                out[i] = result
        return out

    return run


@dataclass
class GenrecServer:
    """A created server: `start()`, then `warm_up()` (health turns SERVING), `stop()` drains and stops."""

    config: ServerConfig
    grpc_server: grpc.Server
    port: int
    slot: EngineSlot
    batchers: dict[str, MicroBatcher]
    health: health.HealthServicer
    metrics: Metrics
    metrics_port: int | None = None
    _metrics_http: object = None

    def start(self) -> None:
        self.grpc_server.start()
        log.info("listening on %s:%d (NOT_SERVING until warm)%s", self.config.host, self.port,
                 f", metrics on :{self.metrics_port}/metrics" if self.metrics_port is not None else "")

    def warm_up(self) -> None:
        """Run every path of the engine once, then report SERVING."""
        self.slot.current.warm_up()
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s version %d (%s)", self.slot.current.path, self.slot.current.version,
                 self.slot.current.bundle_id)

    def reload(self, path: str | None = None) -> Engine:
        return self.slot.reload(path)

    def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING (load balancers drain) for drain_s, refuse new RPCs, let in-flight ones finish within `grace`
        seconds, then stop the queues and the metrics endpoint."""
        grace = self.config.grace_s if grace is None else grace
        end = time.monotonic() + grace  # the whole stop fits in `grace` (plus the batch running at its end)
        self.health.enter_graceful_shutdown()
        time.sleep(min(self.config.drain_s, grace))  # health watchers move their new calls to other replicas
        stopped = self.grpc_server.stop(max(0.0, end - time.monotonic()))  # refuses new RPCs; cancels the rest at end
        for b in self.batchers.values():
            b.flush()  # in-flight requests wait in the queues: run them now rather than wait for fuller batches
        stopped.wait()
        for b in self.batchers.values():  # cancelled callers left: their queued work is dropped, VED stops early
            b.close(timeout=max(0.0, end - time.monotonic()) + 1.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")


def create_server(config: ServerConfig) -> tuple[GenrecServer, int]:
    """Load the bundle, build the server and bind its port (0 = a free one). Health reports NOT_SERVING until
    `warm_up()`. Raises BundleError when the bundle cannot be served."""
    metrics = Metrics()
    threads = set_compute_threads(config.threads)
    log.info("compute threads: %d (torch, FAISS, ONNX Runtime)", threads)
    slot = EngineSlot(Engine.load(config.bundle, device=config.device, backend=config.backend), metrics)
    batchers = {name: MicroBatcher(name, per_engine(name), config.batching, metrics) for name in ("recommend", "embed")}
    search = config.batching.model_copy(update={"max_wait_ms": config.batching.search_max_wait_ms})
    batchers["search"] = MicroBatcher("search", per_engine("search"), search, metrics)
    heavy = config.batching.model_copy(update={"max_batch_size": min(config.heavy_batch_size,
                                                                      config.batching.max_batch_size)})
    batchers["recommend-heavy"] = MicroBatcher("recommend-heavy", per_engine("recommend"), heavy, metrics)

    interceptors = [ObservabilityInterceptor(metrics, config.max_concurrent_rpcs, config.limits)]
    if config.auth_token is not None:
        interceptors.append(AuthInterceptor(config.auth_token.get_secret_value()))
    size = config.limits.max_message_bytes
    # No method takes more than its largest valid request (LimitsConfig.request_bytes), so gRPC need not buffer more.
    receive = max(config.limits.request_bytes(f"{svc.name}/{m.name}") for mod in (recommend_pb2, embed_pb2,
                  search_pb2, info_pb2) for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods)
    # One thread per RPC: a queued request holds its thread while it waits for its batch. The interceptor admits
    # max_concurrent_rpcs genrec.v1 calls; gRPC's ceiling sits HEADROOM above, so health checks, reflection and the
    # answers that refuse (and count) the excess calls still find a thread.
    ceiling = config.max_concurrent_rpcs + HEADROOM
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=ceiling, thread_name_prefix="rpc"),
        interceptors=interceptors, maximum_concurrent_rpcs=ceiling,
        options=[("grpc.max_receive_message_length", receive), ("grpc.max_send_message_length", size),
                 ("grpc.so_reuseport", int(config.reuse_port))])

    limits = config.limits
    recommend_pb2_grpc.add_RecommendServiceServicer_to_server(
        RecommendServicer(slot, batchers["recommend"], batchers["recommend-heavy"], config), server)
    embed_pb2_grpc.add_EmbedServiceServicer_to_server(EmbedServicer(slot, batchers["embed"], limits), server)
    search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(slot, batchers["search"], limits), server)
    info_pb2_grpc.add_InfoServiceServicer_to_server(InfoServicer(slot, config), server)
    info_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(slot, config), server)

    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)

    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        for b in batchers.values():
            b.close()
        raise OSError(f"cannot listen on {address}: the port is taken or the host is not an address of this machine")
    created = GenrecServer(config, server, port, slot, batchers, health_servicer, metrics)
    if config.metrics_port is not None:
        try:
            created._metrics_http, created.metrics_port = metrics.serve(config.host, config.metrics_port)
        except OSError as e:
            for b in batchers.values():
                b.close()
            raise OSError(f"cannot serve metrics on {config.host}:{config.metrics_port} ({e}): pick another "
                          "--metrics-port, 0 for a free one, or -1 for none") from None
    return created, port


def serve_until_signalled(server: GenrecServer, on_ready=None) -> None:
    """Start, warm and serve until SIGTERM or SIGINT, then stop gracefully (a second signal cancels what is still
    running); SIGHUP reloads the bundle from its path. `on_ready()` is called once warm. Must run on the main
    thread, which owns signal handlers."""
    import signal

    stopping = threading.Event()

    def on_stop(signum, frame):
        if stopping.is_set():
            log.warning("%s again: cancelling in-flight requests", signal.Signals(signum).name)
            server.grpc_server.stop(0)
        stopping.set()

    def on_hup(signum, frame):
        def reload():
            try:
                server.reload()
            except Exception:  # noqa: BLE001 - the slot logged it; the old bundle keeps serving
                pass

        threading.Thread(target=reload, name="reload", daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    server.start()
    try:
        server.warm_up()
    except BaseException:
        server.stop(grace=0)
        raise
    if on_ready is not None:
        on_ready()
    while not stopping.wait(0.5):  # a timed wait, so the main thread keeps returning to run signal handlers
        pass
    log.info("stopping gracefully (grace %.0fs)", server.config.grace_s)
    server.stop()
