"""The planner: one SLO loop that sizes the prefill and decode pools together (pure functions).

Each tick the operator's SLO loop (``slo_loop.py``) feeds it what the router and the pools
measured over the window and what it decided before; it returns the replicas to set and why. This
module only decides, it never reads metrics or writes Deployments. What each pool needs:

- prefill: prompt tokens arriving per second, plus the prompt tokens already waiting drained
  within the TTFT target, over the tokens per second one replica prefills at the TTFT target
  (``prefill_tokens_per_s_at_ttft``);
- decode: concurrent sequences over the sequences one replica runs at the TPOT target
  (``decode_seqs_at_tpot``);
- each divided by ``headroom`` (plan to run replicas below their SLO capacity) and multiplied by
  the pool's **margin**, the feedback term: a window whose attainment of the pool's own target
  (TTFT for prefill, TPOT for decode) is under ``target_attainment`` raises it one step, one
  comfortably over lowers it half a step, within [margin_min, margin_max]; by default never
  below 1, because a margin under 1 spends the headroom, which is what covers a ramp while the
  new pods start (bench/RESULTS.md, "The planner over a simulated day");
- a pool whose load is unknown (no prompt-token rate measured) holds its size: guessing would
  scale it to its minimum.

How it stays stable and still scales ahead of a ramp (the failures users report of planners that
size from the last window alone: flapping 2<->1 at constant load, lagging every ramp by the pods'
start time, a floor that never lets go once traffic stops, estimates blind to queues):

- **scale up** when the need has held over the whole up-window (``scale_up_window_s``: the
  smallest raw demand seen there), so a burst shorter than the window changes nothing; or at
  once when the **forecast** says so: Holt's linear trend on the demand, damped, projected the
  pods' start time ahead (``lead_time_s``), counted only while the trend has been rising at every
  tick of the up-window; or at once when the pool is **falling behind** (its queue is older than
  the TTFT target, or the window missed the attainment target);
- **scale down** only once a whole down-window (``window_s``) has been observed, only as far as
  the largest need seen over it, computed at a lower utilisation than scale-up uses (``hysteresis``),
  after the down-cooldown, and never below the replicas still holding running sequences; with no
  traffic at all the need is zero, so pools return to their minimum;
- both clamped to [min, max]; one decision per tick, with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


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
    queued_prompt_tokens: float = 0.0  # prompt tokens waiting for a prefill (router + workers)
    oldest_wait_s: float = 0.0  # age of the oldest request still waiting for its first token
    ttft_attainment: float | None = None  # share of the window's requests within TTFT
    tpot_attainment: float | None = None  # share of the window's requests within TPOT


@dataclass(frozen=True)
class PlannerConfig:
    prefill: PoolBounds
    decode: PoolBounds
    capacity: Capacity
    headroom: float = 0.8  # plan to run replicas at this fraction of their SLO capacity
    window_s: float = 60.0  # scale-down stabilisation window (the largest need seen there)
    scale_up_cooldown_s: float = 60.0
    scale_down_cooldown_s: float = 300.0
    scale_up_window_s: float = 0.0  # the need must hold this long (0: scale up at once)
    hysteresis: float = 0.85  # scale-down sizes at headroom x this: no flapping at a boundary
    lead_time_s: float = 120.0  # how long a new replica takes to serve: the forecast's horizon
    ttft_target_s: float = 1.0  # queued prompt tokens must drain within this
    target_attainment: float = 0.9
    margin_step: float = 0.1
    margin_min: float = 1.0  # comfort takes back what misses added, never the headroom itself
    margin_max: float = 2.0
    alpha: float = 0.5  # Holt's level smoothing
    beta: float = 0.3  # Holt's trend smoothing
    damping: float = 0.9  # the trend's weight fades over the horizon (damped Holt)

    def __post_init__(self) -> None:
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], not {self.headroom}")
        if not 0 < self.hysteresis <= 1:
            raise ValueError(f"hysteresis must be in (0, 1], not {self.hysteresis}")
        if not 0 < self.margin_min <= 1 <= self.margin_max:
            raise ValueError("margin bounds must satisfy 0 < margin_min <= 1 <= margin_max")
        for name in ("alpha", "beta", "damping"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], not {getattr(self, name)}")


@dataclass(frozen=True)
class Forecast:
    """Holt's linear trend of one pool's demand (units per second of trend), damped."""

    level: float | None = None
    trend: float = 0.0  # demand units per second
    time: float = -math.inf
    rising: int = 0  # consecutive updates with a positive trend

    def update(self, x: float, now: float, cfg: PlannerConfig) -> Forecast:
        if self.level is None or not math.isfinite(self.time) or now <= self.time:
            return Forecast(x, 0.0, now, 0)
        dt = now - self.time
        level = cfg.alpha * x + (1 - cfg.alpha) * (self.level + self.trend * dt)
        trend = cfg.beta * (level - self.level) / dt + (1 - cfg.beta) * self.trend
        return Forecast(level, trend, now, self.rising + 1 if trend > 0 else 0)

    def ahead(self, horizon_s: float, dt: float, cfg: PlannerConfig) -> float:
        """The demand ``horizon_s`` ahead: level plus the damped trend (never below 0, never
        more than twice the level: one noisy tick must not order a fleet)."""
        if self.level is None:
            return 0.0
        steps = max(1, round(horizon_s / dt)) if dt > 0 else 1
        damped = sum(cfg.damping ** k for k in range(1, steps + 1)) * self.trend * (horizon_s / steps)
        return max(0.0, min(self.level + damped, 2 * max(self.level, 0.0)))


@dataclass(frozen=True)
class PoolState:
    """What the planner remembers about one pool between ticks."""

    replicas: int
    last_change_s: float = -math.inf
    # (time, scale-down target) over the stabilisation window
    history: tuple[tuple[float, int], ...] = field(default_factory=tuple)
    # (time, raw demand) over the scale-up window
    demand: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    forecast: Forecast = field(default_factory=Forecast)
    margin: float = 1.0
    observed_since: float = math.inf  # the first tick with a measured load (a full window first)


@dataclass(frozen=True)
class Decision:
    prefill: int
    decode: int
    reasons: tuple[str, ...]
    prefill_state: PoolState
    decode_state: PoolState


@dataclass(frozen=True)
class PoolInput:
    """One pool's view of a tick, in its own demand units (prompt tokens/s or sequences)."""

    name: str
    demand: float | None  # None: not measured
    per_replica: float  # demand one replica serves at the SLO target
    busy: int
    behind: bool  # queue older than the target or attainment missed: no waiting
    attainment: float | None
    bounds: PoolBounds


