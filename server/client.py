"""Client side of genrec.v1: a channel with the server's message limits, optional TLS and bearer token, and the
stubs. Used by `genrec query`, the load test and the tests."""

from __future__ import annotations

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


def open_channel(target: str, token: str | None = None, tls_ca: Path | None = None,
                 interceptors: tuple = (), max_message_bytes: int = 16 << 20,
                 tls_server_name: str | None = None) -> grpc.Channel:
    """A channel to `target` (host:port). `tls_ca`: PEM roots to trust (turns TLS on)."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
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
