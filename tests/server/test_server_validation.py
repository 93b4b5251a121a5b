"""Bad input at the boundary: INVALID_ARGUMENT with a message that names the problem and what to change."""

from __future__ import annotations

import grpc
import pytest

from genrec.v1 import embed_pb2, recommend_pb2, search_pb2
from genrec.v1.info_pb2 import GetInfoRequest as InfoRequest

from serverfixtures import LIMITS

pytest_plugins = ["serverfixtures"]

R, E, S = recommend_pb2, embed_pb2, search_pb2


def _call(running, request):
    stub = {R.RecommendRequest: running.stubs.recommend.Recommend, E.EmbedRequest: running.stubs.embed.Embed,
            S.SearchRequest: running.stubs.search.Search}[type(request)]
    return stub(request, timeout=30)


def _beam(**kw):
    return R.Decoding(strategy=R.DECODING_STRATEGY_BEAM, **kw)


# (request, fragments the message must contain); item ids 1..3 exist in every synthetic catalog.
BAD = {
    "empty history": (R.RecommendRequest(k=5), ["history is empty", "at least one item id"]),
    "unknown ids": (R.RecommendRequest(history=[1, 987654321, 2, 123456789], k=5),
                    ["not in the served catalog", "987654321", "123456789"]),
    "k zero": (R.RecommendRequest(history=[1], k=0), ["k=0 is out of range", "1 to 50"]),
    "k too large": (R.RecommendRequest(history=[1], k=51), ["k=51 is out of range", "1 to 50"]),
    "history too long": (R.RecommendRequest(history=[1] * (LIMITS.max_history_items + 1), k=5),
                         ["201 items", "at most the 200 most recent"]),
    "beam narrower than k": (R.RecommendRequest(history=[1], k=10, decoding=_beam(beam_width=4)),
                             ["beam_width=4 is smaller than k=10"]),
    "beam too wide": (R.RecommendRequest(history=[1], k=10, decoding=_beam(beam_width=65)),
                      ["beam_width=65 is above the limit 64"]),
    "ved budget above the limit": (R.RecommendRequest(history=[1], k=5, decoding=R.Decoding(
        strategy=R.DECODING_STRATEGY_VED, budget=LIMITS.max_ved_budget + 1)),
        [f"decoding.budget={LIMITS.max_ved_budget + 1} is above the limit {LIMITS.max_ved_budget}"]),
    "ved with temperature": (R.RecommendRequest(history=[1], k=5, decoding=R.Decoding(
        strategy=R.DECODING_STRATEGY_VED, temperature=0.5)), ["temperature applies to DECODING_STRATEGY_SAMPLE"]),
    "sample not served": (R.RecommendRequest(history=[1], k=5,
                                             decoding=R.Decoding(strategy=R.DECODING_STRATEGY_SAMPLE)),
                          ["DECODING_STRATEGY_SAMPLE is not served yet"]),
    "unknown strategy": (R.RecommendRequest(history=[1], k=5, decoding=R.Decoding(strategy=42)),
                         ["decoding strategy 42 is unknown"]),
    "budget with beam": (R.RecommendRequest(history=[1], k=5, decoding=_beam(budget=30)),
                         ["budget applies to DECODING_STRATEGY_VED"]),
    "no inputs": (E.EmbedRequest(), ["inputs is empty"]),
    "too many inputs": (E.EmbedRequest(inputs=[E.EmbedInput(text="a")] * 9), ["9 entries", "at most 8"]),
    "blank text": (E.EmbedRequest(inputs=[E.EmbedInput(text="ok"), E.EmbedInput(text="   ")]),
                   ["inputs[1].text is blank"]),
    "text too long": (E.EmbedRequest(inputs=[E.EmbedInput(text="x" * 513)]),
                      ["inputs[0].text has 513 characters", "limit is 512", "shorten"]),
    "text over the token limit": (E.EmbedRequest(inputs=[E.EmbedInput(text="ok"), E.EmbedInput(text="a b " * 100)]),
                                  ["inputs[1]: the text is 200 tokens", "over the limit of 62", "shorten it"]),
    "empty input": (E.EmbedRequest(inputs=[E.EmbedInput(text="ok"), E.EmbedInput()]),
                    ["inputs[1] is empty: give it a text"]),
    "image too large": (E.EmbedRequest(inputs=[E.EmbedInput(image=b"\x89PNG" + b"0" * 3000)]),
                        ["inputs[0].image has 3004 bytes", "limit is 2048"]),
    "image on a text backbone": (E.EmbedRequest(inputs=[E.EmbedInput(text="a", image=b"\x89PNG....")]),
                                 ["backbone (minilm) is text-only", "does not accept images"]),
    "unknown role": (E.EmbedRequest(inputs=[E.EmbedInput(text="a")], role=9), ["role 9 is unknown"]),
    "empty query": (S.SearchRequest(k=3), ["set one of text, image or vector"]),
    "search k zero": (S.SearchRequest(text="soap"), ["k=0 is out of range"]),
    "search text over the token limit": (S.SearchRequest(text="a b " * 100, k=3),
                                         ["text: the text is 200 tokens", "over the limit of 62"]),
    "search image": (S.SearchRequest(image=b"\xff\xd8\xff", k=3), ["text-only and does not accept images"]),
    "search image too large": (S.SearchRequest(image=b"0" * 4096, k=3), ["image has 4096 bytes"]),
    "wrong dimension": (S.SearchRequest(vector=S.Vector(values=[0.1] * 10), k=3),
                        ["vector has 10 values", "have 384 dimensions"]),
    "nan in vector": (S.SearchRequest(vector=S.Vector(values=[0.1] * 5 + [float("nan")] + [0.1] * 378), k=3),
                      ["vector[5] is nan", "finite"]),
    "inf in vector": (S.SearchRequest(vector=S.Vector(values=[float("inf")] + [0.0] * 383), k=3),
                      ["vector[0] is inf"]),
    "zero vector": (S.SearchRequest(vector=S.Vector(values=[0.0] * 384), k=3), ["all zeros"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument_with_a_useful_message(shared_server, case):
    request, fragments = BAD[case]
    with pytest.raises(grpc.RpcError) as e:
        _call(shared_server, request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    for fragment in fragments:
        assert fragment in e.value.details(), (fragment, e.value.details())


def test_bad_requests_are_never_queued(shared_server):
    """Validation runs before the queue: nothing invalid reaches a batch."""
    before = {q: shared_server.metric("genrec_batch_size_sum", queue=q) for q in ("recommend", "embed", "search")}
    for request, _ in BAD.values():
        with pytest.raises(grpc.RpcError):
            _call(shared_server, request)
    after = {q: shared_server.metric("genrec_batch_size_sum", queue=q) for q in before}
    assert after == before


def test_message_size_limit(shared_server):
    """Beyond max_message_bytes gRPC itself refuses the message (RESOURCE_EXHAUSTED) before any handler runs."""
    huge = E.EmbedRequest(inputs=[E.EmbedInput(text="x" * (LIMITS.max_message_bytes + 10))])
    with pytest.raises(grpc.RpcError) as e:
        _call(shared_server, huge)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.value.details()


def test_a_request_larger_than_any_valid_one_is_refused_before_parsing(shared_server):
    """Requests beyond what the limits allow are refused by their size, never parsed (before, a 14 MB Recommend
    was parsed into a list of ints first and raised server memory by 441 MB)."""
    limit = LIMITS.request_bytes("RecommendService/Recommend")
    assert limit < 11 * LIMITS.max_history_items + 8192
    # Above Recommend's own limit: refused by the server's size check.
    big = R.RecommendRequest(history=list(range(1, 5000)), k=5)
    assert limit < big.ByteSize() < LIMITS.request_bytes("EmbedService/Embed")
    with pytest.raises(grpc.RpcError) as e:
        _call(shared_server, big)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RecommendService/Recommend request is" in e.value.details() and f"{limit:,}" in e.value.details()
    # Above every method's limit: gRPC refuses it while receiving, before any buffer of that size is parsed.
    huge = R.RecommendRequest(history=list(range(1, 250_000)), k=5)
    with pytest.raises(grpc.RpcError) as e:
        _call(shared_server, huge)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The largest valid request still passes the size check (and is then judged on its content).
    largest = R.RecommendRequest(history=[2**62] * LIMITS.max_history_items, k=5)
    assert largest.ByteSize() <= limit
    with pytest.raises(grpc.RpcError) as e:
        _call(shared_server, largest)
    assert "not in the served catalog" in e.value.details()


@pytest.mark.parametrize("method", ["/genrec.v1.RecommendService/Recommend", "/genrec.v1.EmbedService/Embed",
                                    "/genrec.v1.SearchService/Search", "/genrec.v1.InfoService/GetInfo"])
@pytest.mark.parametrize("wire", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08"], ids=["bad-tag", "truncated", "no-value"])
def test_malformed_bytes_are_the_callers_fault(shared_server, method, wire):
    """Bad tags and truncated fields: INVALID_ARGUMENT naming the method (gRPC's default is INTERNAL: Exception
    deserializing request!), and the server stays healthy."""
    call = shared_server.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(wire, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert method.removeprefix("/genrec.v1.") in e.value.details() and "not a valid protobuf" in e.value.details()
    assert shared_server.stubs.info.GetInfo(InfoRequest(), timeout=30).catalog_size > 0


def test_invalid_utf8_in_a_string_field_is_the_callers_fault(shared_server):
    text_field = S.SearchRequest.DESCRIPTOR.fields_by_name["text"].number
    wire = bytes([text_field << 3 | 2, 2, 0xC3, 0x28])  # a length-delimited field holding invalid UTF-8
    call = shared_server.channel.unary_unary("/genrec.v1.SearchService/Search", request_serializer=None,
                                             response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(wire, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in e.value.details()
