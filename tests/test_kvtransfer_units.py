"""Unit tests of the pieces under the KV transfer contract: spec, registry, wire, layout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from splitserve.kvtransfer import (
    FailureReason,
    KVSpec,
    TransferError,
    create_receiver,
    create_sender,
    register_backend,
)
from splitserve.kvtransfer.layout import (
    PagedWriter,
    gather_layer,
    iter_cache_layers,
    scatter_layer,
    token_slots,
)
from splitserve.kvtransfer.wire import (
    HEADER,
    FrameType,
    PeerClosed,
    error_from_meta,
    parse_endpoint,
    recv_frame,
    recv_into_views,
    send_frame,
)

pytestmark = pytest.mark.timeout(30)


def spec(**kw) -> KVSpec:
    fields = dict(model_fingerprint="m", dtype="float32", num_layers=2, num_kv_heads=2,
                  head_dim=4, block_size=4, backend="tcp")
    fields.update(kw)
    return KVSpec(**fields)


@pytest.mark.parametrize("field,value", [
    ("dtype", "int8"), ("num_layers", 0), ("head_dim", 2.0), ("block_size", True),
    ("model_fingerprint", ""), ("backend", ""),
])
def test_spec_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        spec(**{field: value})


def test_spec_accepts_torch_dtype_and_round_trips():
    s = spec(dtype=torch.bfloat16)
    assert s.dtype == "bfloat16" and s.element_size == 2
    assert KVSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown KVSpec field"):
        KVSpec.from_dict({**s.to_dict(), "extra": 1})
    assert s.layer_nbytes(3) == 2 * 3 * 2 * 4 * 2


def test_check_compatible_names_every_differing_field_and_ignores_block_size():
    spec().check_compatible(spec(block_size=16))
    with pytest.raises(TransferError) as info:
        spec().check_compatible(spec(num_layers=3, head_dim=8, block_size=32))
    assert info.value.reason == FailureReason.HANDSHAKE_MISMATCH == "handshake_mismatch"
    assert info.value.field == "num_layers,head_dim"
    assert "num_layers: 2 != 3" in str(info.value) and "block_size" not in str(info.value)


def test_registry_refuses_duplicates_unknown_names_and_wrong_spec_backend():
    with pytest.raises(ValueError, match="already registered"):
        register_backend("tcp", "x", "A", "B")
    with pytest.raises(ValueError, match="unknown KV transfer backend"):
        create_sender("carrier-pigeon", spec(backend="carrier-pigeon"))
    with pytest.raises(ValueError, match="backend"):
        create_sender("shm", spec(backend="tcp"))


def test_receiver_validates_cache_and_expect_arguments():
    s = spec()
    with pytest.raises(ValueError, match="shape"):
        create_receiver("tcp", s, torch.zeros(2, 2, 8, 8, 2, 4))
    with pytest.raises(ValueError, match="dtype"):
        create_receiver("tcp", s, torch.zeros(2, 2, 8, 4, 2, 4, dtype=torch.float16))
    with create_receiver("tcp", s, torch.zeros(2, 2, 8, 4, 2, 4)) as rx:
        host, port = parse_endpoint(rx.endpoint)
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(ValueError, match="blocks"):
            rx.expect("r", 9, [0, 1])
        with pytest.raises(ValueError, match=r"\[0, 8\)"):
            rx.expect("r", 4, [8])
        rx.expect("r", 4, [0])
        with pytest.raises(ValueError, match="already expected"):
            rx.expect("r", 4, [1])


def test_layout_round_trip_between_block_sizes_in_bfloat16():
    src = torch.randn(2, 2, 6, 8, 2, 4).to(torch.bfloat16)  # block size 8, 6 blocks
    dst = torch.zeros(2, 2, 10, 4, 2, 4, dtype=torch.bfloat16)  # block size 4, 10 blocks
    src_slots = token_slots([5, 0], 11, 8, 6)
    dst_slots = token_slots([9, 1, 4], 11, 4, 10)
    assert dst_slots.tolist()[:5] == [36, 37, 38, 39, 4]
    for layer in range(2):
        scatter_layer(dst, layer, dst_slots, gather_layer(src, layer, src_slots))
        assert torch.equal(gather_layer(dst, layer, dst_slots), gather_layer(src, layer, src_slots))


def test_wire_rejects_garbage_and_keeps_unknown_peer_reasons_readable():
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(2)
        b.settimeout(2)
        b.sendall(HEADER.pack(b"HTTP", 1, 1, 0, 0, 0))
        with pytest.raises(TransferError) as info:
            recv_frame(a)
        assert info.value.reason == "protocol_error"
        send_frame(b, FrameType.HELLO, {"request_id": "x"})
        frame = recv_frame(a)
        assert frame.type == FrameType.HELLO and frame.meta == {"request_id": "x"}
    err = error_from_meta({"reason": "martian", "message": "boom"})
    assert err.reason == "protocol_error" and "martian" in str(err)
    for bad in ("nohost", "h:0", "h:x", ":80"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    assert parse_endpoint("[::1]:9000") == ("::1", 9000)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("table", [[3, 4, 5, 6], [6, 0, 5, 2]])  # merged runs / scattered blocks
def test_paged_writer_direct_and_staged_paths_agree(staged, table):
    """The direct path (CPU) and the staging + index_copy_ path (what a GPU cache uses)."""
    num_tokens = 14
    wire = [torch.randn(2, num_tokens, 2, 4).to(torch.bfloat16) for _ in range(2)]
    by_socket = torch.zeros(2, 2, 8, 4, 2, 4, dtype=torch.bfloat16)
    by_buffer = torch.zeros_like(by_socket)
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)
        writer = PagedWriter(by_socket, table, num_tokens, staged=staged)
        for layer in range(2):
            b.sendall(memoryview(wire[layer].reshape(-1).view(torch.uint8).numpy()))
            writer.from_socket(a, layer)
        writer.finish()
    writer = PagedWriter(by_buffer, table, num_tokens, staged=staged)
    for layer in range(2):
        writer.from_buffer(layer, memoryview(wire[layer].reshape(-1).view(torch.uint8).numpy()))
    writer.finish()
    slots = token_slots(table, num_tokens, 4, 8)
    for cache in (by_socket, by_buffer):
        for layer in range(2):
            assert torch.equal(gather_layer(cache, layer, slots), wire[layer])
        assert int((cache != 0).sum()) == 2 * 2 * num_tokens * 2 * 4


def test_scatter_read_fills_many_buffers_across_partial_reads():
    """recv_into_views over buffers of odd sizes while the peer trickles bytes in."""
    sizes = [3, 1, 700, 5, 64, 2000, 9]
    payload = bytes(range(256)) * 12
    payload = payload[: sum(sizes)]
    bufs = [bytearray(n) for n in sizes]
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)

        def trickle() -> None:
            for i in range(0, len(payload), 97):
                b.sendall(payload[i : i + 97])

        thread = threading.Thread(target=trickle)
        thread.start()
        recv_into_views(a, [memoryview(buf) for buf in bufs])
        thread.join()
        assert b"".join(bufs) == payload
        b.sendall(b"xy")
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(PeerClosed):
            recv_into_views(a, [memoryview(bytearray(4))])


def test_iter_cache_layers_yields_the_wire_tensors_lazily():
    cache = torch.randn(3, 2, 6, 4, 2, 4)
    table, n = [4, 1], 6
    slots = token_slots(table, n, 4, 6)
    got = iter_cache_layers(cache, table, n)
    assert all(torch.equal(next(got), gather_layer(cache, layer, slots)) for layer in range(3))
    assert next(got, None) is None


def test_layer_frames_carry_the_layer_in_the_header_and_no_json():
    """LAYER frames: the layer number in the header's index field, no metadata bytes; a header
    that arrives in pieces is still read whole."""
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(2)
        payload = memoryview(bytes(range(16)))
        send_frame(b, FrameType.LAYER, payload=payload, index=7)
        head = a.recv(HEADER.size, socket.MSG_PEEK)
        assert HEADER.unpack(head)[3:] == (7, 0, 16)  # index, meta length, payload length
        frame = recv_frame(a)
        assert (frame.type, frame.index, frame.meta, frame.payload_len) == (
            FrameType.LAYER, 7, {}, 16)
        assert a.recv(16) == bytes(range(16))
        raw = HEADER.pack(b"SSKV", 2, FrameType.CREDIT, 1, 2, 0) + b"{}"
        b.sendall(raw[:5])
        threading.Timer(0.05, b.sendall, (raw[5:],)).start()
        assert recv_frame(a).index == 1
        with pytest.raises(ValueError, match="index"):
            send_frame(b, FrameType.LAYER, index=1 << 16)


def test_cuda_ipc_layer_notes_are_header_only_layer_frames():
    """cuda_ipc's batched LAYER notes (built without CUDA here) parse as the receiver expects."""
    from splitserve.kvtransfer.cuda_ipc import _Notes

    notes = _Notes()
    for layer in (0, 1, 2):
        send_frame(notes, FrameType.LAYER, index=layer)
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(2)
        notes.flush(b)
        frames = [recv_frame(a) for _ in range(3)]
    assert [(f.type, f.index, f.meta, f.payload_len) for f in frames] == [
        (FrameType.LAYER, i, {}, 0) for i in range(3)]


