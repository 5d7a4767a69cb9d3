"""A worker's share of its GPU: what goes to weights, activations, CUDA graphs and the KV cache.

A worker may use ``--gpu-memory-utilization`` (a fraction) of its device's *total* memory, for
everything it allocates. The KV cache gets that share minus what the worker itself uses (weights,
the peak activations of its largest forward pass, the decode CUDA graphs' pool, the CUDA context).
Not "free memory minus the rest of the device": that rule gives the second of two workers sharing
one GPU what the first left over (nothing, at the default), and depends on which started first.
With shares, two workers on one device each get theirs whatever the order.

The plan is made twice. Before the weights load, every term is estimated from the config (the
weights exactly: their parameter count), and a share that cannot hold even one
``max_model_len`` sequence's KV is refused at once, naming the flag to change, instead of after
minutes of loading. After loading, weights and activations are measured (the allocator's bytes
and the peak of a profiled prefill of the largest batch), and the KV cache is sized from that.

Torch is imported only by ``CudaMemory``: the arithmetic is plain, and tests drive it with a
fake ``DeviceMemory``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from splitserve.engine.config import ModelConfig

GiB = 2**30

# Memory outside torch's allocator counts (CUDA context, cuBLAS and Triton workspaces, loaded
# kernels): it cannot be measured per process from the free memory while another worker shares
# the device, so it is a fixed estimate, part of the worker's share.
NON_TORCH_BYTES = 768 * 2**20

FLAG = "--gpu-memory-utilization"


class MemoryBudgetError(RuntimeError):
    """The worker's share of its device cannot hold the model and one full-length sequence."""


class DeviceMemory(Protocol):
    """What sizing needs to know about a device; ``CudaMemory`` on a GPU, a fake in tests."""

    def total(self) -> int: ...

    def free(self) -> int: ...

    def allocated(self) -> int:
        """Bytes this process holds in tensors on the device."""
        ...

    def reserved(self) -> int:
        """Bytes this process's allocator holds from the device (tensors, caches, graph pools)."""
        ...

    def reset_peak(self) -> None: ...

    def peak(self) -> int:
        """Most bytes allocated at once since ``reset_peak``."""
        ...


class CudaMemory:
    """``DeviceMemory`` of one CUDA device, from torch's allocator and ``cudaMemGetInfo``."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self._cuda = torch.cuda

    def total(self) -> int:
        return self._cuda.mem_get_info(self.device)[1]

    def free(self) -> int:
        return self._cuda.mem_get_info(self.device)[0]

    def allocated(self) -> int:
        return self._cuda.memory_allocated(self.device)

    def reserved(self) -> int:
        return self._cuda.memory_reserved(self.device)

    def reset_peak(self) -> None:
        self._cuda.synchronize(self.device)
        self._cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        self._cuda.synchronize(self.device)
        return self._cuda.max_memory_allocated(self.device)


def parameter_count(mc: ModelConfig) -> int:
    """Parameters of ``CausalLM(mc)`` (tied embeddings counted once)."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    qkv = mc.hidden_size * (q + 2 * kv) + ((q + 2 * kv) if mc.attention_bias else 0)
    layer = qkv + q * mc.hidden_size + 3 * mc.hidden_size * mc.intermediate_size + 2 * mc.hidden_size
    embed = mc.vocab_size * mc.hidden_size
    return embed * (1 if mc.tie_word_embeddings else 2) + mc.num_layers * layer + mc.hidden_size


