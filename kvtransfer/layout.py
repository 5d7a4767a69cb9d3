"""Translate between a paged KV cache and the token-major layout on the wire.

Cache: ``(num_layers, 2, num_blocks, block_size, H, D)``; token t of a sequence lives in block
``block_table[t // block_size]`` at offset ``t % block_size``. Wire: per layer ``(2, T, H, D)``.
Because the wire is token-major, the two sides may use different block sizes and numbering.
All index math is done with torch ops: one gather / one index_copy_ per layer, no Python loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import KVSpec


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
    block_table: Sequence[int], num_tokens: int, block_size: int, num_blocks: int
) -> torch.Tensor:
    """Flat slot (block * block_size + offset) of each of the first ``num_tokens`` tokens."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    needed = -(-num_tokens // block_size)
    table = torch.as_tensor(list(block_table), dtype=torch.long)
    if table.numel() < needed:
        raise ValueError(
            f"block_table has {table.numel()} blocks, {needed} needed for {num_tokens} tokens "
            f"of block size {block_size}"
        )
    used = table[:needed]
    if bool((used < 0).any()) or bool((used >= num_blocks).any()):
        raise ValueError(f"block_table entries must be in [0, {num_blocks})")
    t = torch.arange(num_tokens, dtype=torch.long)
    return used[t // block_size] * block_size + t % block_size


def _flat_layer(kv_cache: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer`` viewed as (2, num_blocks * block_size, H, D), sharing storage."""
    _, _, nb, bs, h, d = kv_cache.shape
    return kv_cache[layer].view(2, nb * bs, h, d)


def gather_layer(kv_cache: torch.Tensor, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """The wire tensor (2, T, H, D) of ``layer`` for the tokens at ``slots`` (prefill side)."""
    return _flat_layer(kv_cache, layer).index_select(1, slots.to(kv_cache.device))


def scatter_layer(
    kv_cache: torch.Tensor, layer: int, slots: torch.Tensor, data: torch.Tensor
) -> None:
    """Write the wire tensor ``data`` (2, T, H, D) of ``layer`` into ``slots`` (decode side)."""
    _flat_layer(kv_cache, layer).index_copy_(1, slots, data.to(kv_cache.device, non_blocking=True))
