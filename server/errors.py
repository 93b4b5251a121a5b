"""The serving errors, classified once, and the one place that maps them to gRPC status codes.

Code below the boundary raises these (or genrec's BundleError); the interceptor in server/interceptors.py turns
them into a status with `status_of`. Anything else is a bug: INTERNAL, with the traceback in the server log only.
"""

from __future__ import annotations

import grpc

from genrec.core.bundle import BundleError


class ServingError(Exception):
    """Base of the errors a client can act on; the message says what to change."""


class InvalidRequest(ServingError):
    """The request itself is wrong (empty, unknown ids, out of range, malformed)."""


class Overloaded(ServingError):
    """A bounded queue is full: the client should back off and retry, or the operator add replicas."""


class DeadlineExpired(ServingError):
    """The request's deadline passed before its batch ran; it was dropped, not computed."""


class Cancelled(ServingError):
    """The client went away before its batch ran."""


class Abandoned(ServingError):
    """Every caller of a running batch left (deadline or cancel): the batch stopped early, nobody gets its result."""


class Unavailable(ServingError):
    """The server is shutting down."""


class NotServed(ServingError):
    """This bundle cannot answer this RPC (e.g. it has no recommender yet)."""


class Unauthenticated(ServingError):
    """Missing or wrong bearer token."""


class PermissionDenied(ServingError):
    """The caller may not do this here (Reload without auth, or of a path outside the reload root)."""


_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Abandoned: grpc.StatusCode.CANCELLED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    NotServed: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    BundleError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message for the client) of an exception raised while serving a request."""
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details"
