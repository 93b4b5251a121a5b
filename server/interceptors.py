"""Server interceptors for the genrec.v1 services: errors -> status codes plus metrics (outermost), bearer auth.

Health and reflection pass through untouched: probes and tools need neither a token nor our accounting.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time

import grpc

from genrec.server.config import LimitsConfig
from genrec.server.errors import InvalidRequest, Overloaded, Unauthenticated, status_of
from genrec.server.metrics import Metrics

log = logging.getLogger(__name__)
_PREFIX = "/genrec.v1."


def _replace_unary(handler: grpc.RpcMethodHandler, behavior, deserializer=None) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behavior,
                                               request_deserializer=deserializer or handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


class _Unreadable:
    """What the guarded deserializer hands on instead of raising (gRPC would answer a raise with INTERNAL)."""

    def __init__(self, error: Exception):
        self.error = error


def _guarded(deserialize, method: str, max_bytes: int):
    """Refuse a request larger than any valid one before parsing it, and malformed bytes as the caller's fault."""

    def read(data: bytes):
        if len(data) > max_bytes:
            return _Unreadable(InvalidRequest(
                f"the {method} request is {len(data):,} bytes, above the {max_bytes:,} that the largest valid one "
                "takes under this server's limits (InfoService/GetInfo lists them): send a smaller request"))
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _Unreadable(InvalidRequest(
                f"the {method} request is not a valid protobuf message of its type ({type(e).__name__}): build it "
                "with stubs generated from genrec.v1's .proto files"))

    return read


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """The boundary: admits at most `max_concurrent` genrec.v1 calls at once (more are refused with
    RESOURCE_EXHAUSTED), maps exceptions to a status with genrec.server.errors.status_of, counts every RPC, refused
    ones included, by method and code, and times it. Health and reflection are not limited here: gRPC's own ceiling
    sits above this one (server/app.py), so probes still get a thread when genrec.v1 calls fill the limit."""

    def __init__(self, metrics: Metrics, max_concurrent: int, limits: LimitsConfig):
        self.metrics, self.max_concurrent, self.limits = metrics, max_concurrent, limits
        self._admission = threading.BoundedSemaphore(max_concurrent)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(_PREFIX) or handler.unary_unary is None:
            return handler
        method = details.method.removeprefix(_PREFIX)
        behavior = handler.unary_unary

        def observed(request, context):
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            admitted = self._admission.acquire(blocking=False)
            try:
                if not admitted:
                    raise Overloaded(f"the server is at its limit of {self.max_concurrent} concurrent calls: retry "
                                     "with backoff, lower the concurrency, or add replicas")
                if isinstance(request, _Unreadable):
                    raise request.error
                return behavior(request, context)
            except Exception as e:  # noqa: BLE001 - every failure leaves as a status
                code, message = status_of(e)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                context.abort(code, message)
            finally:
                if admitted:
                    self._admission.release()
                self.metrics.requests.labels(method, code.name).inc()
                self.metrics.latency.labels(method).observe(time.perf_counter() - t0)

        deserializer = _guarded(handler.request_deserializer, method, self.limits.request_bytes(method))
        return _replace_unary(handler, observed, deserializer)


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on genrec.v1 methods (compared in constant time)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        if not details.method.startswith(_PREFIX):
            return continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return continuation(details)
        handler = continuation(details)

        def deny(request, context):
            raise Unauthenticated("missing or wrong bearer token: send metadata `authorization: Bearer <token>`")

        return _replace_unary(handler, deny) if handler is not None else None
