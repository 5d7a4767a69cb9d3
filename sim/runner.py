"""The model runner's stand-in: an engine step costs time from the latency model instead of
computing tokens, so the real ``LLMEngine`` (scheduler, block manager, stop rules) runs
without a model.

It follows ``ModelRunner``'s contract as the engine uses it: ``launch`` a step (the sequences
that this step brings to their end sample a token), ``fetch`` its samples, ``wait_idle``; the
attributes the engine reads (``device``, ``model_config``, ``block_size``, ``num_blocks``,
``max_model_len``). Every sampled token is ``TOKEN``, never an end of sequence: the bench sends
``ignore_eos`` and a fixed ``max_tokens``, so only the length ends a request, in both worlds.
When the latency model has a measured ``step_ratio`` spread, each step's cost is the model's
prediction times a ratio drawn from it (a seeded generator per worker: runs repeat exactly).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple

import torch
from splitserve.engine.config import EngineConfig, RunnerConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sequence import Sequence
from splitserve.router.policy.latency import LatencyModel
from splitserve.sim.costs import step_ms

TOKEN = 1
VOCAB = 1 << 30  # prompt ids are drawn from here: two prompts share a block only by design


class SimSample(NamedTuple):
    token: int
    logprobs: dict | None = None


_SAMPLE = SimSample(TOKEN)


class SimLaunched(NamedTuple):
    seqs: list[Sequence]
    complete: list[int]
    row_of: dict[int, int]
    ms: float  # what the step costs


@dataclass
class TimingRunner:
    """Costs each launched step; ``last_ms`` is the most recent step's cost."""

    latency: LatencyModel
    num_blocks: int
    block_size: int = 16
    max_model_len: int = 1 << 20
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_config: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(vocab_size=VOCAB, eos_token_ids=(), num_layers=1))
    last_ms: float = 0.0
    rng: random.Random | None = None  # draws the step-time spread (None: the model has none)

    def launch(self, seqs: list[Sequence], is_prefill: bool, prev: SimLaunched | None = None) -> SimLaunched:
        if is_prefill:
            complete = [i for i, s in enumerate(seqs)
                        if s.num_computed_tokens + s.num_scheduled_tokens == len(s.token_ids)]
        else:  # a decode step computes each sequence's last token
            complete = list(range(len(seqs)))
        self.last_ms = step_ms(self.latency, seqs, is_prefill)
        if self.rng is not None:
            self.last_ms *= self.rng.choice(self.latency.step_ratio)
        return SimLaunched(seqs, complete, {seqs[i].seq_id: row for row, i in enumerate(complete)}, self.last_ms)

    def fetch(self, launched: SimLaunched) -> list[SimSample | None]:
        if len(launched.complete) == len(launched.seqs):  # every row samples (a decode step)
            return [_SAMPLE] * len(launched.seqs)
        out: list[SimSample | None] = [None] * len(launched.seqs)
        for i in launched.complete:
            out[i] = _SAMPLE
        return out

    def wait_idle(self) -> None:
        """Nothing runs asynchronously here."""


@dataclass(frozen=True)
class EngineShape:
    """What a simulated worker's engine is configured with (the worker options that matter)."""

    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 1 << 20

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")


def sim_engine(shape: EngineShape, latency: LatencyModel, chunked_prefill: bool, seed: str = "") -> LLMEngine:
    """A real engine (synchronous steps) over a ``TimingRunner``; ``seed`` seeds its step-time
    spread (give each worker its own)."""
    runner = TimingRunner(latency, shape.num_blocks, shape.block_size, shape.max_model_len,
                          rng=random.Random(seed) if latency.step_ratio else None)
    config = EngineConfig(
        RunnerConfig(model_dir="(simulated)", block_size=shape.block_size,
                     num_kv_blocks=shape.num_blocks, max_model_len=shape.max_model_len,
                     max_num_seqs=shape.max_num_seqs),
        SchedulerConfig(shape.max_num_seqs, shape.max_num_batched_tokens, chunked_prefill),
        overlap=False,
    )
    return LLMEngine(config, runner=runner)  # type: ignore[arg-type]  # the runner seam