def weight_bytes(mc: ModelConfig, itemsize: int) -> int:
    """Device bytes of the loaded model: parameters in the serving dtype, plus the float32 RoPE
    tables (cos and sin, each max_position_embeddings x head_dim / 2)."""
    rope = 2 * mc.max_position_embeddings * (mc.head_dim // 2) * 4
    return parameter_count(mc) * itemsize + rope


def activation_bytes(mc: ModelConfig, tokens: int, rows: int, itemsize: int) -> int:
    """An upper estimate of a forward pass's peak over ``tokens`` tokens that samples ``rows``:
    the residual stream and its norm, q/k/v and their rotated copies, the MLP's gate/up and its
    product, the RoPE rows (float32), and the logits (the model's dtype, then float32 twice in
    sampling)."""
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    per_token = itemsize * (4 * mc.hidden_size + 3 * mc.intermediate_size + 2 * (q + 2 * kv)) + 4 * mc.head_dim
    return tokens * per_token + rows * mc.vocab_size * (itemsize + 8)


def largest_prefill(max_num_batched_tokens: int, chunked_prefill: bool, max_model_len: int) -> int:
    """Tokens of the largest forward pass the scheduler can make: its token budget, or without
    chunked prefill a whole prompt of the longest context (an over-budget prompt runs alone)."""
    if chunked_prefill:
        return max_num_batched_tokens
    return max(max_num_batched_tokens, max_model_len - 1)


def min_kv_blocks(max_model_len: int, block_size: int) -> int:
    """Blocks one ``max_model_len`` sequence needs, plus one spare."""
    return max_model_len // block_size + 1


@dataclass(frozen=True)
class MemoryPlan:
    """One worker's share of its device and where it goes (bytes)."""

    device: str
    total: int
    fraction: float
    weights: int
    activations: int
    graphs: int
    non_torch: int = NON_TORCH_BYTES
    measured: bool = False  # weights and activations measured, not estimated

    @property
    def share(self) -> int:
        return int(self.fraction * self.total)

    @property
    def used(self) -> int:
        """Everything but the KV cache."""
        return self.weights + self.activations + self.graphs + self.non_torch

    @property
    def kv(self) -> int:
        return self.share - self.used

    def kv_blocks(self, bytes_per_block: int) -> int:
        return max(0, self.kv // bytes_per_block)

    def measure(self, weights: int, activations: int) -> MemoryPlan:
        return replace(self, weights=weights, activations=activations, measured=True)

    def check(self, bytes_per_block: int, max_model_len: int, block_size: int) -> None:
        """Raise ``MemoryBudgetError`` unless the KV share holds one ``max_model_len`` sequence;
        the message says what the share is, what took it, and which flag to change."""
        blocks = min_kv_blocks(max_model_len, block_size)
        if self.kv_blocks(bytes_per_block) >= blocks:
            return
        need = self.used + blocks * bytes_per_block
        how = "measured" if self.measured else "estimated before loading"
        raise MemoryBudgetError(
            f"{self.device}: {FLAG} {self.fraction:.3g} gives this worker {self.share / GiB:.2f} GiB of "
            f"{self.total / GiB:.2f} GiB, but it needs {need / GiB:.2f} GiB ({how}: weights "
            f"{self.weights / GiB:.2f} + activations {self.activations / GiB:.2f} + CUDA graphs "
            f"{self.graphs / GiB:.2f} + CUDA context {self.non_torch / GiB:.2f} + the KV cache of one "
            f"{max_model_len}-token sequence {blocks * bytes_per_block / GiB:.2f} GiB). Raise {FLAG} "
            f"to at least {math.ceil(100 * need / self.total) / 100:.2f} (with fewer workers on the "
            f"device), or lower --max-model-len / --max-num-batched-tokens"
        )

    def check_free(self, free: int, kv_bytes: int) -> None:
        """Refuse a KV cache the device cannot hold now, with the activations and graphs still to
        come: something else on it uses more than what the shares leave (the fractions of all
        workers on a device must sum to at most 1)."""
        need = kv_bytes + self.activations + self.graphs
        if need > free:
            raise MemoryBudgetError(
                f"{self.device}: the rest of this worker's share (KV cache {kv_bytes / GiB:.2f} GiB, "
                f"activations and CUDA graphs {(self.activations + self.graphs) / GiB:.2f} GiB) needs "
                f"{need / GiB:.2f} GiB, but only {free / GiB:.2f} GiB is free: other processes on the device use more "
                f"than the rest of it. Lower {FLAG} here or there, so the fractions of everything "
                "on the device sum to at most 1"
            )

    def describe(self, kv_bytes: int, graphs_measured: int | None = None) -> str:
        """One log line: the share and where it went."""
        graphs = f"{self.graphs / GiB:.2f} GiB reserved"
        if graphs_measured is not None:
            graphs += f" ({graphs_measured / GiB:.2f} used)"
        return (
            f"memory on {self.device}: share {self.share / GiB:.2f} GiB ({FLAG} {self.fraction:.3g} of "
            f"{self.total / GiB:.2f} GiB): weights {self.weights / GiB:.2f} GiB, activations "
            f"{self.activations / GiB:.2f} GiB, CUDA graphs {graphs}, CUDA context "
            f"{self.non_torch / GiB:.2f} GiB (estimate), KV cache {kv_bytes / GiB:.2f} GiB"
        )


# Each captured batch size keeps its own allocator segments (2 MiB granularity) however small the
# model: a tiny model on an H200 used 40 MiB of graph pool against an estimate of ~0.
GRAPH_POOL_FLOOR = 64 * 2**20


def estimate_plan(
    device: str,
    total: int,
    fraction: float,
    mc: ModelConfig,
    itemsize: int,
    prefill_tokens: int,
    prefill_rows: int,
    graph_batch: int | None,
) -> MemoryPlan:
    """The plan before anything is loaded: weights from the config, the activations of the
    largest prefill (``prefill_tokens`` over at most ``prefill_rows`` prompts), and the decode
    graphs' pool as the activations of their largest batch (``graph_batch``; None: no graphs)."""
    rows = min(prefill_rows, prefill_tokens)
    graphs = 0
    if graph_batch:  # at least the allocator's segments of every captured batch size
        graphs = max(GRAPH_POOL_FLOOR, activation_bytes(mc, graph_batch, graph_batch, itemsize))
    return MemoryPlan(
        device=device,
        total=total,
        fraction=fraction,
        weights=weight_bytes(mc, itemsize),
        activations=activation_bytes(mc, prefill_tokens, rows, itemsize),
        graphs=graphs,
    )


def profile_lengths(tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the profiled prefill: ``tokens`` in all, over as many prompts as a
    batch may hold (the most logits rows), none longer than the context allows."""
    longest = max(1, min(max_model_len - 1, -(-tokens // max(1, min(max_num_seqs, tokens)))))
    count = -(-tokens // longest)
    return [longest] * (count - 1) + [tokens - longest * (count - 1)]