def raw_desired(cfg: PlannerConfig, obs: Observation) -> tuple[int | None, int]:
    """Unbounded replicas each pool needs now, at ``headroom``, before feedback and forecast
    (None: unknown)."""
    p, d = pool_inputs(cfg, obs)
    need = [None if x.demand is None else math.ceil(x.demand / (x.per_replica * cfg.headroom))
            for x in (p, d)]  # fmt: skip
    return need[0], need[1] if need[1] is not None else 0


def pool_inputs(cfg: PlannerConfig, obs: Observation) -> tuple[PoolInput, PoolInput]:
    """Each pool's demand: prefill's includes draining the queued prompt tokens in time."""
    prefill_demand = None
    if obs.prompt_tokens_per_s is not None:
        prefill_demand = obs.prompt_tokens_per_s + obs.queued_prompt_tokens / cfg.ttft_target_s
    missed = (lambda a: a is not None and a < cfg.target_attainment)  # noqa: E731
    cap = cfg.capacity
    return (
        PoolInput("prefill", prefill_demand, cap.prefill_tokens_per_s_at_ttft,
                  obs.prefill_busy_replicas,
                  obs.oldest_wait_s > cfg.ttft_target_s or missed(obs.ttft_attainment),
                  obs.ttft_attainment, cfg.prefill),
        PoolInput("decode", obs.concurrent_seqs, cap.decode_seqs_at_tpot,
                  obs.decode_busy_replicas, missed(obs.tpot_attainment), obs.tpot_attainment,
                  cfg.decode),
    )  # fmt: skip


