"""Continuous-batching scheduler: decides which sequences run in the next step and how many of
their tokens; never touches tensors.

Without chunked prefill (the disaggregated workers) a step is either a prefill batch (waiting
prompts, whole, up to a token budget) or a decode batch (every running sequence advances one
token); prefill goes first so new requests start quickly. With chunked prefill (the colocated
baseline, as in vLLM and DeepSpeed-FastGen's split-fuse) every step carries all running decodes
plus prompt chunks that fill the rest of the token budget, so long prompts never stall decodes
for a whole prefill. When the cache runs out during decode, the most recently started sequence is
preempted back to the queue and recomputed later, so running requests always make progress.

Blocks and steps in flight. The engine may queue a step before the previous one is done
(``begin_step``/``settle``); a sequence that finishes or is aborted meanwhile may still be in a
queued step, which will write its cache slot. Its blocks are held until every step queued when
it left has settled, so no other request (or an incoming KV transfer) is handed a block that a
queued step still writes.
"""

from __future__ import annotations

from collections import deque

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.config import SchedulerConfig
from splitserve.engine.sequence import SeqStatus, Sequence


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.launched = 0  # steps queued so far
        self.settled = 0  # steps known done
        self._held: dict[int, tuple[int, Sequence]] = {}  # seq_id -> (step it waits for, seq)

    def begin_step(self) -> int:
        """A step is being queued; returns its number."""
        self.launched += 1
        return self.launched

    def settle(self, step: int) -> None:
        """Steps up to ``step`` are done: free the blocks that waited for them."""
        self.settled = max(self.settled, step)
        for seq_id, (wait_for, seq) in list(self._held.items()):
            if wait_for <= self.settled:
                del self._held[seq_id]
                self.blocks.free(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.seq_id in self._held:
            return
        if self.launched > self.settled:
            self._held[seq.seq_id] = (self.launched, seq)
        else:
            self.blocks.free(seq)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose prompt KV is already in its blocks (received from a prefill worker)."""
        if not seq.block_table:
            raise ValueError("add_running needs a sequence with allocated blocks")
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def can_admit(self) -> bool:
        """Whether the next whole-prompt prefill batch would start now (the first waiting
        prompt fits in the batch and the cache), as ``_schedule_prefill`` decides."""
        return (
            bool(self.waiting)
            and len(self.running) < self.config.max_num_seqs
            and self.blocks.can_allocate(self.waiting[0])
        )

    @property
    def queued_prompt_tokens(self) -> int:
        return sum(len(s) for s in self.waiting)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The next batch and whether it needs the prefill path (some sequence computes more than
        one token); empty when nothing can run. Sets each sequence's ``num_scheduled_tokens``."""
        if self.config.chunked_prefill:
            return self._schedule_mixed()
        batch = self._schedule_prefill()
        if batch:
            return batch, True
        return self._schedule_decode(), False

    def _schedule_mixed(self) -> tuple[list[Sequence], bool]:
        budget = self.config.max_num_batched_tokens
        decoding, chunking = self._partition()
        batch = self._schedule_decode(chunking) if decoding else []
        budget -= len(batch)
        for seq in chunking:  # prompts already started continue before new ones begin
            if budget <= 0 or seq not in self.running:
                break
            seq.num_scheduled_tokens = min(seq.num_uncomputed_tokens, budget)
            budget -= seq.num_scheduled_tokens
            batch.append(seq)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            seq.num_scheduled_tokens = min(seq.num_uncomputed_tokens, budget)
            budget -= seq.num_scheduled_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(self.waiting.popleft())
            batch.append(seq)
        return batch, any(s.num_scheduled_tokens > 1 for s in batch)

    def _schedule_prefill(self) -> list[Sequence]:
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # An over-budget prompt still runs alone, so no prompt can starve.
            if batch and tokens + len(seq) > self.config.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            seq.num_scheduled_tokens = seq.num_uncomputed_tokens
            tokens += seq.num_scheduled_tokens
            seq.status = SeqStatus.RUNNING
            batch.append(self.waiting.popleft())
        self.running.extend(batch)
        return batch

    def _partition(self) -> tuple[list[Sequence], list[Sequence]]:
        """Running sequences that decode (one token to compute) and those mid-prompt (chunked)."""
        decoding: list[Sequence] = []
        chunking: list[Sequence] = []
        for seq in self.running:
            n = len(seq.token_ids) - seq.num_computed_tokens  # num_uncomputed_tokens, inlined
            if n == 1:
                decoding.append(seq)
            elif n > 1:
                chunking.append(seq)
        return decoding, chunking

    def _schedule_decode(self, chunking: list[Sequence] | None = None) -> list[Sequence]:
        """One token for each running sequence whose prompt is computed (all of them, unless
        chunked prefill left some mid-prompt (``chunking``, found here unless given): those stay
        in ``running`` untouched)."""
        batch: list[Sequence] = []
        if chunking is None:
            chunking = self._partition()[1]
        for seq in chunking:
            self.running.remove(seq)
        running, max_seqs, try_append_slot = self.running, self.config.max_num_seqs, self.blocks.try_append_slot
        while running and len(batch) < max_seqs:
            seq = running.popleft()
            while not try_append_slot(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                seq.num_scheduled_tokens = 1
                batch.append(seq)
        self.running.extendleft(reversed(batch))
        self.running.extend(chunking)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        if self.launched > self.settled:  # the engine settles before any step that may preempt
            raise RuntimeError("cannot preempt while a step is in flight")
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Leave the batch; blocks are freed unless the sequence is prefill-only (the worker frees
        them once its KV has been handed over)."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq.prefill_only and reason != "abort":
            seq.status = SeqStatus.PREFILLED
            return
        self._free(seq)
        seq.status = SeqStatus.FINISHED

    def release(self, seq: Sequence) -> None:
        """Free a PREFILLED sequence's blocks after its transfer succeeded or failed."""
        self._free(seq)
        seq.status = SeqStatus.FINISHED

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (queued, running, prefilled, or holding blocks reserved
        for a transfer) and free whatever it holds. A no-op for a finished sequence (its blocks
        are already freed, or held for a step in flight), so a worker may abort it in any state."""
        if seq.status == SeqStatus.FINISHED:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.block_table:
            self._free(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
