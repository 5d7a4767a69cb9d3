"""The engine: scheduler + model runner + stop rules, one step at a time.

Overlap. On CUDA a decode step is queued before the previous step's tokens have reached the host:
the new step reads them on the device (each sequence carries a ``PLACEHOLDER`` until its token
lands), and the host turns the previous step's tokens into outputs (stop checks, prefix-cache
commits, freeing) while the GPU computes. So outputs come one ``step()`` call after their step was
queued, a finished sequence may ride one extra step (its sample is dropped), and the scheduler
holds freed blocks until the steps that may still write them are done. With chunked prefill
(the colocated baseline) mixed steps overlap too, so the baseline gets the same help. Before
anything that needs the exact state (a whole-prompt prefill, a possible preemption, a sequence at
its length limit) the engine settles the step in flight first, as a synchronous
engine would.

Three roles share it. A *colocated* engine prefills and decodes (the baseline, and the decode
worker's recompute path). A *prefill* engine stops each sequence after its first token and keeps
its blocks until the worker has shipped the KV (``release``). A *decode* engine also takes
sequences whose prompt KV arrived from a prefill worker (``reserve`` then ``activate``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from splitserve.engine.block_manager import BlockManager, NoFreeBlocks
from splitserve.engine.config import EngineConfig, RunnerConfig, SchedulerConfig
from splitserve.engine.runner import Launched, ModelRunner
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import PLACEHOLDER, SeqStatus, Sequence
from splitserve.engine.stopping import StopChecker
from splitserve.protocol import LoadReport

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "LLMEngine", "RunnerConfig", "SchedulerConfig", "StepOutput", "StepStats"]


class StepOutput(NamedTuple):
    """One sampled token of one sequence (one per token per step: a tuple, cheap to build)."""

    seq: Sequence
    token_id: int
    finished: bool
    logprobs: dict | None = None  # {"token_id", "logprob", "top": [[id, logprob], ...]} when asked
    error: Exception | None = None  # this sequence failed (and only it): token_id is meaningless


@dataclass(frozen=True)
class StepStats:
    """What one step did and how long it took: feeds metrics and the latency profile."""

    is_prefill: bool
    num_seqs: int
    num_tokens: int  # tokens computed (prefill: uncached prompt tokens; decode: one per sequence)
    context_tokens: int  # tokens attended over, summed over the batch
    seconds: float


@dataclass
class _Step:
    """A queued step and what its outputs need once its tokens land."""

    number: int
    launched: Launched
    is_prefill: bool
    computed: int
    context: int
    started: float
    token_index: dict[int, int]  # seq_id -> index in token_ids of the token this step samples


class PromptTooLong(ValueError):
    """The prompt leaves no room in the context for a generated token."""


def load_tokenizer(model_path: str | Path):
    """The model's fast tokenizer (from tokenizer.json or a GGUF), or None when it has none."""
    from splitserve.modelfiles.read import read_tokenizer

    return read_tokenizer(model_path)


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        """``runner``: a stand-in for the model runner (the simulator's, which costs steps
        instead of computing them); by default the real one, built from ``config.runner``."""
        self.config = config
        self.runner = runner if runner is not None else ModelRunner(config.runner, config.scheduler)
        self.blocks = BlockManager(self.runner.num_blocks, self.runner.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.tokenizer = load_tokenizer(config.runner.model_dir)
        self.stopper = StopChecker(self.tokenizer, self.eos_token_ids(), self.runner.max_model_len)
        self.step_observers: list[Callable[[StepStats], None]] = []
        overlap = config.overlap
        self.overlap = self.runner.device.type == "cuda" if overlap is None else overlap
        log.info("engine on %s: steps %s", self.runner.device,
                 "overlapped (each queued before the previous one's tokens reach the host)"
                 if self.overlap else "synchronous")
        self._in_flight: _Step | None = None
        self._early: list[StepOutput] = []  # outputs of a step settled between two step() calls
        self._last_done = 0.0

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.runner.model_config.eos_token_ids)
        gen = Path(self.config.runner.model_dir) / "generation_config.json"
        if gen.is_file():
            import json

            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return tuple(sorted(ids))

    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLong(
                f"the prompt has {len(token_ids)} tokens; the context is {self.max_model_len} "
                "tokens and needs room for at least one generated token"
            )
        self.check_tokens(token_ids, "prompt")

    def check_tokens(self, token_ids: list[int], what: str) -> None:
        """Token ids must index the embedding: one out of range would fail the whole batch's
        step, so it is refused here, for its own request only."""
        vocab = self.runner.model_config.vocab_size
        if not token_ids or (set(map(type, token_ids)) <= {int} and 0 <= min(token_ids)
                             and max(token_ids) < vocab):
            return  # the usual case, checked in C: plain ints, all in range
        bad = [t for t in token_ids if isinstance(t, bool) or not hasattr(t, "__index__")
               or not 0 <= t.__index__() < vocab]
        if bad:
            raise ValueError(f"{what} token ids out of the vocabulary (size {vocab}): {bad[:5]}")

    def add(self, seq: Sequence) -> None:
        """Queue a sequence for prefill (then decode, unless it is prefill-only)."""
        self.check_prompt(seq.prompt_token_ids)
        self.scheduler.add(seq)

    def reserve(self, seq: Sequence) -> list[int]:
        """Allocate private blocks for a prompt whose KV a transfer will fill; returns the table."""
        self.check_prompt(seq.prompt_token_ids)
        if not self.blocks.can_allocate(seq, use_prefix_cache=False) and self._in_flight is not None:
            # blocks of sequences that finished meanwhile are held until the step in flight is
            # done: settle it now (its outputs go out with the next step's)
            self._early += self._finish(self._in_flight)
        if not self.blocks.can_allocate(seq, use_prefix_cache=False):
            raise NoFreeBlocks(
                f"no room for {len(seq)} tokens: {self.blocks.num_free_blocks} free blocks of "
                f"{self.blocks.block_size}"
            )
        self.blocks.allocate(seq, use_prefix_cache=False)
        return list(seq.block_table)

    def activate(self, seq: Sequence, first_token: int, logprobs: dict | None = None) -> StepOutput:
        """The prompt KV has landed: append the prefill worker's first token and start decoding
        (``logprobs``: the first token's, as the prefill worker computed them, when asked).
        A first token outside the vocabulary raises ValueError (the caller then frees the blocks)."""
        self.check_tokens([first_token], "first")
        seq.num_computed_tokens = len(seq)
        self.blocks.commit(seq)  # the received KV is real now: later prompts may reuse it
        seq.token_ids.append(first_token)
        self.scheduler.add_running(seq)
        return self._after_token(seq, first_token, logprobs)

    def release(self, seq: Sequence) -> None:
        self.scheduler.release(seq)

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)
        if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:  # its token will never be read
            seq.token_ids.pop()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None or bool(self._early)

    def step(self) -> list[StepOutput]:
        """Queue the next step; return the outputs of the steps that finished meanwhile (with
        overlap, the previous one; without, this one)."""
        try:
            return self._step()
        except BaseException:
            # A failed step leaves nothing in flight: the requests in it are failed by the
            # caller, and the blocks they held go back once the GPU has nothing queued that
            # could still write them.
            self._in_flight = None
            self.runner.wait_idle()
            self.scheduler.settle(self.scheduler.launched)
            raise

    def flush(self) -> list[StepOutput]:
        """Wait for the step in flight, if any, and return its outputs: afterwards every block a
        finished or aborted sequence held is free again."""
        return self._finish(self._in_flight) if self._in_flight is not None else []

    def _step(self) -> list[StepOutput]:
        outputs, self._early = self._early, []
        prev = self._in_flight
        if prev is not None and not self._can_overlap(prev):
            outputs += self._finish(prev)
            prev = None
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            if prev is not None:
                outputs += self._finish(prev)
            return outputs
        try:
            step = self._launch(seqs, is_prefill, prev)
        except Exception as exc:  # noqa: BLE001 - isolated: only the sequences at fault fail
            return outputs + self._isolate(seqs, is_prefill, prev, exc)
        if prev is not None:
            outputs += self._finish(prev)
        self._mark_launched(step)
        self._in_flight = step
        if not self._stays_in_flight(step):
            outputs += self._finish(step)
        return outputs

    def _launch(self, seqs: list[Sequence], is_prefill: bool, prev: _Step | None) -> _Step:
        """Queue a step of ``seqs`` (sequence state is updated by ``_mark_launched``, once the
        previous step's outputs are out). If the runner raises, the step's number is settled."""
        started = time.perf_counter()
        number = self.scheduler.begin_step()
        try:
            launched = self.runner.launch(seqs, is_prefill, prev.launched if prev else None)
        except BaseException:
            self.runner.wait_idle()  # nothing it queued may still write a block that goes back
            self.scheduler.settle(number)
            raise
        return _Step(
            number, launched, is_prefill, sum([s.num_scheduled_tokens for s in seqs]),
            sum([len(s.token_ids) for s in seqs]), started, {},
        )

    @staticmethod
    def _mark_launched(step: _Step) -> None:
        """The step's tokens are computed (or will be): each sampling sequence gets a placeholder
        for its token."""
        row_of, token_index, running = step.launched.row_of, step.token_index, SeqStatus.RUNNING
        for seq in step.launched.seqs:
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if seq.seq_id in row_of and seq.status is running:
                token_index[seq.seq_id] = len(seq.token_ids)
                seq.token_ids.append(PLACEHOLDER)

    def _isolate(
        self, seqs: list[Sequence], is_prefill: bool, prev: _Step | None, exc: Exception
    ) -> list[StepOutput]:
        """A step raised: fail only the sequence(s) that made it raise, never the batch.

        Runs the batch again in halves, recursively, each group as a step of its own and run to
        its end: a group that passes gives its sequences their tokens (the same ones: a step
        computes each sequence on its own, the runner restores seeded generators that a failed
        step advanced, and a re-sent prompt layer is the one already sent), and a sequence that
        fails alone is failed with the error. A bad request costs O(log batch) extra steps."""
        log.warning("a step of %d sequences failed (%s); finding the sequence(s) at fault", len(seqs), exc)
        outputs = self._finish(prev) if prev is not None else []  # placeholders land first
        if len(seqs) == 1:
            return [*outputs, self._fail(seqs[0], exc)]
        half = len(seqs) // 2
        groups = [seqs[half:], seqs[:half]]  # a stack: the first half runs first
        while groups:
            group = [s for s in groups.pop() if s.status == SeqStatus.RUNNING]
            if not group:
                continue
            try:
                step = self._launch(group, is_prefill, None)
            except Exception as group_exc:  # noqa: BLE001 - narrowed down further, or failed alone
                if len(group) == 1:
                    outputs.append(self._fail(group[0], group_exc))
                else:
                    half = len(group) // 2
                    groups += [group[half:], group[:half]]
                continue
            self._mark_launched(step)
            outputs += self._finish(step)
        return outputs

    def _fail(self, seq: Sequence, exc: Exception) -> StepOutput:
        """End ``seq`` alone with ``exc``: its blocks go back, the batch runs on."""
        log.warning("request %s failed in the engine: %s", seq.request_id, exc)
        self.abort(seq)
        seq.finish_reason = "error"
        return StepOutput(seq, PLACEHOLDER, True, error=exc)

    def _can_overlap(self, prev: _Step) -> bool:
        """Whether the next step may be queued before ``prev``'s tokens are known: its scheduling
        must need no token values (no preemption, no sequence at its length limit) and, without
        chunked prefill, it must be a decode step (a whole-prompt prefill runs on settled state).
        With chunked prefill, prompt chunks ride along: their tokens are the prompt's."""
        sched, blocks = self.scheduler, self.blocks
        if not self.overlap or (not self.config.scheduler.chunked_prefill and sched.can_admit()):
            return False
        new_blocks = 0
        for seq in sched.running:
            if seq.num_uncomputed_tokens != 1:
                if not self.config.scheduler.chunked_prefill:
                    return False
                continue  # a prompt mid-chunking: its blocks are allocated
            if seq.num_output_tokens >= seq.sampling.max_tokens or len(seq) >= self.max_model_len:
                return False
            new_blocks += blocks.needs_block(seq)
        return new_blocks <= blocks.num_free_blocks

    def _stays_in_flight(self, step: _Step) -> bool:
        """Whether ``step`` may run on while the next one is queued: not a prefill-only step (its
        worker ships the KV as soon as the first token is known), and a prefill step only among
        chunked ones."""
        return (
            self.overlap
            and (not step.is_prefill or self.config.scheduler.chunked_prefill)
            and not any(s.prefill_only for s in step.launched.seqs)
        )

    def _finish(self, step: _Step) -> list[StepOutput]:
        """Wait for ``step``'s tokens and turn them into outputs."""
        sampled = self.runner.fetch(step.launched)
        if self._in_flight is step:
            self._in_flight = None
        self.scheduler.settle(step.number)
        done = time.perf_counter()
        # With overlap the step was queued while the previous one ran: it took from then on.
        seconds = done - max(step.started, self._last_done)
        self._last_done = done
        if self.step_observers:  # none in the simulator, which runs ~100k steps a minute
            stats = StepStats(step.is_prefill, len(step.launched.seqs), step.computed, step.context, seconds)
            for observe in self.step_observers:
                observe(stats)
        outputs = []
        running, token_index, commit = SeqStatus.RUNNING, step.token_index, self.blocks.commit
        # A decode step computes one token per sequence: it fills a block only when a
        # sequence's computed count reaches a multiple of the block size; a prefill step may
        # fill any number, so every sequence is committed.
        bs = 1 if step.is_prefill else self.blocks.block_size
        for seq, result in zip(step.launched.seqs, sampled, strict=True):
            if seq.status is not running:
                continue  # it finished (or was aborted) while this step ran: its sample is dropped
            index = token_index.get(seq.seq_id)
            if index is not None:
                seq.token_ids[index] = result.token
            if not seq.num_computed_tokens % bs:
                commit(seq)  # a prompt chunk's full blocks are reusable at once too
            if index is not None:
                try:
                    outputs.append(self._after_token(seq, result.token, result.logprobs))
                except Exception as exc:  # noqa: BLE001 - e.g. a stop check: fails this one only
                    outputs.append(self._fail(seq, exc))
        return outputs

    def _after_token(self, seq: Sequence, token: int, logprobs: dict | None = None) -> StepOutput:
        if seq.prefill_only:
            self.scheduler.finish(seq, "prefilled")
            return StepOutput(seq, token, True, logprobs)
        decision = self.stopper.check(seq)
        if decision is None:
            return StepOutput(seq, token, False, logprobs)
        seq.stop_string = decision.stop_string
        self.scheduler.finish(seq, decision.reason)
        return StepOutput(seq, token, True, logprobs)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """Run prompts to completion, batched; returns each one's generated token ids."""
        seqs = [Sequence(f"gen-{i}", list(p), sampling) for i, p in enumerate(prompts)]
        for seq in seqs:
            self.add(seq)
        while self.has_work():
            self.step()
        return [s.output_token_ids for s in seqs]

    def load(self) -> LoadReport:
        """Live load, as workers report it on ``GET /load``."""
        return LoadReport(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            queued_prompt_tokens=self.scheduler.queued_prompt_tokens,
            free_blocks=self.blocks.num_free_blocks,
            total_blocks=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            max_model_len=self.max_model_len,
        )
