"""The model runner: owns the model, the paged KV cache and every tensor of a step.

It turns a scheduled batch into input tensors (token ids, positions, cache slots, block tables),
runs the model, and samples one token per sequence. It also sizes the KV cache, and hands out a
request's per-layer KV for transfer. Nothing else in the engine touches device memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from splitserve.engine.config import ModelConfig, RunnerConfig, SchedulerConfig, dtype_from_name
from splitserve.engine.host_copy import to_device
from splitserve.engine.loader import load_model, random_model
from splitserve.engine.memory import (
    CudaMemory,
    DeviceMemory,
    MemoryBudgetError,
    MemoryPlan,
    estimate_plan,
    largest_prefill,
    min_kv_blocks,
    profile_lengths,
)
from splitserve.engine.model import AttentionMetadata
from splitserve.engine.sampling import Logprobs, SamplingParams, make_generator, sample_tokens
from splitserve.engine.sequence import PLACEHOLDER, Sequence
from splitserve.kvtransfer.layout import gather_layer, token_slots

log = logging.getLogger(__name__)


class Sampled(NamedTuple):
    token: int
    logprobs: dict[str, Any] | None


class Launched(NamedTuple):
    """A queued step: its samples are on the device (``tokens``, in the order of ``complete``)
    and on their way to the host (``host``, landed once ``ready`` has passed)."""

    seqs: list[Sequence]
    complete: list[int]  # indices into seqs of the sequences this step samples for
    tokens: torch.Tensor
    host: torch.Tensor
    ready: Any  # torch.cuda.Event | None
    logprobs: Logprobs | None  # of the sampled rows whose request asked for them
    row_of: dict[int, int]  # seq_id -> row of tokens
    in_graph_buffer: bool  # the decode graphs hold these samples too (keep_samples)


class ModelRunner:
    """``memory``: the device's memory counters (default: the CUDA device's; none on the CPU).
    With them, and neither ``num_kv_blocks`` nor ``kv_cache_memory_gb`` set, the KV cache is
    sized from the worker's share of the device (``engine.memory``); ``scheduler`` says how large
    the largest prefill is, whose activations the share must also hold."""

    def __init__(
        self,
        config: RunnerConfig,
        scheduler: SchedulerConfig | None = None,
        memory: DeviceMemory | None = None,
    ) -> None:
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model_dir)
        mc = self.model_config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current GPU, named
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.bind_thread()
        self.dtype = dtype_from_name(config.dtype or mc.torch_dtype)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.block_size = config.block_size
        self.graphs = None
        self._host_tokens = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()] if self.device.type == "cuda" else []
        self._flip = 0
        torch.manual_seed(config.seed)
        if memory is None and self.device.type == "cuda":
            memory = CudaMemory(self.device)
        self.memory = memory
        scheduler = scheduler or SchedulerConfig()
        prefill_tokens = largest_prefill(scheduler.max_num_batched_tokens, scheduler.chunked_prefill,
                                         self.max_model_len)
        plan = self._plan_before_load(prefill_tokens, scheduler.max_num_seqs)  # refuses an impossible share
        before_load = memory.allocated() if plan is not None else 0
        if config.random_weights:
            self.model = random_model(mc, self.dtype, self.device, config.seed)
        else:
            self.model = load_model(Path(config.model_dir), self.dtype, self.device, mc)
        if plan is not None:
            weights = memory.allocated() - before_load
            plan = plan.measure(weights, self._profile_prefill(prefill_tokens, scheduler.max_num_seqs))
            plan.check(self.bytes_per_block, self.max_model_len, self.block_size)
        self.num_blocks = config.num_kv_blocks or self._blocks_that_fit(plan)
        kv_bytes = (self.num_blocks + 1) * self.bytes_per_block
        if plan is not None:
            plan.check_free(memory.free(), kv_bytes)
        # One extra block past those the block manager hands out: padding rows of captured
        # decode graphs write there, never into a sequence's cache.
        self.kv_cache = torch.zeros(
            mc.num_layers, 2, self.num_blocks + 1, self.block_size, mc.num_kv_heads, mc.head_dim,
            dtype=self.dtype, device=self.device,
        )
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB) on %s",
                 self.num_blocks, self.block_size, kv_bytes / 2**20, self.device)
        graphs_used = self._capture_graphs() if config.cuda_graphs and self.device.type == "cuda" else None
        if plan is not None:
            log.info("%s", plan.describe(kv_bytes, graphs_used))
            if graphs_used is not None and graphs_used > plan.graphs:
                log.warning("the decode CUDA graphs took %.2f GiB, more than the %.2f GiB reserved for them: "
                            "lower --gpu-memory-utilization a little if the device runs out of memory",
                            graphs_used / 2**30, plan.graphs / 2**30)

    def _plan_before_load(self, prefill_tokens: int, max_batch: int) -> MemoryPlan | None:
        """The share's plan from the config alone (None when the cache is sized another way);
        raises ``MemoryBudgetError`` before any weight is loaded if it cannot work."""
        cfg = self.config
        if self.memory is None or cfg.num_kv_blocks is not None or cfg.kv_cache_memory_gb is not None:
            return None
        plan = estimate_plan(
            str(self.device), self.memory.total(), cfg.gpu_memory_utilization, self.model_config,
            self.dtype.itemsize, prefill_tokens, max_batch,
            cfg.max_num_seqs if cfg.cuda_graphs and self.device.type == "cuda" else None,
        )
        plan.check(self.bytes_per_block, self.max_model_len, self.block_size)
        return plan

    def _profile_prefill(self, tokens: int, max_batch: int) -> int:
        """Peak bytes allocated by a throwaway prefill of the largest batch (``tokens`` over as
        many prompts as a batch holds), over a scratch KV cache just large enough for it."""
        mc = self.model_config
        lengths = profile_lengths(tokens, max_batch, self.max_model_len)
        params = SamplingParams(max_tokens=1, temperature=0)
        seqs, next_block = [], 0
        for i, n in enumerate(lengths):
            seq = Sequence(f"memory-profile-{i}", [i % mc.vocab_size] * n, params)
            used = -(-n // self.block_size)
            seq.block_table, seq.num_scheduled_tokens = list(range(next_block, next_block + used)), n
            seqs.append(seq)
            next_block += used
        self.kv_cache = torch.zeros(mc.num_layers, 2, next_block + 1, self.block_size, mc.num_kv_heads,
                                    mc.head_dim, dtype=self.dtype, device=self.device)
        self.memory.reset_peak()
        before = self.memory.allocated()
        self.fetch(self.launch(seqs, is_prefill=True))
        peak = self.memory.peak() - before
        del self.kv_cache
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return max(0, peak)

    def _capture_graphs(self) -> int:
        """Capture the decode graphs; returns the bytes their pool took from the device."""
        from splitserve.engine.cuda_graphs import DecodeGraphs

        before = self.memory.reserved() if self.memory is not None else 0
        self.graphs = DecodeGraphs(
            self.model, self.kv_cache, self.config.max_num_seqs,
            -(-self.max_model_len // self.block_size), self.num_blocks * self.block_size,
        )
        return max(0, self.memory.reserved() - before) if self.memory is not None else 0

    def bind_thread(self) -> None:
        """Make this runner's GPU the calling thread's current device. Call it in every thread
        that runs steps: Triton launches, events and ``synchronize()`` without arguments use the
        current device, which is cuda:0 in a new thread whatever ``--device`` said."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def wait_idle(self) -> None:
        """Wait for every step queued on the GPU (after a failed step, before its blocks go back:
        an incoming KV transfer must not get a block that a queued write still targets)."""
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError as exc:  # a broken context runs nothing more
            log.warning("could not wait for the GPU after a failed step: %s", exc)

    @property
    def bytes_per_block(self) -> int:
        mc = self.model_config
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize

    def _blocks_that_fit(self, plan: MemoryPlan | None) -> int:
        """KV blocks: from ``kv_cache_memory_gb``, else the device share's plan, else (CPU)
        enough for 64 full-length sequences, at most 1 GiB."""
        if self.config.kv_cache_memory_gb is not None:
            budget = self.config.kv_cache_memory_gb * 2**30
        elif plan is not None:
            return plan.kv_blocks(self.bytes_per_block)  # plan.check() vouched for one sequence
        else:
            budget = min(2**30, 64 * self.max_model_len * self.bytes_per_block / self.block_size)
        blocks = int(budget // self.bytes_per_block)
        if blocks < min_kv_blocks(self.max_model_len, self.block_size):
            raise MemoryBudgetError(
                f"KV cache budget of {budget / 2**30:.2f} GiB holds {blocks} blocks, "
                f"too few for one {self.max_model_len}-token sequence"
            )
        return blocks

    def _tensor(self, data: list | np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Host values on this runner's device, so that building a step's inputs never waits
        for the GPU (``host_copy.to_device``)."""
        return to_device(data, self.device, dtype)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        # numpy per sequence, not Python per token: a 32 x 512-token batch took 12 ms of host
        # time to build token by token (on the critical path of every prefill)
        num_blocks = self.kv_cache.shape[2]
        ids, positions, slots, cu, last = [], [], [], [0], []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            ids.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
            positions.append(np.arange(start, end, dtype=np.int64))
            slots.append(token_slots(seq.block_table, end, self.block_size, num_blocks, start).numpy())
            cu.append(cu[-1] + end - start)
            last.append(cu[-1] - 1)
        streaming = [s for s in seqs if s.on_layer_kv is not None
                     and s.num_computed_tokens + s.num_scheduled_tokens == len(s)]
        meta = AttentionMetadata(
            is_prefill=True,
            layer_hook=self._layer_hook(streaming) if streaming else None,
            slot_mapping=self._tensor(np.concatenate(slots)),
            block_tables=self._block_tables(seqs),
            context_lens=self._tensor([s.num_computed_tokens + s.num_scheduled_tokens for s in seqs], torch.int32),
            cu_seqlens_q=self._tensor(cu, torch.int32),
            last_token_index=self._tensor(last),
        )
        return self._tensor(np.concatenate(ids)), self._tensor(np.concatenate(positions)), meta

    def _layer_hook(self, seqs: list[Sequence]) -> Callable[[int], None]:
        """Hand each streaming sequence its prompt's KV for a layer as soon as that layer has
        written it, so the transfer of layer i overlaps the computation of layer i+1."""

        slots = [self.wire_slots(s.block_table, s.num_prompt_tokens) for s in seqs]

        def hook(layer: int) -> None:
            for seq, seq_slots in zip(seqs, slots, strict=True):
                seq.on_layer_kv(layer, gather_layer(self.kv_cache, layer, seq_slots))

        return hook

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        n = len(seqs)
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=self._tensor([self._slot(s, len(s) - 1) for s in seqs]),
            block_tables=self._block_tables(seqs),
            context_lens=self._tensor([len(s) for s in seqs], torch.int32),
            cu_seqlens_q=self._tensor(list(range(n + 1)), torch.int32),
            last_token_index=self._tensor(list(range(n))),
        )
        return self._tensor([s.token_ids[-1] for s in seqs]), self._tensor([len(s) - 1 for s in seqs]), meta

    def _prev_rows(self, seqs: list[Sequence], prev: Launched | None) -> list[int] | None:
        """Where each sequence's input token sits among ``prev``'s samples (-1: the host has it);
        None when every token is on the host."""
        if not any(s.token_ids[-1] == PLACEHOLDER for s in seqs):
            return None
        if prev is None:
            raise RuntimeError("a sequence waits for a token, but no step is in flight")
        return [prev.row_of[s.seq_id] if s.token_ids[-1] == PLACEHOLDER else -1 for s in seqs]

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool, prev: Launched | None = None) -> Launched:
        """Queue a step: compute each sequence's scheduled tokens and sample the next token of
        each sequence that this step brings to its end. Returns at once on CUDA; ``fetch`` waits.

        A sequence whose last token is ``PLACEHOLDER`` takes its input from ``prev``'s samples
        on the device, so this step can be queued before ``prev``'s tokens reach the host."""
        prev_rows = self._prev_rows(seqs, prev)
        complete = [i for i, s in enumerate(seqs) if s.num_computed_tokens + s.num_scheduled_tokens == len(s)]
        # rows to sample, as a device index: indexing with a Python list would copy it from
        # pageable memory and wait for the GPU (the step in flight), killing the overlap
        chosen = self._tensor(complete) if len(complete) < len(seqs) else None
        if (
            not is_prefill
            and self.graphs is not None
            and self.graphs.can_run(len(seqs), max(len(s.block_table) for s in seqs))
            and (prev_rows is None or prev.in_graph_buffer)
        ):
            logits = self.graphs.run(
                [s.token_ids[-1] for s in seqs],
                [len(s) - 1 for s in seqs],
                [self._slot(s, len(s) - 1) for s in seqs],
                [len(s) for s in seqs],
                [s.block_table for s in seqs],
                prev_rows,
            )
            if chosen is not None:
                logits = logits.index_select(0, chosen)
        else:
            prepare = self.prepare_prefill if is_prefill else self.prepare_decode
            input_ids, positions, meta = prepare(seqs)
            if prev_rows is not None:
                # a waiting token is always its sequence's last scheduled one (the only token it
                # computes: a prompt chunk never waits), so it sits at last_token_index
                rows = torch.full_like(input_ids, -1)
                rows[meta.last_token_index] = self._tensor(prev_rows)
                input_ids = torch.where(rows >= 0, prev.tokens[rows.clamp(min=0)], input_ids)
            hidden = self.model(input_ids, positions, self.kv_cache, meta)
            rows = meta.last_token_index  # the LM head only for rows that sample
            logits = self.model.logits(hidden[rows if chosen is None else rows.index_select(0, chosen)])
        sampled = [seqs[i] for i in complete]
        for seq in sampled:
            if seq.generator is None and seq.sampling.seed is not None:
                seq.generator = make_generator(seq.sampling, self.device)
        # A failed step is run again (LLMEngine._isolate): seeded rows must draw the same again.
        seeded = [(s.generator, s.generator.get_state()) for s in sampled if s.generator is not None]
        try:
            tokens = sample_tokens(logits, [s.sampling for s in sampled], [s.generator for s in sampled])
            asked = [row for row, s in enumerate(sampled) if s.sampling.logprobs is not None]
            logprobs = None
            if asked:
                logprobs = Logprobs(logits, tokens, asked, [sampled[r].sampling.logprobs for r in asked])
                logprobs.to_host()
        except BaseException:
            for generator, state in seeded:
                generator.set_state(state)
            raise
        # every step leaves its samples for the graphs: the next step may be a captured decode
        in_graph_buffer = self.graphs is not None and self.graphs.keep_samples(tokens)
        host, ready = self._to_host(tokens)  # its event also covers the logprobs' copies
        return Launched(
            seqs, complete, tokens, host, ready, logprobs,
            {s.seq_id: row for row, s in enumerate(sampled)}, in_graph_buffer,
        )

    def _to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start the copy of a step's tokens into one of two pinned buffers (the step being
        fetched keeps the other), with an event that says when they have landed."""
        if self.device.type != "cuda":
            return tokens, None
        self._flip ^= 1
        buf, event = self._host_tokens[self._flip], self._copied[self._flip]
        if buf.numel() < len(tokens):
            buf = self._host_tokens[self._flip] = torch.empty(2 * len(tokens), dtype=torch.int64, pin_memory=True)
        host = buf[: len(tokens)]
        host.copy_(tokens, non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        return host, event

    @torch.inference_mode()
    def fetch(self, launched: Launched) -> list[Sampled | None]:
        """Wait for a launched step's tokens; one entry per sequence (None for a prompt chunk
        that is not the last), with logprobs where the request asked for them."""
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens = launched.host.tolist()
        logprobs = launched.logprobs.entries(tokens) if launched.logprobs is not None else {}
        out: list[Sampled | None] = [None] * len(launched.seqs)
        for row, i in enumerate(launched.complete):
            out[i] = Sampled(tokens[row], logprobs.get(row))
        return out

    def wire_slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slots of a request's tokens, on the device: what ``gather_layer`` reads to build
        the token-major wire layout of the KV transfer."""
        return token_slots(block_table, num_tokens, self.block_size, self.kv_cache.shape[2]).to(self.device)
