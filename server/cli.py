"""`genrec serve` and `genrec query ...`: each command parses its options, builds a typed config or request, calls.

genrec/cli.py registers them:  app.command("serve")(serve)  and  app.add_typer(query_app, name="query").
"""

from __future__ import annotations

import functools
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from genrec.server.config import BatchingConfig, ServerConfig

_S, _B = ServerConfig.model_fields, BatchingConfig.model_fields


def serve(
    bundle: Annotated[Path, typer.Option(help=_S["bundle"].description)],
    host: Annotated[str, typer.Option(help=_S["host"].description)] = _S["host"].default,
    port: Annotated[int, typer.Option(min=0, max=65535, help=_S["port"].description)] = _S["port"].default,
    metrics_port: Annotated[int, typer.Option(
        min=-1, max=65535, help="Prometheus /metrics HTTP port; 0 picks a free one, -1 turns it off")] = 9090,
    max_batch_size: Annotated[int, typer.Option(min=1, help=_B["max_batch_size"].description)] = (
        _B["max_batch_size"].default),
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help=_B["max_wait_ms"].description)] = (
        _B["max_wait_ms"].default),
    search_max_wait_ms: Annotated[float, typer.Option(min=0.0, help=_B["search_max_wait_ms"].description)] = (
        _B["search_max_wait_ms"].default),
    max_queue: Annotated[int, typer.Option(min=1, help=_B["max_queue"].description)] = _B["max_queue"].default,
    max_concurrent_rpcs: Annotated[int, typer.Option(min=1, help=_S["max_concurrent_rpcs"].description)] = (
        _S["max_concurrent_rpcs"].default),
    threads: Annotated[int, typer.Option(min=0, help=_S["threads"].description)] = 0,
    device: Annotated[str, typer.Option(help=_S["device"].description)] = _S["device"].default,
    backend: Annotated[str, typer.Option(help=_S["backend"].description)] = _S["backend"].default,
    grace_s: Annotated[float, typer.Option(min=0.0, help=_S["grace_s"].description)] = _S["grace_s"].default,
    drain_s: Annotated[float, typer.Option(min=0.0, help=_S["drain_s"].description)] = _S["drain_s"].default,
    auth_token: Annotated[Optional[str], typer.Option(
        envvar="GENREC_AUTH_TOKEN", show_default=False,
        help=_S["auth_token"].description + " (prefer the GENREC_AUTH_TOKEN env var: argv is visible to ps)")] = None,
    reload_root: Annotated[Optional[Path], typer.Option(help=_S["reload_root"].description)] = None,
    allow_unauthenticated_reload: Annotated[bool, typer.Option(
        help=_S["allow_unauthenticated_reload"].description)] = False,
    tls_cert: Annotated[Optional[Path], typer.Option(help=_S["tls_cert"].description)] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help=_S["tls_key"].description)] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
    workers: Annotated[int, typer.Option(
        min=1, max=256, help="server processes sharing the port (SO_REUSEPORT), each with the bundle loaded and an "
        "equal share of the cores; worker i serves /metrics on metrics-port + i")] = 1,
):
    """Serve a bundle over gRPC (genrec.v1 Recommend, Embed, Search, Info, Admin; health; reflection).

    SIGTERM/SIGINT stop gracefully (in-flight requests finish); SIGHUP reloads the bundle from its path."""
    from pydantic import ValidationError

    from genrec.core.bundle import BundleError
    from genrec.server.app import create_server, serve_until_signalled

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked, at INFO
    if auth_token is None and os.environ.get("GENREC_AUTH_TOKEN") is not None:  # click reads "" as unset
        typer.echo("error: GENREC_AUTH_TOKEN is set but empty: give a token, or unset it to serve without auth",
                   err=True)
        raise typer.Exit(2)
    try:
        config = ServerConfig(
            bundle=bundle, host=host, port=port, metrics_port=None if metrics_port < 0 else metrics_port,
            batching=BatchingConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                    search_max_wait_ms=search_max_wait_ms, max_queue=max_queue),
            max_concurrent_rpcs=max_concurrent_rpcs, threads=threads, device=device, backend=backend,
            grace_s=grace_s, drain_s=drain_s,
            auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key, reload_root=reload_root,
            allow_unauthenticated_reload=allow_unauthenticated_reload)
        if workers > 1:
            from genrec.server.workers import serve_workers

            raise typer.Exit(serve_workers(config, workers, log_level))
        server, bound = create_server(config)
    except (ValidationError, BundleError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"genrec.v1 on {host}:{bound}", err=True)
    serve_until_signalled(server)


# ---- genrec query ------------------------------------------------------------------------------------------
query_app = typer.Typer(no_args_is_help=True, help="Call a running genrec server (prints the response as JSON).")

Target = Annotated[str, typer.Option(envvar="GENREC_TARGET", help="server address host:port, or a gRPC name that "
                                     "resolves to several replicas (dns:///genrec:50051, ipv4:10.0.0.1:50051,"
                                     "10.0.0.2:50051): calls are spread round-robin and refused ones retried")]
Token = Annotated[Optional[str], typer.Option(envvar="GENREC_AUTH_TOKEN", show_default=False,
                                              help="bearer token, when the server requires one")]
TlsCa = Annotated[Optional[Path], typer.Option(help="PEM root certificates to trust; turns TLS on")]
Timeout = Annotated[float, typer.Option(min=0.001, help="deadline of the call in seconds")]
K = Annotated[int, typer.Option("-k", "--k", min=1, help="items to return")]


