"""The genrec.v1 servicers: validate against the current Engine, queue, wait, build the response. Thin on purpose:
errors are raised, not aborted, and server/interceptors.py maps them to status codes."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from importlib.metadata import PackageNotFoundError, version

import grpc

from genrec.server import validation
from genrec.server.batching import Done, MicroBatcher
from genrec.server.config import LimitsConfig, ServerConfig
from genrec.server.errors import PermissionDenied
from genrec.server.engine import Engine
from genrec.server.swap import EngineSlot
from genrec.v1 import (common_pb2, embed_pb2, embed_pb2_grpc, info_pb2, info_pb2_grpc, recommend_pb2,
                       recommend_pb2_grpc, search_pb2, search_pb2_grpc)

_NO_DEADLINE = 1e9  # grpc reports "no deadline" as a huge time_remaining


def _timeout(context: grpc.ServicerContext) -> float | None:
    left = context.time_remaining()
    return None if left is None or left > _NO_DEADLINE else left


def _metadata(done: Done, engine: Engine, t0: float) -> common_pb2.ResponseMetadata:
    timings = common_pb2.Timings(queue_ms=done.queue_s * 1e3, compute_ms=done.compute_s * 1e3,
                                 total_ms=(time.monotonic() - t0) * 1e3)
    return common_pb2.ResponseMetadata(timings=timings, batch_size=done.batch_size, bundle_id=engine.bundle_id,
                                       bundle_version=engine.version)


def _items(hits) -> list[common_pb2.ScoredItem]:
    return [common_pb2.ScoredItem(item_id=h.item_id, score=h.score, title=h.title) for h in hits]


def _submit(servicer, validate, request, context):
    """Validate against the engine serving now, then wait for the batch: (Done, engine, start time)."""
    t0, engine = time.monotonic(), servicer.slot.current
    query = validate(request, engine, servicer.limits)
    batcher = servicer.queue_of(query)
    return batcher.submit((engine, query), _timeout(context), context.add_callback), engine, t0


class RecommendServicer(recommend_pb2_grpc.RecommendServiceServicer):
    """Cheap calls (beam search up to cheap_beam_width) and expensive ones (VED, wider beams) wait in separate
    queues with a worker each: a storm of expensive calls cannot hold a cheap one behind its batches."""

    def __init__(self, slot: EngineSlot, batcher: MicroBatcher, heavy: MicroBatcher, config: ServerConfig):
        self.slot, self.batcher, self.heavy, self.limits = slot, batcher, heavy, config.limits
        self.cheap_beam_width = config.cheap_beam_width

    def queue_of(self, query) -> MicroBatcher:
        cheap = query.strategy == "beam" and query.beam_width <= self.cheap_beam_width
        return self.batcher if cheap else self.heavy

    def Recommend(self, request, context):
        done, engine, t0 = _submit(self, validation.recommend_query, request, context)
        return recommend_pb2.RecommendResponse(items=_items(done.result), metadata=_metadata(done, engine, t0))


class EmbedServicer(embed_pb2_grpc.EmbedServiceServicer):
    def __init__(self, slot: EngineSlot, batcher: MicroBatcher, limits: LimitsConfig):
        self.slot, self.batcher, self.limits = slot, batcher, limits

    def queue_of(self, query) -> MicroBatcher:
        return self.batcher

    def Embed(self, request, context):
        done, engine, t0 = _submit(self, validation.embed_query, request, context)
        vectors = done.result  # (N, D)
        return embed_pb2.EmbedResponse(embeddings=[embed_pb2.Embedding(values=v) for v in vectors.tolist()],
                                       dimension=engine.dim, metadata=_metadata(done, engine, t0))


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, slot: EngineSlot, batcher: MicroBatcher, limits: LimitsConfig):
        self.slot, self.batcher, self.limits = slot, batcher, limits

    def queue_of(self, query) -> MicroBatcher:
        return self.batcher

    def Search(self, request, context):
        done, engine, t0 = _submit(self, validation.search_query, request, context)
        return search_pb2.SearchResponse(items=_items(done.result), metadata=_metadata(done, engine, t0))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("genrec", "torch", "faiss-cpu", "faiss-gpu", "transformers", "numpy", "grpcio", "protobuf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def info_response(engine: Engine, config: ServerConfig) -> info_pb2.InfoResponse:
    limits = config.limits
    strategies = [recommend_pb2.DECODING_STRATEGY_BEAM] if engine.model is not None else []
    if engine.value_head is not None:
        strategies.append(recommend_pb2.DECODING_STRATEGY_VED)
    return info_pb2.InfoResponse(
        bundle_path=str(engine.path), bundle_id=engine.bundle_id, bundle_version=engine.version,
        manifest_json=json.dumps(json.loads(engine.manifest_bytes)), server_versions=_versions(),
        catalog_size=len(engine.catalog), embedding_dim=engine.dim, max_history=engine.max_history,
        max_k=min(limits.max_k, len(engine.catalog)), has_recommender=engine.model is not None,
        decoding_strategies=strategies, accepts_images=engine.embedder is not None and engine.embedder.accepts_images,
        loaded_at=engine.loaded_at, instance=f"{socket.gethostname()}:{os.getpid()}",
        max_beam_width=limits.max_beam_width, max_ved_budget=limits.max_ved_budget,
        max_history_items=limits.max_history_items, cheap_beam_width=config.cheap_beam_width)


class InfoServicer(info_pb2_grpc.InfoServiceServicer):
    def __init__(self, slot: EngineSlot, config: ServerConfig):
        self.slot, self.config = slot, config

    def GetInfo(self, request, context):
        return info_response(self.slot.current, self.config)


class AdminServicer(info_pb2_grpc.AdminServiceServicer):
    """Reload makes the server read a directory of its disk, so it needs the bearer token (or the operator's
    explicit --allow-unauthenticated-reload), and loads only under the reload root."""

    def __init__(self, slot: EngineSlot, config: ServerConfig):
        self.slot, self.config = slot, config
        self.allowed = config.auth_token is not None or config.allow_unauthenticated_reload
        self.root = config.reload_root or config.bundle.resolve().parent

    def Reload(self, request, context):
        if not self.allowed:
            raise PermissionDenied(
                "Reload is off: this server runs without a bearer token. Start it with GENREC_AUTH_TOKEN set and "
                "send the token, or with --allow-unauthenticated-reload on a network you trust (SIGHUP to the "
                "process reloads the served path)")
        path = validation.reload_path(request.bundle_path, self.root) if request.bundle_path else None
        return info_response(self.slot.reload(path), self.config)