def test_shm_ring_covers_small_transfers_and_falls_back_to_credits(monkeypatch):
    """A small transfer's ring holds every layer (no CREDIT needed); a ring smaller than the
    layer count (big layers) still round-trips through CREDITs."""
    from splitserve.kvtransfer import shm

    assert shm.ring_slots(4096, 32) == 32
    assert shm.ring_slots(8 << 20, 32) == shm.SLOTS
    assert shm.ring_slots(4096, 1) == shm.SLOTS
    for ring_bytes in (shm.RING_BYTES, 0):
        monkeypatch.setattr(shm, "RING_BYTES", ring_bytes)
        s = spec(backend="shm", num_layers=6)
        cache = torch.zeros(6, 2, 8, 4, 2, 4)
        kv = [torch.randn(2, 10, 2, 4) for _ in range(6)]
        table = [5, 1, 7]
        with create_receiver("shm", s, cache) as rx, create_sender("shm", s) as tx:
            fut = rx.expect("r", 10, table, timeout=10)
            tx.send("r", rx.endpoint, iter(kv), 1)
            fut.result(timeout=10)
        slots = token_slots(table, 10, 4, 8)
        assert all(torch.equal(gather_layer(cache, i, slots), kv[i]) for i in range(6))


def test_receiver_reuses_connection_threads_and_retires_idle_ones(monkeypatch):
    """Back-to-back transfers run on the same few threads (no thread per connection); once
    idle, the extra ones exit and the receiver keeps its accepting thread and one spare (so a
    sender after a quiet spell pays no thread start either)."""
    from splitserve.kvtransfer import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "IDLE_THREAD_S", 0.2)
    s = spec()
    cache = torch.zeros(2, 2, 8, 4, 2, 4)
    kv = [torch.randn(2, 3, 2, 4) for _ in range(2)]
    with create_receiver("tcp", s, cache) as rx, create_sender("tcp", s) as tx:
        baseline = threading.active_count()  # with the receiver's one accepting thread
        idents = set()
        for i in range(20):
            fut = rx.expect(f"r{i}", 3, [i % 8], timeout=10)
            tx.send(f"r{i}", rx.endpoint, iter(kv), 1)
            fut.result(timeout=10)
            idents |= {t.ident for t in threading.enumerate()}
        # a few threads (a sender may connect again before the last handler parked), not 20
        assert threading.active_count() <= baseline + 3
        assert len(idents) <= baseline + 6
        deadline = time.monotonic() + 5
        while threading.active_count() > baseline + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # past the idle time again: the spare stays
        assert threading.active_count() == baseline + 1
        assert rx.stats()["handlers"] == 0
        fut = rx.expect("late", 3, [0], timeout=10)  # and it still serves after shrinking
        tx.send("late", rx.endpoint, iter(kv), 1)
        assert fut.result(timeout=10).num_tokens == 3


