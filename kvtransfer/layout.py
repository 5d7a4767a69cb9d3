"""Translate between a paged KV cache and the token-major layout on the wire.

Cache: ``(num_layers, 2, num_blocks, block_size, H, D)``; token t of a sequence lives in block
``block_table[t // block_size]`` at offset ``t % block_size``. Wire: per layer ``(2, T, H, D)``.
Because the wire is token-major, the two sides may use different block sizes and numbering.
No per-element Python loops: index math is torch ops (one gather / index_copy_ per layer), and a
CPU cache is written per run of consecutive blocks straight from the socket (``PagedWriter``).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .base import KVSpec
from .wire import recv_into_exact, recv_into_views


def check_cache(spec: KVSpec, kv_cache: torch.Tensor) -> None:
    """Raise ValueError unless ``kv_cache`` has the layout and dtype ``spec`` describes."""
    if not isinstance(kv_cache, torch.Tensor):
        raise ValueError(f"kv_cache must be a torch.Tensor, got {type(kv_cache).__name__}")
    want = (spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
    got = tuple(kv_cache.shape)
    if len(got) != 6 or (got[0], got[1], *got[3:]) != want:
        raise ValueError(
            "kv_cache shape must be (num_layers, 2, num_blocks, block_size, H, D) = "
            f"({want[0]}, 2, *, {want[2]}, {want[3]}, {want[4]}), got {got}"
        )
    if kv_cache.dtype != getattr(torch, spec.dtype):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} != spec dtype {spec.dtype}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")


def token_slots(
    block_table: Sequence[int], num_tokens: int, block_size: int, num_blocks: int, start: int = 0
) -> torch.Tensor:
    """Flat slot (block * block_size + offset) of each of the first ``num_tokens`` tokens, or of
    tokens ``start`` .. ``num_tokens - 1`` (a prompt chunk after its computed part)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if not 0 <= start < num_tokens:
        raise ValueError(f"start must be in [0, {num_tokens}), got {start}")
    needed = -(-num_tokens // block_size)
    # numpy, not torch: a handful of tiny torch CPU ops cost ~1 ms here (7 ms in a busy GPU
    # process), on the path of every transfer's handshake; this is ~30 us
    table = np.asarray(list(block_table), dtype=np.int64)
    if table.size < needed:
        raise ValueError(
            f"block_table has {table.size} blocks, {needed} needed for {num_tokens} tokens "
            f"of block size {block_size}"
        )
    used = table[:needed]
    if int(used.min()) < 0 or int(used.max()) >= num_blocks:
        raise ValueError(f"block_table entries must be in [0, {num_blocks})")
    t = np.arange(start, num_tokens, dtype=np.int64)
    return torch.from_numpy(used[t // block_size] * block_size + t % block_size)


def _flat_layer(kv_cache: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer`` viewed as (2, num_blocks * block_size, H, D), sharing storage."""
    _, _, nb, bs, h, d = kv_cache.shape
    return kv_cache[layer].view(2, nb * bs, h, d)


def gather_layer(kv_cache: torch.Tensor, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """The wire tensor (2, T, H, D) of ``layer`` for the tokens at ``slots`` (prefill side)."""
    return _flat_layer(kv_cache, layer).index_select(1, slots.to(kv_cache.device))


def iter_cache_layers(
    kv_cache: torch.Tensor, block_table: Sequence[int], num_tokens: int
) -> Iterator[torch.Tensor]:
    """The wire tensors of a sequence held in a paged cache, one layer at a time (prefill's
    ``kv_layers`` when the forward pass has finished; each layer is gathered only when the
    sender asks for it, so at most one extra layer is in memory)."""
    _, _, nb, bs, _, _ = kv_cache.shape
    slots = token_slots(block_table, num_tokens, bs, nb)
    for layer in range(kv_cache.shape[0]):
        yield gather_layer(kv_cache, layer, slots)


def scatter_layer(
    kv_cache: torch.Tensor, layer: int, slots: torch.Tensor, data: torch.Tensor
) -> None:
    """Write the wire tensor ``data`` (2, T, H, D) of ``layer`` into ``slots`` (decode side)."""
    # a synchronous host->device copy: the caller reuses its staging buffer for the next layer
    _flat_layer(kv_cache, layer).index_copy_(1, slots, data.to(kv_cache.device))


class PagedWriter:
    """Writes one transfer's wire layers into the blocks the decode side allocated for it.

    CPU cache: the bytes go straight from the socket (or the shared-memory slot) into the
    blocks: a scatter read (``recvmsg_into``) over the runs of consecutive blocks, or one memcpy
    per run, with no staging copy and no torch kernel (torch's CPU index kernels were 3-5x slower than the socket here). Other
    devices: stage the layer in one host buffer, then one ``index_copy_`` per layer.
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        block_table: Sequence[int],
        num_tokens: int,
        *,
        staged: bool = False,
    ) -> None:
        """``staged=True`` forces the staging path (what a GPU cache uses) on a CPU cache."""
        _, _, nb, bs, h, d = kv_cache.shape
        self.kv_cache = kv_cache
        self.num_tokens = num_tokens
        self.layer_nbytes = 2 * num_tokens * h * d * kv_cache.element_size()
        self.slots = token_slots(block_table, num_tokens, bs, nb)
        # the blocks in token order (validated above): cuda_ipc grants them to its sender
        self.blocks = [int(b) for b in list(block_table)[: -(-num_tokens // bs)]]
        self.direct = kv_cache.device.type == "cpu" and not staged
        self._shape = (2, num_tokens, h, d)
        self._local = threading.local()  # a staging buffer per connection thread
        self._cache: memoryview | None = None
        if self.direct:
            self._cache = memoryview(kv_cache.view(-1).view(torch.uint8).numpy())
            self._stride = kv_cache[0].numel() * kv_cache.element_size()
            row = h * d * kv_cache.element_size()
            self._runs = _block_runs(self.blocks, num_tokens, bs, nb, row)
        else:
            self.slots = self.slots.to(kv_cache.device)

    def from_socket(self, sock: socket.socket, layer: int) -> None:
        """Receive one layer's wire bytes from ``sock`` into the blocks."""
        if self.direct:
            base = layer * self._stride
            recv_into_views(sock, [self._cache[base + off : base + off + n] for off, _, n in self._runs])
            return
        buf, view = self._staging_buffer()
        recv_into_exact(sock, view)
        self._scatter(layer, buf)

    def from_buffer(self, layer: int, data: memoryview) -> None:
        """Copy one layer's wire bytes (e.g. a shared-memory slot) into the blocks."""
        if data.nbytes != self.layer_nbytes:
            raise ValueError(f"layer data is {data.nbytes} bytes, expected {self.layer_nbytes}")
        if self.direct:
            base = layer * self._stride
            for cache_off, wire_off, nbytes in self._runs:
                self._cache[base + cache_off : base + cache_off + nbytes] = (
                    data[wire_off : wire_off + nbytes]
                )
            return
        self._scatter(layer, torch.frombuffer(data, dtype=torch.uint8))

    def from_tensor(self, layer: int, data: torch.Tensor) -> None:
        """Scatter one layer's wire bytes held in a uint8 tensor on any device (cuda_ipc's GPU
        staging for a CPU cache): one ``index_copy_`` on the cache's device, after a copy if the
        data lives elsewhere. Asynchronous on a GPU cache: synchronize before reusing ``data``."""
        if data.dtype != torch.uint8 or data.numel() != self.layer_nbytes:
            raise ValueError(f"layer data must be {self.layer_nbytes} uint8 elements, got "
                             f"{data.numel()} {data.dtype}")
        self._scatter(layer, data)

    def finish(self) -> None:
        """Wait until device copies landed (host buffers stay valid: other connections of the
        same transfer may still be writing; everything goes with the writer)."""
        if self.kv_cache.is_cuda:
            torch.cuda.current_stream(self.kv_cache.device).synchronize()

    def _staging_buffer(self) -> tuple[torch.Tensor, memoryview]:
        staging = getattr(self._local, "staging", None)
        if staging is None:
            buf = torch.empty(self.layer_nbytes, dtype=torch.uint8,
                              pin_memory=torch.cuda.is_available())
            staging = self._local.staging = (buf, memoryview(buf.numpy()))
        return staging

    def _scatter(self, layer: int, raw: torch.Tensor) -> None:
        data = raw.view(self.kv_cache.dtype).view(self._shape)
        scatter_layer(self.kv_cache, layer, self.slots, data)


def _block_runs(
    blocks: list[int], num_tokens: int, block_size: int, num_blocks: int, row: int
) -> list[tuple[int, int, int]]:
    """(cache offset, wire offset, bytes) within one layer for K then V, merging runs of
    consecutive blocks. One entry per block at most: computed once per transfer."""
    runs: list[tuple[int, int, int]] = []
    for kv in range(2):
        for j, block in enumerate(blocks):
            tokens = min(block_size, num_tokens - j * block_size)
            cache_off = ((kv * num_blocks + block) * block_size) * row
            wire_off = (kv * num_tokens + j * block_size) * row
            if runs and runs[-1][0] + runs[-1][2] == cache_off and (
                runs[-1][1] + runs[-1][2] == wire_off
            ):
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + tokens * row)
            else:
                runs.append((cache_off, wire_off, tokens * row))
    return runs
