"""Server interceptors for the genrec.v1 services: errors -> status codes plus metrics (outermost), bearer auth.

Health and reflection pass through untouched: probes and tools need neither a token nor our accounting.
"""

from __future__ import annotations

import hmac
import logging
import time

import grpc

from genrec.server.errors import Unauthenticated, status_of
from genrec.server.metrics import Metrics

log = logging.getLogger(__name__)
_PREFIX = "/genrec.v1."


def _replace_unary(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """The boundary: maps exceptions to a status with genrec.server.errors.status_of, counts every RPC by method and
    code, and times it."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(_PREFIX) or handler.unary_unary is None:
            return handler
        method = details.method.removeprefix(_PREFIX)
        behavior = handler.unary_unary

        def observed(request, context):
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return behavior(request, context)
            except Exception as e:  # noqa: BLE001 - every failure leaves as a status
                code, message = status_of(e)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                context.abort(code, message)
            finally:
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
