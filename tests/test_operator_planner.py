"""The planner's pure decisions: sizing from SLO capacity, bounds, cooldowns, stabilisation."""

from __future__ import annotations

import pytest
from splitserve.operator.planner import (
    Capacity,
    Observation,
    PlannerConfig,
    PoolBounds,
    PoolState,
    plan,
    raw_desired,
)

CFG = PlannerConfig(
    prefill=PoolBounds(1, 8),
    decode=PoolBounds(1, 16),
    capacity=Capacity(prefill_tokens_per_s_at_ttft=10_000, decode_seqs_at_tpot=32),
    headroom=0.8,
    window_s=60,
    scale_up_cooldown_s=30,
    scale_down_cooldown_s=120,
)


def test_raw_desired_from_capacity_with_headroom() -> None:
    # 24k tokens/s over 8k usable per replica -> 3; 100 seqs over 25.6 per replica -> 4
    assert raw_desired(CFG, Observation(24_000, 100)) == (3, 4)


def test_scale_up_at_once_then_cooldown() -> None:
    d = plan(CFG, Observation(24_000, 100), PoolState(1), PoolState(1), now=0)
    assert (d.prefill, d.decode) == (3, 4)
    d2 = plan(CFG, Observation(60_000, 300), d.prefill_state, d.decode_state, now=10)
    assert (d2.prefill, d2.decode) == (3, 4) and "up-cooldown" in d2.reasons[0]
    d3 = plan(CFG, Observation(60_000, 300), d2.prefill_state, d2.decode_state, now=40)
    assert (d3.prefill, d3.decode) == (8, 12)  # prefill clamped to max


def test_scale_down_waits_for_window_and_busy_replicas() -> None:
    p, d = PoolState(4, last_change_s=-1000), PoolState(6, last_change_s=-1000)
    hi = plan(CFG, Observation(24_000, 150), p, d, now=0)  # wants 3 and 6
    low = Observation(1_000, 10, decode_busy_replicas=2)
    d1 = plan(CFG, low, hi.prefill_state, hi.decode_state, now=30)
    assert d1.prefill == 3  # the window still remembers 3 (already down from 4 at t=0)
    assert d1.decode == 6 and "stabilising" in d1.reasons[1]
    d2 = plan(CFG, low, d1.prefill_state, d1.decode_state, now=200)
    assert d2.decode == 2  # bounded by the replicas still holding sequences
    assert d2.prefill == 1


def test_bounds_validated() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        PoolBounds(3, 2)
    with pytest.raises(ValueError, match="decode_seqs_at_tpot"):
        Capacity(1.0, 0)
