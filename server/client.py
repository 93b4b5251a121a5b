"""Client side of genrec.v1: a channel with the server's message limits, optional TLS and bearer token, and the
stubs. Used by `genrec query`, the load test and the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from genrec.v1 import embed_pb2_grpc, info_pb2_grpc, recommend_pb2_grpc, search_pb2_grpc


class BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (works on plaintext channels too, unlike call
    credentials, which gRPC sends only over TLS)."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        metadata = [*(details.metadata or ()), self._header]
        return continuation(details._replace(metadata=metadata), request)


# Calls a replica may refuse while others can answer: UNAVAILABLE (draining, restarting, unreachable) and
# RESOURCE_EXHAUSTED (its queue or concurrency limit is full). Only the read-only services are retried; Admin is not.
RETRIED_SERVICES = ("RecommendService", "EmbedService", "SearchService", "InfoService")


def service_config(max_attempts: int = 3) -> dict:
    """The gRPC service config of a genrec client: round-robin over the SERVING ones of the addresses the target
    resolves to (the pods behind a headless Service, or `ipv4:10.0.0.1:50051,10.0.0.2:50051`), and a bounded retry
    of refused calls on another replica. Retry throttling stops retries when more than half the recent calls
    failed, so a fleet that is overloaded as a whole is not hit twice as hard."""
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        # Client-side health checking: a replica that reports NOT_SERVING (warming, draining) gets no new calls.
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [{
            "name": [{"service": f"genrec.v1.{s}"} for s in RETRIED_SERVICES],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.02s", "maxBackoff": "0.5s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]},
        }],
        "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.2},
    }


def open_channel(target: str, token: str | None = None, tls_ca: Path | None = None,
                 interceptors: tuple = (), max_message_bytes: int = 16 << 20,
                 tls_server_name: str | None = None, balanced: bool = True) -> grpc.Channel:
    """A channel to `target`: host:port, or any gRPC name (`dns:///genrec-headless:50051` resolves to every
    replica; `ipv4:a:p,b:p` lists them). `balanced`: round-robin over the SERVING replicas with retries (see
    `service_config`); off, a plain channel whose every call makes exactly one attempt, even to a server that is not
    SERVING yet (what tests of the server's own answers need). `tls_ca`: PEM roots to trust (turns TLS on)."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if balanced:
        options += [("grpc.service_config", json.dumps(service_config())), ("grpc.enable_retries", 1),
                    # A restarted replica is back in the rotation within a second, not after minutes of backoff.
                    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
    else:
        options.append(("grpc.enable_retries", 0))
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    if tls_ca is not None:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), options)
    else:
        channel = grpc.insecure_channel(target, options)
    chain = [*interceptors, *([BearerToken(token)] if token else [])]
    return grpc.intercept_channel(channel, *chain) if chain else channel


@dataclass
class Stubs:
    recommend: recommend_pb2_grpc.RecommendServiceStub
    embed: embed_pb2_grpc.EmbedServiceStub
    search: search_pb2_grpc.SearchServiceStub
    info: info_pb2_grpc.InfoServiceStub
    admin: info_pb2_grpc.AdminServiceStub

    @classmethod
    def of(cls, channel: grpc.Channel) -> "Stubs":
        return cls(recommend_pb2_grpc.RecommendServiceStub(channel), embed_pb2_grpc.EmbedServiceStub(channel),
                   search_pb2_grpc.SearchServiceStub(channel), info_pb2_grpc.InfoServiceStub(channel),
                   info_pb2_grpc.AdminServiceStub(channel))
