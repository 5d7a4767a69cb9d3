"""The worker protocol's messages: each reads back what it writes, the hand-written token line is
the JSON a general encoder gives, and a message that is not one is refused (naming the field)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from splitserve.protocol import (
    ErrorReply,
    GenerateRequest,
    Health,
    InvalidMessage,
    LoadReport,
    PrefillRequest,
    PrefillResult,
    SamplingParams,
    TokenLine,
)

SAMPLING = SamplingParams(max_tokens=8, temperature=0.5, seed=3, stop=("\n",), logprobs=2)


@given(
    st.lists(st.integers(0, 2**31), max_size=4),
    st.sampled_from([None, "stop", "length", "error", 'we"ird']),
    st.one_of(st.none(), st.text(max_size=8)),
)
def test_a_token_line_reads_back_as_written(ids, finish, stop):
    line = TokenLine(ids, finish, stop)
    raw = line.encode()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert json.loads(raw) == line.to_json()
    back = TokenLine.from_json(json.loads(raw))
    assert (back.token_ids, back.finish_reason, back.stop_string) == (ids, finish, stop)


def test_a_token_line_carries_logprobs_and_errors():
    entry = {"token_id": 5, "logprob": -0.5, "top": [[5, -0.5]]}
    back = TokenLine.from_json(json.loads(TokenLine([5], None, None, [entry]).encode()))
    assert back.logprobs == [entry] and not back.failed
    failure = TokenLine.from_json(json.loads(TokenLine.failure("KV never arrived").encode()))
    assert failure.failed and failure.error == "KV never arrived" and failure.token_ids == []
    with pytest.raises(ValueError, match="JSON object"):
        TokenLine.from_json([1, 2])


def test_requests_read_back_as_written():
    gen = GenerateRequest("r1", [1, 2, 3], SAMPLING, recompute=True)
    assert GenerateRequest.from_json(json.loads(json.dumps(gen.to_json()))) == gen
    pre = PrefillRequest("r1", [1, 2, 3], SAMPLING, "127.0.0.1:9000")
    assert PrefillRequest.from_json(json.loads(json.dumps(pre.to_json()))) == pre


@pytest.mark.parametrize("body, field, knows_id", [
    ({"token_ids": [1]}, "request_id", False),
    ({"request_id": "r", "token_ids": []}, "token_ids", False),
    ({"request_id": "r", "token_ids": [1, True]}, "token_ids", False),
    ({"request_id": "r", "token_ids": [1], "sampling": {"top_k": 0}}, "top_k", True),
    ({"request_id": "r", "token_ids": [1], "sampling": {"max_tokens": True}}, "max_tokens", True),
    ({"request_id": "r", "token_ids": [1], "sampling": {"nope": 1}}, "nope", True),
    ({"request_id": "r", "token_ids": [1], "recompute": "yes"}, "recompute", True),
])
def test_a_bad_request_is_refused_naming_the_field(body, field, knows_id):
    with pytest.raises(InvalidMessage, match=field) as info:
        GenerateRequest.from_json(body)
    assert info.value.request_id == ("r" if knows_id else None)


def test_a_prefill_request_needs_the_decode_workers_kv_endpoint():
    with pytest.raises(InvalidMessage, match="decode_kv_endpoint"):
        PrefillRequest.from_json({"request_id": "r", "token_ids": [1]})


def test_results_reports_and_health_read_back():
    result = PrefillResult("r", 7, 3, 1, 2.5, 0.5)
    assert PrefillResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    older = result.to_json() | {"first_logprobs": {"token_id": 7, "logprob": -1.0, "top": []}}
    assert PrefillResult.from_json(older) == result  # an older prefill's reply: END has them now
    with pytest.raises(ValueError, match="first_token"):
        PrefillResult.from_json({"request_id": "r", "num_prompt_tokens": 3})
    load = LoadReport(1, 2, 30, 40, 50, 16, 1024, True, "decode")
    assert LoadReport.from_json(json.loads(json.dumps(load.to_json()))) == load
    health = Health("decode", "m", "127.0.0.1:9", "abc")
    assert Health.from_json(health.to_json()) == health
    assert health.announcement("http://w")["url"] == "http://w"


@pytest.mark.parametrize("raw, message, reason", [
    (b'{"error": "no room", "reason": "no_space"}', "no room", "no_space"),
    (b'{"error": {"message": "bad", "type": "x"}}', "bad", None),
    (b"plain text", "plain text", None),
    (b"", "HTTP 502", None),
])
def test_an_error_reply_is_read_from_any_body(raw, message, reason):
    reply = ErrorReply.parse(raw, 502)
    assert (reply.message, reply.reason) == (message, reason)
    assert ErrorReply.parse(json.dumps(ErrorReply("x", "y").to_json()).encode(), 400) == ErrorReply("x", "y")
