"""What only the nixl backend has: its refusal where NIXL is missing, its grant checks, and the
GPU variant (device memory over UCX's cuda_ipc / cuda_copy transports; bench/gpu_all.sh check).
The contract every backend passes is tests/test_kvtransfer_contract.py (nixl included)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from splitserve.kvtransfer import KVSpec, TransferError, create_receiver, create_sender
from splitserve.kvtransfer import nixl as nixl_backend
from splitserve.kvtransfer.layout import gather_layer, token_slots

LAYERS, HEADS, DIM = 4, 2, 8


def nixl_missing() -> str | None:
    try:
        nixl_backend.nixl_api()
    except TransferError as err:
        return err.message
    return None


needs_nixl = pytest.mark.skipif(nixl_missing() is not None, reason=f"nixl: {nixl_missing()}")
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU variant needs CUDA (a second GPU if present)")


def spec(block_size: int = 4) -> KVSpec:
    return KVSpec("tiny@gen1", "bfloat16", LAYERS, HEADS, DIM, block_size, backend="nixl")


def test_missing_nixl_is_refused_at_once_with_the_fix(monkeypatch):
    monkeypatch.setattr(nixl_backend, "_API", None)
    monkeypatch.setattr(nixl_backend, "API_MODULES", ("splitserve_no_such_nixl._api",))
    start = time.monotonic()
    for make in (lambda: create_sender("nixl", spec()),
                 lambda: create_receiver("nixl", spec(), torch.zeros(LAYERS, 2, 4, 4, HEADS, DIM,
                                                                      dtype=torch.bfloat16))):
        with pytest.raises(TransferError) as info:
            make()
        assert info.value.reason == "backend_unavailable"
        assert "pip install 'splitserve[nixl]'" in str(info.value)
    assert time.monotonic() - start < 1.0


def test_staging_ring_keeps_the_link_busy_within_its_bytes():
    assert nixl_backend.ring_slots(4096, 32) == 32  # small layers: all in flight
    assert nixl_backend.ring_slots(8 << 20, 32) == 8  # 64 MiB of 8 MiB layers
    assert nixl_backend.ring_slots(1 << 30, 32) == nixl_backend.MIN_SLOTS


class _CountingAgent:
    """Stands in for a NIXL agent: registration is all the staging pool asks of it."""

    def __init__(self) -> None:
        self.registered = 0

    def register_memory(self, tensor: torch.Tensor) -> object:
        self.registered += 1
        return object()

    def deregister_memory(self, reg: object) -> None:
        pass


def test_staging_pool_hands_back_the_smallest_buffer_that_fits_among_several_sizes():
    agent = _CountingAgent()
    pool = nixl_backend._BufferPool(agent)
    sizes = (1 << 16, 1 << 17, 1 << 18)
    buffers = [pool.take(n, torch.device("cpu")) for n in sizes]
    for buffer in buffers:
        pool.give(buffer)
    for n in (1 << 17, 1 << 16, 1 << 18):  # not the first of the free list: found by size
        tensor, _ = pool.take(n, torch.device("cpu"))
        assert tensor.numel() == n
    assert agent.registered == len(sizes)  # every take was served from the pool


@needs_nixl
@pytest.mark.parametrize("grant", [
    {},
    {"nixl": {"mem": "DRAM", "tag": "t", "base": 0, "device": 0}, "blocks": [0],
     "block_size": True, "num_blocks": 1},
    {"nixl": {"mem": "HBM", "tag": "t", "base": 0, "device": 0}, "blocks": [0],
     "block_size": 4, "num_blocks": 1},
    {"nixl": {"mem": "DRAM", "tag": "t", "base": 0, "device": 0}, "blocks": [5],
     "block_size": 4, "num_blocks": 1},
])
def test_a_malformed_grant_is_a_protocol_error(grant):
    with create_sender("nixl", spec()) as tx, pytest.raises(TransferError) as info:
        nixl_backend._Grant(grant, tx, 4)
    assert info.value.reason == "protocol_error"


# ----------------------------------------------------------------------------- GPU variant
@pytest.fixture
def gpu_ucx(monkeypatch):
    """Device memory between GPUs over UCX's CUDA transports (tcp carries the notifications)."""
    monkeypatch.setenv("UCX_TLS", os.environ.get("SPLITSERVE_NIXL_GPU_TLS",
                                                  "cuda_ipc,cuda_copy,tcp"))
    count = torch.cuda.device_count()
    return torch.device("cuda", 0), torch.device("cuda", 1 if count > 1 else 0)


@needs_nixl
@needs_two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 37, 4096])
def test_gpu_round_trip_device_to_device(gpu_ucx, num_tokens):
    tx_dev, rx_dev = gpu_ucx
    p_spec, d_spec = spec(block_size=16), spec(block_size=4)
    blocks = -(-num_tokens // 4) + 3
    cache = torch.full((LAYERS, 2, blocks, 4, HEADS, DIM), -7.0, dtype=torch.bfloat16,
                       device=rx_dev)
    table = torch.randperm(blocks).tolist()
    gen = torch.Generator().manual_seed(num_tokens)
    want = [torch.randn(2, num_tokens, HEADS, DIM, generator=gen).to(torch.bfloat16).to(tx_dev)
            for _ in range(LAYERS)]
    with create_receiver("nixl", d_spec, cache) as rx, \
            create_sender("nixl", p_spec, device=tx_dev) as tx:
        for i in range(3):  # the second and third reuse the connection and the staging ring
            fut = rx.expect(f"g{i}", num_tokens, table, timeout=30)
            tx.send(f"g{i}", rx.endpoint, iter(want), 9, num_tokens=num_tokens)
            assert fut.result(timeout=30).first_token == 9
    slots = token_slots(table, num_tokens, 4, blocks)
    for layer in range(LAYERS):
        assert torch.equal(gather_layer(cache, layer, slots).to(tx_dev), want[layer])
    untouched = torch.ones(blocks * 4, dtype=torch.bool)
    untouched[slots] = False
    assert bool((cache.view(LAYERS, 2, -1, HEADS, DIM)[:, :, untouched.to(rx_dev)] == -7).all())


@needs_nixl
@needs_two_gpus
@pytest.mark.gpu
def test_gpu_cancel_mid_transfer_stops_the_writes(gpu_ucx):
    tx_dev, rx_dev = gpu_ucx
    cache = torch.zeros((LAYERS, 2, 8, 4, HEADS, DIM), dtype=torch.bfloat16, device=rx_dev)

    def kv():
        for layer in range(LAYERS):
            if layer == 2:
                rx.cancel("c")
                time.sleep(0.2)
            yield torch.ones(2, 16, HEADS, DIM, dtype=torch.bfloat16, device=tx_dev)

    with create_receiver("nixl", spec(), cache) as rx, \
            create_sender("nixl", spec(), device=tx_dev) as tx:
        fut = rx.expect("c", 16, [0, 1, 2, 3], timeout=30)
        with pytest.raises(TransferError):
            tx.send("c", rx.endpoint, kv(), 1, num_tokens=16)
        assert fut.exception(timeout=5).reason == "cancelled"
        snapshot = cache.clone()
        time.sleep(0.2)
        assert torch.equal(cache, snapshot)  # nothing lands after the future failed
