"""The planner: one SLO loop that sizes the prefill and decode pools together (pure function).

Each tick the operator's SLO loop (``slo_loop.py``) feeds it what the router measured over the
window and what it decided before; it returns the replicas to set and why. This module only
decides, it never reads metrics or writes Deployments.

- prefill: prompt tokens arriving per second / tokens per second one replica can prefill while
  keeping TTFT under target (profiled: ``prefill_tokens_per_s_at_ttft``);
- decode: concurrent sequences / sequences one replica can run while keeping TPOT under target
  (``decode_seqs_at_tpot``);
- a pool whose load is unknown (no prompt-token rate measured) holds its size: guessing would
  scale it to its minimum;
- both clamped to [min, max]; a scale-up happens at once (after its cooldown), a scale-down only
  after the stabilisation window has shown the lower value throughout and its cooldown passed,
  and never below the number of replicas that still hold running sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolBounds:
    min_replicas: int
    max_replicas: int

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, not {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True)
class Capacity:
    """Per-replica capacity at the SLO targets (from the profiled latency model)."""

    prefill_tokens_per_s_at_ttft: float
    decode_seqs_at_tpot: float

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s_at_ttft", "decode_seqs_at_tpot"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")


@dataclass(frozen=True)
class Observation:
    """What the pools measured over the window."""

    prompt_tokens_per_s: float | None  # None: not measured (prefill then holds its size)
    concurrent_seqs: float
    prefill_busy_replicas: int = 0  # replicas whose KV has not yet been taken by decode
    decode_busy_replicas: int = 0  # replicas with running sequences


@dataclass(frozen=True)
class PlannerConfig:
    prefill: PoolBounds
    decode: PoolBounds
    capacity: Capacity
    headroom: float = 0.8  # plan to run replicas at this fraction of their SLO capacity
    window_s: float = 60.0
    scale_up_cooldown_s: float = 60.0
    scale_down_cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], not {self.headroom}")


@dataclass(frozen=True)
class PoolState:
    """What the planner remembers about one pool between ticks."""

    replicas: int
    last_change_s: float = -math.inf
    # (time, raw desired) over the stabilisation window
    history: tuple[tuple[float, int], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Decision:
    prefill: int
    decode: int
    reasons: tuple[str, ...]
    prefill_state: PoolState
    decode_state: PoolState


def raw_desired(cfg: PlannerConfig, obs: Observation) -> tuple[int | None, int]:
    """Unbounded replicas each pool needs to meet its target with headroom (None: unknown)."""
    prefill = None
    if obs.prompt_tokens_per_s is not None:
        prefill = math.ceil(
            obs.prompt_tokens_per_s / (cfg.capacity.prefill_tokens_per_s_at_ttft * cfg.headroom)
        )
    decode = math.ceil(obs.concurrent_seqs / (cfg.capacity.decode_seqs_at_tpot * cfg.headroom))
    return prefill, decode


def _step(
    pool: str,
    state: PoolState,
    want: int | None,
    bounds: PoolBounds,
    busy: int,
    now: float,
    cfg: PlannerConfig,
) -> tuple[PoolState, str]:
    if want is None:
        return state, f"{pool}: load not measured, holding at {state.replicas}"
    target = bounds.clamp(want)
    history = tuple((t, n) for t, n in state.history if now - t < cfg.window_s) + ((now, target),)
    current = state.replicas
    if target > current:
        if now - state.last_change_s < cfg.scale_up_cooldown_s:
            return PoolState(current, state.last_change_s, history), f"{pool}: up-cooldown"
        return PoolState(target, now, history), f"{pool}: {current}->{target} (need {want})"
    if target < current:
        # the highest value the window has seen: scale down only as far as it allows
        stable = max(n for _, n in history)
        floor = max(stable, bounds.clamp(busy))
        if floor >= current:
            return PoolState(current, state.last_change_s, history), f"{pool}: stabilising"
        if now - state.last_change_s < cfg.scale_down_cooldown_s:
            return PoolState(current, state.last_change_s, history), f"{pool}: down-cooldown"
        return PoolState(floor, now, history), f"{pool}: {current}->{floor} (need {want})"
    return PoolState(current, state.last_change_s, history), f"{pool}: steady at {current}"


def plan(
    cfg: PlannerConfig,
    obs: Observation,
    prefill: PoolState,
    decode: PoolState,
    now: float,
) -> Decision:
    """One tick: the replicas to set for both pools, the reasons, and the state to keep."""
    want_p, want_d = raw_desired(cfg, obs)
    p_state, p_reason = _step(
        "prefill", prefill, want_p, cfg.prefill, obs.prefill_busy_replicas, now, cfg
    )
    d_state, d_reason = _step(
        "decode", decode, want_d, cfg.decode, obs.decode_busy_replicas, now, cfg
    )
    return Decision(p_state.replicas, d_state.replicas, (p_reason, d_reason), p_state, d_state)