class Decoding(str, Enum):
    beam = "beam"
    ved = "ved"
    sample = "sample"


class RoleName(str, Enum):
    query = "query"
    document = "document"


def _call(fn):
    """Print the response as JSON; an RPC error ends the command with its status (exit 2 for bad input)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import grpc
        from google.protobuf.json_format import MessageToJson

        try:
            response = fn(*args, **kwargs)
        except grpc.RpcError as e:
            typer.echo(f"error: {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1) from None
        typer.echo(MessageToJson(response, preserving_proto_field_name=True, indent=2))

    return wrapper


def _stubs(target: str, token: str | None, tls_ca: Path | None):
    from genrec.server.client import Stubs, open_channel

    return Stubs.of(open_channel(target, token, tls_ca))


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integer item ids, e.g. 12,7,33") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


@query_app.command("recommend")
@_call
def recommend(
    items: Annotated[str, typer.Option(help="the user's history: item ids, oldest first, e.g. 12,7,33")],
    k: K = 10,
    decoding: Annotated[Decoding, typer.Option(help="decoding strategy")] = Decoding.beam,
    beam_width: Annotated[int, typer.Option(min=0, help="beam width (>= k); 0 = the server default")] = 0,
    budget: Annotated[int, typer.Option(min=0, help="VED: model forwards to spend; 0 = the beam's")] = 0,
    exclude_seen: Annotated[bool, typer.Option(help="never return an item of the history")] = False,
    target: Target = "127.0.0.1:50051", token: Token = None, tls_ca: TlsCa = None, timeout: Timeout = 10.0,
):
    """The next items for a history."""
    from genrec.v1 import recommend_pb2

    strategy = recommend_pb2.DecodingStrategy.Value(f"DECODING_STRATEGY_{decoding.value.upper()}")
    request = recommend_pb2.RecommendRequest(
        history=_ints(items), k=k, exclude_seen=exclude_seen,
        decoding=recommend_pb2.Decoding(strategy=strategy, beam_width=beam_width, budget=budget))
    return _stubs(target, token, tls_ca).recommend.Recommend(request, timeout=timeout)


@query_app.command("search")
@_call
def search(
    text: Annotated[Optional[str], typer.Option(help="free-text query")] = None,
    image: Annotated[Optional[Path], typer.Option(help="image file query (needs a VLM backbone)")] = None,
    vector: Annotated[Optional[str], typer.Option(help="comma-separated vector query")] = None,
    k: K = 5,
    target: Target = "127.0.0.1:50051", token: Token = None, tls_ca: TlsCa = None, timeout: Timeout = 10.0,
):
    """Nearest catalog items to a text, image or vector."""
    from genrec.v1 import search_pb2

    given = [x for x in (text, image, vector) if x is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --text, --image or --vector")
    if text is not None:
        request = search_pb2.SearchRequest(text=text, k=k)
    elif image is not None:
        request = search_pb2.SearchRequest(image=image.read_bytes(), k=k)
    else:
        request = search_pb2.SearchRequest(vector=search_pb2.Vector(values=_floats(vector)), k=k)
    return _stubs(target, token, tls_ca).search.Search(request, timeout=timeout)


@query_app.command("embed")
@_call
def embed(
    text: Annotated[Optional[list[str]], typer.Option(help="a text to embed; repeat for several")] = None,
    image: Annotated[Optional[list[Path]], typer.Option(help="an image file (PNG/JPEG) to embed; repeat for "
                                                        "several (needs a VLM backbone)")] = None,
    role: Annotated[RoleName, typer.Option(help="query or document side of retrieval")] = RoleName.query,
    target: Target = "127.0.0.1:50051", token: Token = None, tls_ca: TlsCa = None, timeout: Timeout = 10.0,
):
    """Unit-norm embeddings of texts and images (one input each, in order: texts first)."""
    from genrec.v1 import embed_pb2

    if not text and not image:
        raise typer.BadParameter("give at least one --text or --image")
    inputs = [embed_pb2.EmbedInput(text=t) for t in text or []]
    inputs += [embed_pb2.EmbedInput(image=p.read_bytes()) for p in image or []]
    request = embed_pb2.EmbedRequest(inputs=inputs, role=embed_pb2.Role.Value(f"ROLE_{role.value.upper()}"))
    return _stubs(target, token, tls_ca).embed.Embed(request, timeout=timeout)


@query_app.command("info")
@_call
def info(target: Target = "127.0.0.1:50051", token: Token = None, tls_ca: TlsCa = None, timeout: Timeout = 10.0):
    """The served bundle (manifest, versions, limits)."""
    from genrec.v1 import info_pb2

    return _stubs(target, token, tls_ca).info.GetInfo(info_pb2.GetInfoRequest(), timeout=timeout)


@query_app.command("reload")
@_call
def reload(
    bundle: Annotated[Optional[str], typer.Option(help="bundle directory on the server; default: its current one")] = None,
    target: Target = "127.0.0.1:50051", token: Token = None, tls_ca: TlsCa = None, timeout: Timeout = 300.0,
):
    """Hot-swap the served bundle (loaded and warmed before the swap; no request fails)."""
    from genrec.v1 import info_pb2

    return _stubs(target, token, tls_ca).admin.Reload(info_pb2.ReloadRequest(bundle_path=bundle or ""),
                                                      timeout=timeout)
