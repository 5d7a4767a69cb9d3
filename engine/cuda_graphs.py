"""CUDA graphs for the decode step, one per batch-size bucket.

A decode step of a small model is a few hundred kernel launches; from Python that costs more
than the GPU work. Each bucket's forward pass is captured once into static input buffers and
replayed: the step costs one launch. Rows past the real batch are padding: they write into a
scratch block that no sequence owns and attend over one token of it.
"""

from __future__ import annotations

import logging

import torch
from splitserve.engine.model import AttentionMetadata, CausalLM

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_slot: int,
    ) -> None:
        dev = kv_cache.device
        self.model, self.kv_cache, self.scratch_slot = model, kv_cache, scratch_slot
        self.sizes = bucket_sizes(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_batch,), scratch_slot, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.last_index = torch.arange(max_batch, dtype=torch.int64, device=dev)
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            cu_seqlens_q=self.cu_seqlens[: bs + 1],
            last_token_index=self.last_index[:bs],
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_cache, self._meta(bs))
        return self.model.logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self._forward(bs)  # warm up: Triton compiles outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, batch: int, width: int) -> bool:
        return batch <= self.sizes[-1] and width <= self.block_tables.shape[1]

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Replay the smallest bucket that holds the batch; returns (batch, vocab) logits."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping.fill_(self.scratch_slot)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.context_lens.fill_(1)
        self.context_lens[:n].copy_(meta.context_lens)
        self.block_tables.zero_()
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
