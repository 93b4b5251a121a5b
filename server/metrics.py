"""Prometheus metrics of one server, in its own registry (so several servers can live in one process, e.g. tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        r = self.registry
        self.requests = Counter("genrec_requests", "RPCs finished, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("genrec_request_latency_seconds", "RPC latency at the server, by method",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("genrec_batch_size", "requests per computed batch, by queue", ["queue"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("genrec_queue_depth", "requests waiting, by queue", ["queue"], registry=r)
        self.queue_wait = Histogram("genrec_queue_wait_seconds", "time from enqueue to batch start, by queue",
                                    ["queue"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("genrec_batch_compute_seconds", "time to compute one batch, by queue", ["queue"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.dropped = Counter("genrec_dropped", "requests not computed, by queue and reason "
                               "(overload, deadline, cancelled)", ["queue", "reason"], registry=r)
        self.reloads = Counter("genrec_reloads", "bundle reloads, by result", ["result"], registry=r)
        self.bundle = Gauge("genrec_bundle_info", "the bundle being served (value 1)",
                            ["bundle_id", "version", "path"], registry=r)

    def set_bundle(self, bundle_id: str, version: int, path: str) -> None:
        self.bundle.clear()
        self.bundle.labels(bundle_id, str(version), path).set(1)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 if absent); for tests and the benchmark."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP endpoint; returns (http server, bound port)."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return httpd, httpd.server_port