def _margin(state: PoolState, attainment: float | None, cfg: PlannerConfig) -> float:
    if attainment is None:
        return state.margin
    if attainment < cfg.target_attainment:
        return min(cfg.margin_max, state.margin + cfg.margin_step)
    if attainment > cfg.target_attainment + (1 - cfg.target_attainment) / 2:
        return max(cfg.margin_min, state.margin - cfg.margin_step / 2)
    return state.margin


def _rising(demand: tuple[tuple[float, float], ...], forecast: Forecast) -> bool:
    """A ramp, not a burst: the demand never fell over the up-window and ended higher, and the
    trend has been rising at each of its ticks."""
    values = [v for _, v in demand]
    steady = all(b >= a for a, b in zip(values, values[1:], strict=False))
    return len(values) > 1 and steady and values[-1] > values[0] and forecast.rising >= len(values)


def replicas_for(demand: float, per_replica: float, utilisation: float, margin: float) -> int:
    """Replicas that serve ``demand`` at ``utilisation`` of their SLO capacity, with ``margin``."""
    return math.ceil(round(demand * margin / (per_replica * utilisation), 9))


def _step(state: PoolState, x: PoolInput, now: float, cfg: PlannerConfig) -> tuple[PoolState, str]:
    pool, current = x.name, state.replicas
    if x.demand is None:
        return state, f"{pool}: load not measured, holding at {current}"
    margin = _margin(state, x.attainment, cfg)
    dt = now - state.forecast.time if math.isfinite(state.forecast.time) else 0.0
    forecast = state.forecast.update(x.demand, now, cfg)
    demand = tuple((t, v) for t, v in state.demand if now - t < cfg.scale_up_window_s)
    demand += ((now, x.demand),)
    held = min(v for _, v in demand)  # the need that held over the whole up-window
    ahead = forecast.ahead(cfg.lead_time_s, dt, cfg) if _rising(demand, forecast) else 0.0
    want_up = replicas_for(max(held, ahead), x.per_replica, cfg.headroom, margin)
    if x.behind:  # falling behind: size for what is asked now, no waiting
        want_up = max(want_up, replicas_for(x.demand, x.per_replica, cfg.headroom, margin))
    down = x.bounds.clamp(replicas_for(x.demand, x.per_replica, cfg.headroom * cfg.hysteresis, margin))
    history = tuple((t, n) for t, n in state.history if now - t < cfg.window_s) + ((now, down),)
    kept = replace(state, history=history, demand=demand, forecast=forecast, margin=margin,
                   observed_since=min(state.observed_since, now))
    why = (f"need {x.demand:.4g} now, {held:.4g} held, {ahead:.4g} forecast; "
           f"{x.per_replica:g} per replica, margin {margin:.2f}")  # fmt: skip
    target = x.bounds.clamp(want_up)
    if target > current:
        if now - state.last_change_s < cfg.scale_up_cooldown_s:
            return kept, f"{pool}: up-cooldown ({why})"
        cause = "behind" if x.behind else ("forecast" if ahead > held else "load")
        return replace(kept, replicas=target, last_change_s=now), (
            f"{pool}: {current}->{target} ({cause}: {why})")
    floor = max(max(n for _, n in history), x.bounds.clamp(x.busy))
    if floor < current and now - kept.observed_since < cfg.window_s:
        return kept, f"{pool}: observing for one window before any scale-down ({why})"
    if floor < current:
        if now - state.last_change_s < cfg.scale_down_cooldown_s:
            return kept, f"{pool}: down-cooldown ({why})"
        return replace(kept, replicas=floor, last_change_s=now), (
            f"{pool}: {current}->{floor} ({why})")
    if x.bounds.clamp(want_up) < current:
        return kept, f"{pool}: stabilising at {current} ({why})"
    return kept, f"{pool}: steady at {current} ({why})"


def plan(
    cfg: PlannerConfig,
    obs: Observation,
    prefill: PoolState,
    decode: PoolState,
    now: float,
) -> Decision:
    """One tick: the replicas to set for both pools, the reasons, and the state to keep."""
    p_in, d_in = pool_inputs(cfg, obs)
    p_state, p_reason = _step(prefill, p_in, now, cfg)
    d_state, d_reason = _step(decode, d_in, now, cfg)
    return Decision(p_state.replicas, d_state.replicas, (p_reason, d_reason), p_state, d_state)
