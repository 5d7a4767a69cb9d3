"""The planner in the simulator's loop (sim/autoscale.py, sim/day.py): the machinery on a short
trace, not the day's numbers (bench/lab/planner_day.py measures those)."""

from __future__ import annotations

import math

import pytest
from splitserve.bench.stats import SLO
from splitserve.operator.planner import Capacity, PlannerConfig, PoolBounds
from splitserve.router.policy.latency import LatencyModel
from splitserve.sim.autoscale import Autoscaler, LoopConfig, gpu_seconds, reactive
from splitserve.sim.cluster import Layout, SimConfig, SimRequest, Simulation
from splitserve.sim.day import DAY_S, DayShape, day_requests
from splitserve.sim.runner import EngineShape

LAT = LatencyModel(prefill_base_ms=10, prefill_per_token_ms=0.05, prefill_per_token2_ms=0.0,
                   prefill_per_cached_pair_ms=0.0, decode_base_ms=5, decode_per_seq_ms=0.1,
                   decode_per_context_token_ms=0.0005, transfer_base_ms=1, transfer_per_token_ms=0.01)
SHAPE = EngineShape(num_blocks=4096, block_size=16, max_num_seqs=8, max_num_batched_tokens=2048)
SLO_ = SLO(0.5, 0.05, 0.9)
# 200-token prompts at 10 ms + 0.05 ms/token: ~5k tokens/s per prefill replica within 0.5 s
CAP = Capacity(prefill_tokens_per_s_at_ttft=5_000, decode_seqs_at_tpot=8)


def step_load(low: float, high: float, until: float) -> list[SimRequest]:
    """``low`` req/s for 10 s, ``high`` for 20 s, ``low`` again until ``until``."""
    out, t = [], 0.0
    while t < until:
        out.append(SimRequest(len(out), t, 200, 40))
        t += 1 / (high if 10 <= t < 30 else low)
    return out


def run_loop(planner: PlannerConfig | None, reqs: list[SimRequest], start: Layout, end_s: float,
             delay_s: float = 2.0) -> tuple[Simulation, Autoscaler, list]:
    sim = Simulation(SimConfig(start, SHAPE), LAT, reqs)
    scaler = Autoscaler(sim, reqs, LoopConfig(planner, 0.5, delay_s, 2.0), SLO_, end_s)
    scaler.start()
    return sim, scaler, sim.run()


def planner(**kw) -> PlannerConfig:
    return PlannerConfig(PoolBounds(1, 6), PoolBounds(1, 6), CAP, window_s=4.0,
                         scale_up_cooldown_s=1.0, scale_down_cooldown_s=4.0,
                         scale_up_window_s=1.0, lead_time_s=2.0, ttft_target_s=0.5, **kw)


def test_replicas_follow_the_load_up_and_back_down_and_no_request_is_lost():
    reqs = step_load(4, 60, 60)
    sim, scaler, records = run_loop(planner(), reqs, Layout(1, 1), 60)
    tl = scaler.timeline
    peak = max(r["prefill"] + r["decode"] for r in tl if 12 <= r["t"] <= 32)
    assert peak >= 4, [(r["t"], r["prefill"], r["decode"]) for r in tl]
    assert (tl[-1]["prefill"], tl[-1]["decode"]) == (1, 1)
    # pods serve only after their start delay
    assert all(r["prefill_ready"] <= r["prefill"] and r["decode_ready"] <= r["decode"] for r in tl)
    assert any(r["prefill_ready"] + r["decode_ready"] < r["prefill"] + r["decode"] for r in tl)
    # every request finished, every token there: drained workers finished what they held
    assert all(r.ok and r.output_tokens == q.max_tokens for r, q in zip(records, reqs, strict=True))
    drained = [s for s in sim.gpu_spans.values() if s[1] is not None]
    assert drained and all(s[2] is not None and s[2] >= s[1] for s in drained)


def test_a_drained_worker_gives_its_gpu_back_only_after_its_last_request():
    reqs = [SimRequest(i, 0.01 * i, 200, 200) for i in range(4)]  # ~1 s of decoding each
    sim = Simulation(SimConfig(Layout(1, 1), SHAPE), LAT, reqs)
    sim.at(100.0, lambda t: sim.drain_worker("sim://decode-0", t))
    sim.add_worker("decode", 0.0, 50.0)  # ready before the drain: new requests could go there
    records = sim.run()
    assert all(r.ok and r.output_tokens == 200 for r in records)
    _, drain, stop = sim.gpu_spans["sim://decode-0"]
    last = max(r.sent_s + r.e2e_s for r in records) * 1000
    assert drain == 100.0 and stop == pytest.approx(last) and last > 1_000


def test_gpu_hours_count_each_pod_from_creation_to_the_end_of_its_drain():
    sim = Simulation(SimConfig(Layout(1, 1), SHAPE), LAT, [SimRequest(0, 0.0, 100, 4)])
    sim.add_worker("prefill", 1_000.0, 3_000.0)
    sim.at(5_000.0, lambda t: sim.drain_worker("sim://prefill-n0", t))
    sim.run()
    assert sim.gpu_spans["sim://prefill-n0"] == [1_000.0, 5_000.0, 5_000.0]  # idle: at once
    # 2 pods for 10 s, the third from 1 s to 5 s; compressed 10x, the drain counts once
    assert gpu_seconds(sim, 10.0) == pytest.approx(24.0)
    assert gpu_seconds(sim, 10.0, compress=10) == pytest.approx(240.0)


def test_a_fixed_fleet_never_changes_and_the_reactive_planner_hides_nothing_else():
    reqs = step_load(4, 30, 40)
    _, scaler, records = run_loop(None, reqs, Layout(2, 3), 40)
    assert {(r["prefill"], r["decode"], r["gpus"]) for r in scaler.timeline} == {(2, 3, 5)}
    assert all(r.ok for r in records)
    cfg = reactive(planner())
    assert (cfg.scale_up_window_s, cfg.lead_time_s, cfg.margin_step, cfg.hysteresis) == (0, 0, 0, 1)


def test_the_day_trace_follows_its_envelope_and_is_seeded():
    day = DayShape.seeded(10.0, seed=3, bursts=2, trough=0.2)
    assert day.base(15.0) == pytest.approx(10.0) and day.base(3.0) == pytest.approx(2.0)
    reqs = day_requests(day, "chat", compress=1440, seed=3)  # 60 simulated seconds
    assert reqs == day_requests(day, "chat", compress=1440, seed=3)
    expected = sum(day.rate(h / 60) for h in range(24 * 60)) * 60 / 1440
    assert math.isclose(len(reqs), expected, rel_tol=0.25), (len(reqs), expected)
    assert all(0 <= r.arrival_s <= DAY_S / 1440 for r in reqs)
