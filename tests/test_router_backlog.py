"""The planner's queue inputs travel router -> /metrics -> operator -> planner: prompt tokens
waiting for a prefill (the router's admission queue plus the workers' queues as their /load
reports them) and the age of the oldest request still without a first token."""

from __future__ import annotations

import dataclasses

from splitserve.operator import capacity, crd, observe, slo_loop
from splitserve.operator.planner import PlannerConfig
from splitserve.router.backlog import AwaitingFirstToken
from splitserve.router.metrics import RouterMetrics


def test_oldest_wait_is_the_oldest_request_without_a_first_token() -> None:
    waiting = AwaitingFirstToken()
    assert waiting.oldest_wait(10.0) == 0.0
    a, b = waiting.add(1.0), waiting.add(4.0)
    assert waiting.oldest_wait(10.0) == 9.0
    waiting.remove(a)
    waiting.remove(a)  # a second remove (first token, then the end) is harmless
    assert waiting.oldest_wait(10.0) == 6.0
    waiting.remove(b)
    assert waiting.oldest_wait(10.0) == 0.0


def test_gauges_parse_back_and_router_pods_take_the_largest() -> None:
    m = RouterMetrics()
    m.queued_prompt_tokens.set(12_000)
    m.oldest_wait.set(3.5)
    later = observe.parse(m.exposition().decode(), at=10.0)
    assert (later.queued_prompt_tokens, later.oldest_wait_s) == (12_000, 3.5)
    earlier = dataclasses.replace(later, at=0.0, queued_prompt_tokens=0.0, oldest_wait_s=0.0)
    d = observe.delta(earlier, later)
    other = dataclasses.replace(d, queued_prompt_tokens=9_000, oldest_wait_s=5.0)
    win = observe.merge([d, other])  # two router pods report the same workers' queues
    assert (win.queued_prompt_tokens, win.oldest_wait_s) == (12_000, 5.0)
    assert win.to_status()["queuedPromptTokens"] == 12_000


def test_a_backlog_the_window_rate_does_not_show_scales_prefill() -> None:
    full = crd.defaulted_spec({
        "model": {"name": "tiny", "path": "/models/tiny"}, "image": "splitserve:cpu",
        "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
        "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
        "autoscaling": {"enabled": True, "scaleUpCooldownSeconds": 0, "prefillTokensPerSecond": 2000,
                        "decodeSequencesPerReplica": 10},
    })
    cap = capacity.for_spec(full, None)
    calm = observe.Window(10.0, 10, 1.0, 100.0, 200.0, 10.0, 20.0, 0.99, 500.0, 2.0)
    d, _, _ = slo_loop.decide(full, None, calm, cap, now=1000.0)
    assert d.prefill == 1
    backlog = dataclasses.replace(calm, queued_prompt_tokens=6_000.0, oldest_wait_s=4.0)
    d, _, message = slo_loop.decide(full, None, backlog, cap, now=1000.0)
    assert d.prefill > 1 and message and "prefill" in message


def test_busy_workers_parse_back_and_floor_a_scale_down() -> None:
    m = RouterMetrics()
    m.busy_workers.labels("decode").set(3)
    m.busy_workers.labels("prefill").set(1)
    later = observe.parse(m.exposition().decode(), at=10.0)
    assert later.busy_workers == {"decode": 3, "prefill": 1}
    d = observe.delta(dataclasses.replace(later, at=0.0), later)
    assert observe.merge([d]).busy_workers == {"decode": 3, "prefill": 1}


def _pod(created: str, ready_at: str | None) -> dict:
    conds = [] if ready_at is None else [{"type": "Ready", "status": "True", "lastTransitionTime": ready_at}]
    return {"metadata": {"creationTimestamp": created}, "status": {"conditions": conds}}


def test_lead_time_is_the_median_start_of_the_newest_ready_pods() -> None:
    from splitserve.operator import pod_start

    assert pod_start.lead_time([], 120.0) == (120.0, False)
    assert pod_start.lead_time([_pod("2026-12-04T10:00:00Z", None)], 120.0) == (120.0, False)
    pods = [_pod("2026-12-04T10:00:00Z", "2026-12-04T10:03:00Z"),  # 180 s
            _pod("2026-12-04T10:10:00Z", "2026-12-04T10:10:40Z"),  # 40 s
            _pod("2026-12-04T10:20:00Z", "2026-12-04T10:21:00Z"),  # 60 s
            _pod("2026-12-04T10:30:00Z", None)]  # still starting: not measured
    assert pod_start.lead_time(pods, 120.0) == (60.0, True)
    older = [_pod(f"2026-12-04T09:{m:02d}:00Z", f"2026-12-04T09:{m:02d}:05Z") for m in range(20)]
    assert pod_start.lead_time(older + pods, 120.0) == (5.0, True)  # the newest 10, median


def test_a_measured_lead_time_and_busy_workers_reach_the_planner(monkeypatch) -> None:
    full = crd.defaulted_spec({
        "model": {"name": "tiny", "path": "/models/tiny"}, "image": "splitserve:cpu",
        "autoscaling": {"enabled": True, "prefillTokensPerSecond": 2000, "decodeSequencesPerReplica": 10},
    })
    cap = capacity.for_spec(full, None)
    calm = observe.Window(10.0, 10, 1.0, 100.0, 200.0, 10.0, 20.0, 0.99, 500.0, 2.0,
                          busy_workers={"decode": 1})
    seen = []
    real_plan = slo_loop.plan
    monkeypatch.setattr(slo_loop, "plan", lambda cfg, obs, *a: seen.append((cfg, obs)) or real_plan(cfg, obs, *a))
    slo_loop.decide(full, None, calm, cap, now=1000.0, lead_time_s=33.0)
    slo_loop.decide(full, None, calm, cap, now=1000.0)
    (measured, obs), (default, _) = seen
    assert measured.lead_time_s == 33.0 and default.lead_time_s == PlannerConfig.lead_time_s
    assert (obs.decode_busy_replicas, obs.prefill_busy_replicas) == (1, 0)
