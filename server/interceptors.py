"""Server interceptors for the genrec.v1 services: errors -> status codes plus metrics (outermost), bearer auth.

Health and reflection pass through untouched: probes and tools need neither a token nor our accounting.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time

import grpc

from genrec.server.errors import Overloaded, Unauthenticated, status_of
from genrec.server.metrics import Metrics

log = logging.getLogger(__name__)
_PREFIX = "/genrec.v1."


def _replace_unary(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """The boundary: admits at most `max_concurrent` genrec.v1 calls at once (more are refused with
    RESOURCE_EXHAUSTED), maps exceptions to a status with genrec.server.errors.status_of, counts every RPC, refused
    ones included, by method and code, and times it. Health and reflection are not limited here: gRPC's own ceiling
    sits above this one (server/app.py), so probes still get a thread when genrec.v1 calls fill the limit."""

    def __init__(self, metrics: Metrics, max_concurrent: int):
        self.metrics, self.max_concurrent = metrics, max_concurrent
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

        return _replace_unary(handler, observed)


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
