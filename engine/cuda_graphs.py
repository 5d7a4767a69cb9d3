"""CUDA graphs for the decode step, one per batch-size bucket.

A decode step of a small model is a few hundred kernel launches; from Python that costs more
than the GPU work. Each bucket's forward pass is captured once into static input buffers and
replayed: the step costs one launch. Rows past the real batch are padding: they write into a
scratch block that no sequence owns and attend over one token of it.

A row's input token may still be on the device: when the engine queues a step before the
previous step's tokens have reached the host, the row names where that token sits in the
previous step's samples (``prev_rows``, -1 for a token the host knows) and the graph itself
gathers it from ``prev_tokens``, where every step leaves its samples (``keep_samples``).
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
        self.max_batch, self.width = max_batch, max_blocks_per_seq
        # Every per-step input lives in two device buffers (int64: token ids, positions, slots,
        # rows of the previous step's samples; int32: context lengths, then block tables),
        # mirrored by two pinned host buffers: a step fills the host side with numpy and moves
        # it with two copies, instead of building, pinning and copying a tensor per input (each
        # a few microseconds of host time while the GPU waits between steps).
        self._dev64 = torch.zeros(4, max_batch, dtype=torch.int64, device=dev)
        self._dev32 = torch.zeros(max_batch * (1 + max_blocks_per_seq), dtype=torch.int32, device=dev)
        self._host64 = torch.zeros(self._dev64.shape, dtype=torch.int64, pin_memory=True)
        self._host32 = torch.zeros(self._dev32.shape, dtype=torch.int32, pin_memory=True)
        self._h64, self._h32 = self._host64.numpy(), self._host32.numpy()
        self._h_ctx = self._h32[:max_batch]
        self._h_tables = self._h32[max_batch:].reshape(max_batch, max_blocks_per_seq)
        self._copied = torch.cuda.Event()  # the host buffers may be rewritten once this passed
        self.input_ids, self.positions, self.slot_mapping, self.prev_rows = self._dev64.unbind(0)
        self.prev_rows.fill_(-1)
        self.prev_tokens = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.context_lens = self._dev32[:max_batch]
        self.block_tables = self._dev32[max_batch:].view(max_batch, max_blocks_per_seq)
        self.slot_mapping.fill_(scratch_slot)
        self.context_lens.fill_(1)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.last_index = torch.arange(max_batch, dtype=torch.int64, device=dev)
        self._copied.record(torch.cuda.current_stream(dev))
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
        rows = self.prev_rows[:bs]
        ids = torch.where(rows >= 0, self.prev_tokens[rows.clamp(min=0)], self.input_ids[:bs])
        hidden = self.model(ids, self.positions[:bs], self.kv_cache, self._meta(bs))
        return self.model.logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self._forward(bs)  # warm up: Triton compiles outside the capture
            torch.cuda.synchronize(self.kv_cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.kv_cache.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, batch: int, width: int) -> bool:
        return batch <= self.sizes[-1] and width <= self.block_tables.shape[1]

    def keep_samples(self, tokens: torch.Tensor) -> bool:
        """Leave a step's sampled tokens where the next replay can read them (one device copy,
        queued after the sampling); False when there are more of them than rows."""
        if len(tokens) > self.max_batch:
            return False
        self.prev_tokens[: len(tokens)].copy_(tokens)
        return True

    def bucket(self, batch: int) -> int:
        """The smallest captured batch size that holds ``batch`` rows."""
        return next(s for s in self.sizes if s >= batch)

    @torch.inference_mode()
    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        slots: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        prev_rows: list[int] | None = None,
    ) -> torch.Tensor:
        """Replay the smallest bucket that holds the batch; returns (batch, vocab) logits.

        ``prev_rows[i] >= 0``: row i's input token is that row of the last ``keep_samples``
        (``token_ids[i]`` is then a placeholder). Rows past the batch are padding (slot = the
        scratch slot, context of one token); their block-table rows keep whatever they held,
        which is always a valid block to read.
        """
        n = len(token_ids)
        bs = self.bucket(n)
        self._copied.synchronize()  # the previous step's copies have read the host buffers
        h64 = self._h64
        h64[0, :n], h64[1, :n], h64[2, :n] = token_ids, positions, slots
        h64[3, :n] = -1 if prev_rows is None else prev_rows
        h64[:2, n:bs] = 0
        h64[2, n:bs] = self.scratch_slot
        h64[3, n:bs] = -1
        self._h_ctx[:n] = context_lens
        self._h_ctx[n:bs] = 1
        tables = self._h_tables
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        used32 = self.max_batch + bs * self.width
        self._dev64.copy_(self._host64, non_blocking=True)
        self._dev32[:used32].copy_(self._host32[:used32], non_blocking=True)
        self._copied.record(torch.cuda.current_stream(self.kv_cache.device))
        self.graphs[bs].replay()
        return self.logits[bs][:n]