@pytest.mark.parametrize("first_token", [5, lambda: 5])  # END with the last batch / after it
@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_small_layers_are_batched_but_copied_and_all_sent_before_end(backend, first_token):
    """Small layers leave in batches (HeldFrames), yet a caller that refills one buffer for
    every layer still gets each layer's own data across, and the last batch goes before END."""
    s = spec(backend=backend, num_layers=5)
    cache = torch.zeros(5, 2, 8, 4, 2, 4)
    kv = [torch.randn(2, 6, 2, 4) for _ in range(5)]
    buffer = torch.empty(2, 6, 2, 4)

    def reused() -> Iterator[torch.Tensor]:
        for layer in kv:
            buffer.copy_(layer)
            yield buffer

    with create_receiver(backend, s, cache) as rx, create_sender(backend, s) as tx:
        fut = rx.expect("r", 6, [3, 6], timeout=10)
        assert tx.send("r", rx.endpoint, reused(), first_token).first_token == 5
        assert fut.result(timeout=10).first_token == 5
    slots = token_slots([3, 6], 6, 4, 8)
    assert all(torch.equal(gather_layer(cache, i, slots), kv[i]) for i in range(5))


def test_held_frames_flush_by_size_and_by_age(monkeypatch):
    from splitserve.kvtransfer import sender as sender_module

    class Sink:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def sendall(self, data: bytes) -> None:
            self.sent.append(bytes(data))

    monkeypatch.setattr(sender_module, "COALESCE_BYTES", 300)
    assert not sender_module.HeldFrames(300).enabled
    held, sock = sender_module.HeldFrames(100), Sink()
    for i in range(3):
        held.add(sock, bytes([i]))
    assert sock.sent == [b"\x00\x01\x02"]  # 300 layer bytes held: sent together
    monkeypatch.setattr(sender_module, "HOLD_S", 0.0)
    held.add(sock, b"x")  # waited long enough (0 s): goes at once
    assert sock.sent[-1] == b"x"
    held.flush(sock)  # nothing held: nothing sent
    assert len(sock.sent) == 2


def test_a_lane_whose_last_flush_fails_fails_the_send_at_once():
    """Several streams, small layers held in each lane: a sender closed (shut down) before the
    lanes' last flush fails the transfer as closed, at once, not after the I/O timeout."""
    from splitserve.kvtransfer.tcp import TCPReceiver, TCPSender

    s = spec(num_layers=4)
    rx = TCPReceiver(s, torch.zeros(4, 2, 8, 4, 2, 4))
    tx = TCPSender(s, streams=2, min_stream_bytes=1, io_timeout=10.0)
    kv = [torch.randn(2, 6, 2, 4) for _ in range(4)]
    rx.expect("r", 6, [3, 6], timeout=20)

    def layers() -> Iterator[torch.Tensor]:
        yield from kv  # all held back by the lanes
        time.sleep(0.1)  # the lanes have taken every layer: only their last flush is left
        tx.close()

    started = time.monotonic()
    try:
        with pytest.raises(TransferError):
            tx.send("r", rx.endpoint, layers(), 1)
        assert time.monotonic() - started < 5
    finally:
        rx.close()


def test_spec_refuses_more_layers_than_the_wire_can_number():
    with pytest.raises(ValueError, match="num_layers"):
        spec(num_layers=70_000)
