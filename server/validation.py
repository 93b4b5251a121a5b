"""Validation at the boundary: protobuf requests -> typed queries, or InvalidRequest saying what to change.

Everything a batch computes has passed through here, so the model code below can assume well-formed input.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from genrec.models.embedder import EmbedInput
from genrec.server.config import LimitsConfig
from genrec.server.engine import EmbedQuery, Engine, RecommendQuery, Role, SearchQuery
from genrec.server.errors import InvalidRequest, NotServed, PermissionDenied
from genrec.v1 import embed_pb2, recommend_pb2, search_pb2

_BEAM = recommend_pb2.DECODING_STRATEGY_BEAM
_VED = recommend_pb2.DECODING_STRATEGY_VED
_SERVED_STRATEGIES = (recommend_pb2.DECODING_STRATEGY_UNSPECIFIED, _BEAM, _VED)
_ROLES: dict[int, Role] = {embed_pb2.ROLE_UNSPECIFIED: "query", embed_pb2.ROLE_QUERY: "query",
                           embed_pb2.ROLE_DOCUMENT: "document"}


def _k(k: int, engine: Engine, limits: LimitsConfig) -> int:
    top = min(limits.max_k, len(engine.catalog))
    if not 1 <= k <= top:
        raise InvalidRequest(f"k={k} is out of range: ask for 1 to {top} items")
    return k


def _strategy_name(value: int) -> str:
    try:
        return recommend_pb2.DecodingStrategy.Name(value)
    except ValueError:
        return str(value)


def recommend_query(req: recommend_pb2.RecommendRequest, engine: Engine, limits: LimitsConfig) -> RecommendQuery:
    if engine.model is None:
        raise NotServed(f"bundle {engine.path} has no recommender: run `genrec train sft --bundle {engine.path} "
                        "--data DATASET` and reload, or use Search/Embed")
    history = list(req.history)
    if not history:
        raise InvalidRequest("history is empty: send at least one item id the user interacted with, most recent last")
    if len(history) > limits.max_history_items:
        raise InvalidRequest(f"history has {len(history)} items; send at most the {limits.max_history_items} most "
                             f"recent (the model reads the last {engine.max_history})")
    try:
        rows = engine.catalog.rows(history)
    except KeyError as e:
        unknown = e.args[0].removeprefix("unknown item ids: ")
        raise InvalidRequest(f"history holds item ids that are not in the served catalog: {unknown}; send ids "
                             f"from the catalog of bundle {engine.bundle_id} ({len(engine.catalog)} items)") from None
    k = _k(req.k, engine, limits)

    d = req.decoding
    strategy = d.strategy
    if strategy not in _SERVED_STRATEGIES:
        known = strategy in recommend_pb2.DecodingStrategy.values()
        raise InvalidRequest(f"decoding strategy {_strategy_name(strategy)} is "
                             f"{'not served yet' if known else 'unknown'}: use DECODING_STRATEGY_BEAM or "
                             "DECODING_STRATEGY_VED")
    if d.temperature:
        raise InvalidRequest("decoding.temperature applies to DECODING_STRATEGY_SAMPLE: leave it 0")
    if d.beam_width > limits.max_beam_width:
        raise InvalidRequest(f"decoding.beam_width={d.beam_width} is above the limit {limits.max_beam_width}: "
                             "use a narrower beam")
    if strategy == _VED:
        if engine.value_head is None:
            raise InvalidRequest(f"DECODING_STRATEGY_VED needs a value head, and bundle {engine.bundle_id} has none: "
                                 "run `genrec train value` on the bundle and reload, or use DECODING_STRATEGY_BEAM")
        beam_width = d.beam_width or engine.default_beam_width
        budget = d.budget or engine.beam_budget(beam_width)
        if budget > limits.max_ved_budget:
            raise InvalidRequest(f"decoding.budget={budget} is above the limit {limits.max_ved_budget}: "
                                 "use a smaller budget")
        return RecommendQuery(history=rows[-engine.max_history:], seen=rows, k=k, beam_width=beam_width,
                              exclude_seen=req.exclude_seen, strategy="ved", budget=budget)
    if d.budget:
        raise InvalidRequest("decoding.budget applies to DECODING_STRATEGY_VED: for beam search leave it 0 and "
                             "set decoding.beam_width")
    beam_width = d.beam_width or max(k, engine.default_beam_width)
    if beam_width < k:
        raise InvalidRequest(f"decoding.beam_width={beam_width} is smaller than k={k}: use a beam at least as wide "
                             "as k, or 0 for the server default")
    return RecommendQuery(history=rows[-engine.max_history:], seen=rows, k=k, beam_width=beam_width,
                          exclude_seen=req.exclude_seen)


def _text(text: str, where: str, limits: LimitsConfig) -> str:
    if len(text) > limits.max_text_chars:
        raise InvalidRequest(f"{where} has {len(text)} characters; the limit is {limits.max_text_chars}: "
                             "shorten it")
    if not text.strip():
        raise InvalidRequest(f"{where} is blank: give it some text")
    return text


def _image(image: bytes, where: str, engine: Engine, limits: LimitsConfig) -> None:
    """Size first (it applies to every backbone), then whether this backbone reads images at all."""
    if len(image) > limits.max_image_bytes:
        raise InvalidRequest(f"{where} has {len(image)} bytes; the limit is {limits.max_image_bytes}: downscale "
                             "or recompress it")
    if not engine.embedder.accepts_images:
        raise InvalidRequest(f"{where} is an image, but this bundle's embedder backbone "
                             f"({engine.embedder.cfg.backbone}) is text-only and does not accept images: send "
                             "text, or serve a bundle with a VLM backbone")


def _embeddable(inputs: list[EmbedInput], role: Role, labels: list[str], engine: Engine) -> None:
    """What only the embedder can tell (tokens over its limit, an image it cannot decode), before any batching."""
    try:
        engine.embedder.check(inputs, role, labels)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def _needs_embedder(engine: Engine, what: str) -> None:
    if engine.embedder is None:
        source = engine.bundle.manifest.get("embedder", {}).get("vectors")
        why = (f"its item vectors were precomputed ({source}) by a model this server does not have" if source else
               "it was built from a catalog without titles or texts: its item vectors come from behaviour")
        raise NotServed(f"{what} needs the embedder, and this bundle has none: {why}. Search it by vector (e.g. an "
                        "item's vector) or ask Recommend")


def embed_query(req: embed_pb2.EmbedRequest, engine: Engine, limits: LimitsConfig) -> EmbedQuery:
    _needs_embedder(engine, "Embed")
    if not req.inputs:
        raise InvalidRequest("inputs is empty: send at least one text to embed")
    if len(req.inputs) > limits.max_inputs:
        raise InvalidRequest(f"inputs has {len(req.inputs)} entries; send at most {limits.max_inputs} per request")
    if req.role not in _ROLES:
        raise InvalidRequest(f"role {req.role} is unknown: use ROLE_QUERY or ROLE_DOCUMENT")
    inputs = []
    for i, item in enumerate(req.inputs):
        if item.image:  # an image may come alone or with a text (then that text must say something)
            _image(item.image, f"inputs[{i}].image", engine, limits)
        elif not item.text:
            raise InvalidRequest(f"inputs[{i}] is empty: give it a text" +
                                 (" or an image" if engine.embedder.accepts_images else ""))
        if item.text:
            _text(item.text, f"inputs[{i}].text", limits)
        inputs.append(EmbedInput(item.text, item.image or None))
    _embeddable(inputs, _ROLES[req.role], [f"inputs[{i}]" for i in range(len(inputs))], engine)
    return EmbedQuery(tuple(inputs), _ROLES[req.role])


def search_query(req: search_pb2.SearchRequest, engine: Engine, limits: LimitsConfig) -> SearchQuery:
    kind = req.WhichOneof("query")
    k = _k(req.k, engine, limits)
    if kind is None:
        raise InvalidRequest("the query is empty: set one of text, image or vector")
    if kind in ("text", "image"):
        _needs_embedder(engine, f"Search by {kind}")
    if kind == "text":
        _embeddable([EmbedInput(_text(req.text, "text", limits))], "query", ["text"], engine)
        return SearchQuery(k=k, text=req.text)
    if kind == "image":
        _image(req.image, "image", engine, limits)
        _embeddable([EmbedInput(image=req.image)], "query", ["image"], engine)
        return SearchQuery(k=k, image=req.image)
    values = req.vector.values
    if len(values) != engine.dim:
        raise InvalidRequest(f"vector has {len(values)} values; this bundle's item vectors have {engine.dim} "
                             "dimensions (InfoResponse.embedding_dim)")
    vector = np.asarray(values, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(vector))
    if len(bad):
        raise InvalidRequest(f"vector[{bad[0]}] is {vector[bad[0]]}: every value must be a finite number "
                             f"({len(bad)} are not)")
    if not math.isfinite(float(np.dot(vector, vector))) or not vector.any():
        raise InvalidRequest("vector is all zeros or too large to score: send a direction, e.g. a unit vector")
    return SearchQuery(k=k, vector=vector)


def reload_path(text: str, root: Path) -> Path:
    """The bundle directory a Reload names, resolved, checked to lie under `root` (symlinks followed)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidRequest(f"bundle_path {text!r} holds control characters: give a plain directory path")
    encoded = os.fsencode(text)
    if len(encoded) > 4096 or any(len(part) > 255 for part in encoded.split(b"/")):
        raise InvalidRequest(f"bundle_path is too long ({len(encoded)} bytes; at most 4096, and 255 per name)")
    path, top = Path(text).resolve(), root.resolve()
    if not path.is_relative_to(top):
        raise PermissionDenied(f"bundle_path {text!r} is outside the reload root {str(top)!r}: Reload serves only "
                               "bundles under it (the server's --reload-root)")
    return path
