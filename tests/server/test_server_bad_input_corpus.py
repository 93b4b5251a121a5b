"""A corpus of hostile input against a real server: malformed wire bytes and invalid UTF-8 for every method,
out-of-range values in every field, and requests larger than any valid one. Every case is the caller's fault, so
every answer is INVALID_ARGUMENT (never INTERNAL) with a message that names the problem, and the server stays
healthy. The field-level messages themselves are checked case by case in test_server_validation.py."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genrec.v1 import embed_pb2 as E
from genrec.v1 import info_pb2 as I
from genrec.v1 import recommend_pb2 as R
from genrec.v1 import search_pb2 as S

from serverfixtures import LIMITS

pytest_plugins = ["serverfixtures"]

METHODS = {"/genrec.v1.RecommendService/Recommend": R.RecommendRequest,
           "/genrec.v1.EmbedService/Embed": E.EmbedRequest,
           "/genrec.v1.SearchService/Search": S.SearchRequest,
           "/genrec.v1.InfoService/GetInfo": I.GetInfoRequest,
           "/genrec.v1.AdminService/Reload": I.ReloadRequest}

# Bytes no protobuf parser accepts, whatever the message type.
MALFORMED = {
    "truncated tag": b"\xff",
    "varint of 11 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "truncated length-delimited": b"\x0a\x05ab",
    "tag without value": b"\x08",
    "length past the end": b"\x0a\xff\xff\xff\xff\x0f",
    "length of 2^64 - 1": b"\x0a" + b"\xff" * 9 + b"\x01",
    "truncated fixed32": b"\x0d\x01\x02",
    "truncated fixed64": b"\x09\x01\x02\x03",
    "wire type 7": b"\x0f",
    "unclosed group": b"\x0b",
    "unmatched end group": b"\x0c",
}

BAD_UTF8 = {"lone continuation": b"\x80", "truncated sequence": b"\xc3", "overlong": b"\xc0\xaf",
            "surrogate": b"\xed\xa0\x80", "beyond unicode": b"\xf8\x88\x80\x80\x80"}


def _len_field(number: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def _string_fields() -> dict[str, tuple[str, bytes]]:
    """Each string field of each request, holding `bad` (built on the wire: the Python API refuses invalid UTF-8)."""
    text = E.EmbedInput.DESCRIPTOR.fields_by_name["text"].number
    inputs = E.EmbedRequest.DESCRIPTOR.fields_by_name["inputs"].number
    return {
        "Search.text": ("/genrec.v1.SearchService/Search",
                        S.SearchRequest.DESCRIPTOR.fields_by_name["text"].number),
        "Embed.inputs[0].text": ("/genrec.v1.EmbedService/Embed", (inputs, text)),
        "Reload.bundle_path": ("/genrec.v1.AdminService/Reload",
                               I.ReloadRequest.DESCRIPTOR.fields_by_name["bundle_path"].number),
    }


def _utf8_cases():
    for field, (method, number) in _string_fields().items():
        for name, bad in BAD_UTF8.items():
            if isinstance(number, tuple):
                wire = _len_field(number[0], _len_field(number[1], b"ok" + bad))
            else:
                wire = _len_field(number, b"ok" + bad)
            yield f"{field} {name}", method, wire


def _oversized_cases():
    big_history = R.RecommendRequest(history=list(range(10**6, 10**6 + 3000)), k=5)
    big_embed = E.EmbedRequest(inputs=[E.EmbedInput(text="x" * 400)] * 60)
    big_search = S.SearchRequest(vector=S.Vector(values=[0.5] * 13000), k=3)
    big_reload = I.ReloadRequest(bundle_path="/b" * 6000)
    for name, method, request in (("Recommend", "/genrec.v1.RecommendService/Recommend", big_history),
                                  ("Embed", "/genrec.v1.EmbedService/Embed", big_embed),
                                  ("Search", "/genrec.v1.SearchService/Search", big_search),
                                  ("Reload", "/genrec.v1.AdminService/Reload", big_reload)):
        assert LIMITS.request_bytes(method.removeprefix("/genrec.v1.")) < request.ByteSize(), name
        yield f"{name} above its size limit", method, request.SerializeToString()


def _value_cases():
    """Out-of-range and inconsistent values in every field (messages that parse)."""
    beam, ved = R.DECODING_STRATEGY_BEAM, R.DECODING_STRATEGY_VED
    rec = "/genrec.v1.RecommendService/Recommend"
    cases = {
        "history id 0": (rec, R.RecommendRequest(history=[0], k=3)),
        "history negative id": (rec, R.RecommendRequest(history=[-1], k=3)),
        "history int64 max": (rec, R.RecommendRequest(history=[2**63 - 1], k=3)),
        "history int64 min": (rec, R.RecommendRequest(history=[-(2**63)], k=3)),
        "history one unknown among known": (rec, R.RecommendRequest(history=[1, 2, 10**9], k=3)),
        "history over the count limit": (rec, R.RecommendRequest(history=[1] * (LIMITS.max_history_items + 1),
                                                                 k=3)),
        "k zero": (rec, R.RecommendRequest(history=[1], k=0)),
        "k uint32 max": (rec, R.RecommendRequest(history=[1], k=2**32 - 1)),
        "beam width uint32 max": (rec, R.RecommendRequest(history=[1], k=3, decoding=R.Decoding(
            strategy=beam, beam_width=2**32 - 1))),
        "budget uint32 max": (rec, R.RecommendRequest(history=[1], k=3, decoding=R.Decoding(
            strategy=ved, budget=2**32 - 1))),
        "temperature nan": (rec, R.RecommendRequest(history=[1], k=3, decoding=R.Decoding(
            strategy=beam, temperature=float("nan")))),
        "temperature negative": (rec, R.RecommendRequest(history=[1], k=3, decoding=R.Decoding(
            strategy=beam, temperature=-1.0))),
        "strategy negative": (rec, R.RecommendRequest(history=[1], k=3, decoding=R.Decoding(strategy=-3))),
        "strategy unspecified with budget": (rec, R.RecommendRequest(history=[1], k=3, decoding=R.Decoding(
            budget=5))),
    }
    emb = "/genrec.v1.EmbedService/Embed"
    cases |= {
        "embed text of spaces and newlines": (emb, E.EmbedRequest(inputs=[E.EmbedInput(text=" \n\t ")])),
        "embed text over the character limit": (emb, E.EmbedRequest(inputs=[E.EmbedInput(
            text="é" * (LIMITS.max_text_chars + 1))])),
        "embed inputs over the count limit": (emb, E.EmbedRequest(inputs=[E.EmbedInput(text="a")] *
                                                                   (LIMITS.max_inputs + 1))),
        "embed role negative": (emb, E.EmbedRequest(inputs=[E.EmbedInput(text="a")], role=-1)),
        "embed empty middle input": (emb, E.EmbedRequest(inputs=[E.EmbedInput(text="a"), E.EmbedInput(),
                                                                 E.EmbedInput(text="b")])),
        "embed image on a text model": (emb, E.EmbedRequest(inputs=[E.EmbedInput(image=b"GIF89a")])),
        "embed image over the byte limit": (emb, E.EmbedRequest(inputs=[E.EmbedInput(
            image=b"\x89PNG" + b"0" * LIMITS.max_image_bytes)])),
    }
    srch = "/genrec.v1.SearchService/Search"
    cases |= {
        "search k above the limit": (srch, S.SearchRequest(text="soap", k=LIMITS.max_k + 1)),
        "search k uint32 max": (srch, S.SearchRequest(text="soap", k=2**32 - 1)),
        "search blank text": (srch, S.SearchRequest(text="   ", k=3)),
        "search text over the character limit": (srch, S.SearchRequest(text="x" * (LIMITS.max_text_chars + 1),
                                                                        k=3)),
        "search empty vector": (srch, S.SearchRequest(vector=S.Vector(), k=3)),
        "search vector one short": (srch, S.SearchRequest(vector=S.Vector(values=[0.1] * 383), k=3)),
        "search vector one long": (srch, S.SearchRequest(vector=S.Vector(values=[0.1] * 385), k=3)),
        "search vector -inf": (srch, S.SearchRequest(vector=S.Vector(values=[float("-inf")] + [0.1] * 383), k=3)),
        "search k zero": (srch, S.SearchRequest(text="soap", k=0)),
        "search image over the byte limit": (srch, S.SearchRequest(image=b"\x89PNG" + b"0" * LIMITS.max_image_bytes,
                                                                    k=3)),
    }
    for name, (method, request) in cases.items():
        yield name, method, request.SerializeToString()


CASES = [
    *((f"{method.rsplit('/', 1)[1]} {name}", method, wire)
      for method in METHODS for name, wire in MALFORMED.items()),
    *_utf8_cases(),
    *_oversized_cases(),
    *_value_cases(),
]


def test_the_corpus_is_large_and_covers_every_method():
    assert len(CASES) >= 100
    assert {method for _, method, _ in CASES} == set(METHODS)


@pytest.mark.parametrize("name,method,wire", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_the_callers_fault(shared_server, name, method, wire):
    call = shared_server.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(wire, timeout=30)
    # Reload answers PERMISSION_DENIED to parsable requests: this server has neither a token nor the flag.
    allowed = {grpc.StatusCode.INVALID_ARGUMENT} | (
        {grpc.StatusCode.PERMISSION_DENIED} if method.endswith("Reload") else set())
    if "size limit" in name:  # above every method's limit gRPC refuses it while receiving, as RESOURCE_EXHAUSTED
        allowed.add(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert e.value.code() in allowed, (e.value.code(), e.value.details())
    assert len(e.value.details()) > 20 and "internal error" not in e.value.details()


def test_the_server_is_healthy_after_the_corpus(shared_server):
    status = health_pb2_grpc.HealthStub(shared_server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert shared_server.metric("genrec_requests_total", method="RecommendService/Recommend", code="INTERNAL") == 0
    assert shared_server.stubs.info.GetInfo(I.GetInfoRequest(), timeout=10).catalog_size > 0
