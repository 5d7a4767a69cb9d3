"""Property-based fuzz of the KV wire format (issue 14): whatever bytes a peer sends, the frame
reader answers with a Frame or a TransferError/PeerClosed, never another exception; and a real
receiver fed arbitrary frames on its KV port stays up, keeps its cache untouched and completes
the next real transfer."""

from __future__ import annotations

import json
import socket
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from splitserve.kvtransfer import TransferError, create_receiver, create_sender
from splitserve.kvtransfer import sender as sender_module
from splitserve.kvtransfer.wire import (
    HEADER,
    MAGIC,
    VERSION,
    FrameType,
    PeerClosed,
    parse_end,
    recv_frame,
)
from test_kvtransfer_contract import layers, make_cache, make_spec

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def header(ftype: int, meta_len: int, payload_len: int, index: int = 0, magic: bytes = MAGIC,
           version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, ftype, index, meta_len, payload_len)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A frame that is wrong in some way: random bytes, a bad header, deep or odd JSON, a type
    out of range, lengths that lie."""
    kind = draw(st.sampled_from(["raw", "header", "json", "deep"]))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    ftype = draw(st.integers(0, 255))
    if kind == "header":
        return header(ftype, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**64 - 1)),
                      draw(st.integers(0, 0xFFFF)), draw(st.binary(min_size=4, max_size=4)),
                      draw(st.integers(0, 255)))
    if kind == "deep":  # nesting beyond the JSON parser's recursion limit
        body = b"[" * draw(st.integers(1_000, 100_000))
    else:
        body = json.dumps(draw(json_values)).encode()
    return header(ftype, len(body), draw(st.integers(0, 64))) + body


def read_one(data: bytes) -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        b.settimeout(2)
        recv_frame(b)
    finally:
        a.close()
        b.close()


@FUZZ
@given(data=frames())
def test_frame_reader_refuses_anything_malformed_cleanly(data: bytes) -> None:
    try:
        read_one(data)
    except (TransferError, PeerClosed):
        pass  # refused with a reason: what the connection handlers expect


def test_deeply_nested_metadata_is_a_protocol_error() -> None:
    body = b"[" * 200_000
    with pytest.raises(TransferError) as info:
        read_one(struct.pack("!4sBBHIQ", MAGIC, VERSION, int(FrameType.HELLO), 0, len(body), 0) + body)
    assert info.value.reason == "protocol_error"


entries = st.fixed_dictionaries({"token_id": json_values, "logprob": json_values, "top": json_values})


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["first_token", "logprobs", "x"]), json_values | entries, max_size=3))
def test_end_parser_refuses_malformed_first_tokens_and_logprobs_cleanly(meta: dict) -> None:
    try:
        first = parse_end(meta)
    except TransferError as err:
        assert err.reason == "protocol_error"
        return
    assert isinstance(first.token_id, int) and (first.logprobs is None or isinstance(first.logprobs, dict))


@pytest.mark.parametrize("logprobs", [{"token_id": 1, "logprob": -1.0, "top": [[1, "x"]]}, [1, -1.0], "none"])
def test_an_end_with_malformed_logprobs_fails_the_transfer_on_both_sides(rx, monkeypatch, logprobs) -> None:
    spec, receiver = rx
    monkeypatch.setattr(sender_module, "end_meta", lambda first: {"first_token": 5, "logprobs": logprobs})
    fut = receiver.expect("bad-end", 8, [2, 3], timeout=20)
    with create_sender("tcp", spec) as tx, pytest.raises(TransferError) as info:
        tx.send("bad-end", receiver.endpoint, layers(spec, 8, seed=4), 5)
    assert info.value.reason == "protocol_error"
    with pytest.raises(TransferError) as info:
        fut.result(timeout=5)
    assert info.value.reason == "protocol_error" and "logprobs" in str(info.value)


@pytest.fixture(scope="module")
def rx():
    spec = make_spec("tcp")
    receiver = create_receiver("tcp", spec, make_cache(spec), host="127.0.0.1", port=0)
    yield spec, receiver
    receiver.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(frames(), min_size=1, max_size=3))
def test_receiver_survives_arbitrary_frames_and_still_serves(rx, data: list[bytes]) -> None:
    spec, receiver = rx
    host, port = receiver.endpoint.rsplit(":", 1)
    before = receiver.kv_cache.clone()
    with socket.create_connection((host, int(port)), timeout=2) as s:
        try:
            for chunk in data:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
        except OSError:
            pass  # the receiver may close on us: that is a refusal
    assert torch.equal(receiver.kv_cache, before)


def test_receiver_completes_a_real_transfer_after_the_fuzz(rx) -> None:
    spec, receiver = rx
    fut = receiver.expect("after-fuzz", 8, [0, 1], timeout=20)
    with create_sender("tcp", spec) as tx:
        assert tx.send("after-fuzz", receiver.endpoint, layers(spec, 8, seed=3), 5).first_token == 5
    assert fut.result(timeout=5).first_token == 5
