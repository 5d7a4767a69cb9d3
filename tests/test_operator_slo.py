"""The SLO loop's pure parts: where replicas live, planner inputs from spec and status,
capacity from a latency model, the per-pod window bookkeeping, router pod discovery from
pods, and the renderers honouring the planner; and on the real control plane, a router
of two pods whose different /metrics the status adds up."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from k8s_env import K8sEnv, k8s_fixture, wait_until  # noqa: F401  (the session fixture `k8s`)
from splitserve.operator import (
    capacity,
    crd,
    manifests,
    observe,
    pod_windows,
    router_pods,
    scaling,
    settings,
    slo_loop,
    status,
)
from splitserve.router.metrics import RouterMetrics
from splitserve.router.policy.latency import LatencyModel
from test_operator_k8s import crd_installed, example, isvc, operator_in  # noqa: F401
from test_operator_observe import PodsMetricsStub

BASE = {"model": {"name": "tiny", "path": "/models/tiny"}, "image": "splitserve:cpu"}


def spec(**auto: object) -> dict:
    return crd.defaulted_spec(
        BASE | {
            "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3},
            "decode": {"replicas": 2, "minReplicas": 1, "maxReplicas": 4},
            "autoscaling": {"enabled": True, "scaleUpCooldownSeconds": 0, **auto},
        }
    )  # fmt: skip


def window(concurrent: float, prompt: float | None, seconds: float = 10.0) -> observe.Window:
    return observe.Window(seconds, 10, 1.0, 100.0, 200.0, 10.0, 20.0, 0.9, prompt, concurrent)


def test_effective_replicas_follow_status_only_when_enabled() -> None:
    on = spec()
    st = {"autoscaling": {"prefill": {"replicas": 3}, "decode": {"replicas": 9}}}
    assert scaling.effective_replicas(on, None) == {"prefill": 1, "decode": 2}
    assert scaling.effective_replicas(on, st) == {"prefill": 3, "decode": 4}  # clamped to max
    off = crd.defaulted_spec({**on, "autoscaling": {"enabled": False}})
    assert scaling.effective_replicas(off, st) == {"prefill": 1, "decode": 2}


def test_unset_bounds_keep_the_pool_where_the_user_put_it() -> None:
    full = crd.defaulted_spec(BASE | {"decode": {"replicas": 3}})
    b = scaling.bounds(full, "decode")
    assert (b.min_replicas, b.max_replicas) == (1, 3)


def test_renderers_and_status_use_the_planner_replicas() -> None:
    full = spec()
    kids = manifests.render_all("demo", "ns", full, {"prefill": 3, "decode": 4})
    deps = {k["metadata"]["name"]: k for k in kids if k["kind"] == "Deployment"}
    assert deps["demo-prefill"]["spec"]["replicas"] == 3
    assert deps["demo-decode"]["spec"]["replicas"] == 4
    ready = {"status": {"readyReplicas": 4, "updatedReplicas": 4, "replicas": 4}}
    st = status.compute(full, {"decode": ready}, 1, replicas={"decode": 4})
    assert st["decode"]["ready"] == "4/4"


def test_decide_scales_decode_up_and_says_why() -> None:
    full = spec(decodeSequencesPerReplica=10, prefillTokensPerSecond=2000, headroom=0.8)
    cap = capacity.for_spec(full, None)
    d, patch, message = slo_loop.decide(full, None, window(30, 10_000), cap, now=1000.0)
    assert (d.prefill, d.decode) == (3, 4)  # 10k/1.6k -> 7 (max 3); 30/8 -> 4
    assert message and "decode: 2->4" in message and "30.0 concurrent" in message
    assert "(spec)" in message
    assert patch["lastScaling"]["decode"] == {"from": 2, "to": 4}
    assert patch["autoscaling"]["decode"]["replicas"] == 4
    # the status the patch leaves is the next tick's memory: steady, no Event
    st = {"autoscaling": patch["autoscaling"]}
    d2, patch2, message2 = slo_loop.decide(full, st, window(30, 10_000), cap, now=1010.0)
    assert (d2.prefill, d2.decode) == (3, 4) and message2 is None and "lastScaling" not in patch2
    assert patch2["autoscaling"]["decode"]["lastChangeTime"] == 1000.0


def test_planner_inputs_exported_for_hpa_and_keda_users() -> None:
    from prometheus_client import REGISTRY

    full = spec(decodeSequencesPerReplica=10, prefillTokensPerSecond=2000, headroom=0.8)
    cap = capacity.for_spec(full, None)
    d, _, _ = slo_loop.decide(full, None, window(30, 10_000), cap, now=1000.0)
    slo_loop.record_planner_metrics("ns-m", "svc-m", d, full, cap)

    def gauge(name: str, pool: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"namespace": "ns-m", "name": "svc-m", "pool": pool})

    assert gauge("splitserve_operator_planner_replicas", "decode") == 4
    assert gauge("splitserve_operator_planner_demand", "decode") == 30
    assert gauge("splitserve_operator_planner_desired_replicas", "decode") == 4  # 30 / (10 x 0.8)
    assert gauge("splitserve_operator_planner_desired_replicas", "prefill") == 7  # unbounded need
    assert gauge("splitserve_operator_planner_margin", "prefill") == 1.0
    assert gauge("splitserve_operator_planner_forecast", "decode") == 30


def test_unmeasured_prompt_rate_holds_prefill() -> None:
    full = spec(decodeSequencesPerReplica=10)
    d, _, _ = slo_loop.decide(full, None, window(1, None), capacity.for_spec(full, None), 0)
    assert d.prefill == 1 and "prefill: load not measured" in d.reasons[0]


def test_pool_state_round_trips_through_status() -> None:
    full = spec()
    st = {"autoscaling": {"decode": {"replicas": 3, "lastChangeTime": 5.0, "history": [[4, 3]]}}}
    state = scaling.pool_state(full, st, "decode")
    assert (state.replicas, state.last_change_s, state.history) == (3, 5.0, ((4.0, 3),))
    assert math.isinf(scaling.pool_state(full, None, "prefill").last_change_s)
    fresh = scaling.pool_state_status(scaling.pool_state(full, None, "prefill"))
    assert "lastChangeTime" not in fresh


def test_capacity_sources_and_latency_model_math() -> None:
    model = LatencyModel()  # prefill 5 + 0.05/token ms; decode 8 + 0.3/seq + 0.0005/ctx token
    # TTFT 500 ms: batches up to 250 ms -> 4900 tokens in 250 ms
    assert capacity.prefill_tokens_per_s(model, 500) == pytest.approx(19_600)
    # TPOT 50 ms at 1024 context: (50 - 8) / (0.3 + 0.512) -> 51 sequences
    assert capacity.decode_seqs(model, 50, 1024) == 51
    assert capacity.decode_seqs(model, 5, 1024) == 1  # even one misses: never below 1
    full = crd.defaulted_spec(BASE | {"slo": {"ttftMs": 500, "tpotMs": 50}})
    got = capacity.for_spec(full, model)
    assert got.capacity.prefill_tokens_per_s_at_ttft == pytest.approx(19_600)
    assert got.capacity.decode_seqs_at_tpot == 51 and got.source == "latency model"
    assert capacity.for_spec(full, None).source == "default"
    mixed = crd.defaulted_spec({**full, "autoscaling": {"decodeSequencesPerReplica": 7}})
    got = capacity.for_spec(mixed, model)
    assert got.capacity.decode_seqs_at_tpot == 7
    assert got.source == "prefill latency model, decode spec"


def snap(at: float, ttft_count: float, inflight: float = 0.0) -> observe.Snapshot:
    """A scrape with ``ttft_count`` TTFTs and as many finished sequences of 1 s each."""
    h = observe.Histogram(((0.1, ttft_count), (float("inf"), ttft_count)), ttft_count, 0.0)
    e2e = observe.Histogram(((float("inf"), ttft_count),), ttft_count, ttft_count)
    return observe.Snapshot(at, h, None, e2e, inflight, 0.0, 0.0, None)


def test_window_bookkeeping_waits_for_window_and_rebases_on_reset() -> None:
    hist = pod_windows.History()

    def tick(s: observe.Snapshot) -> observe.Window | None:
        return pod_windows.update(hist, {"pod": s}, (), 10)

    assert tick(snap(0, 1)) is None  # first scrape: baseline only
    assert tick(snap(5, 2)) is None  # nothing 10 s old yet
    w = tick(snap(12, 4))
    assert w is not None and w.seconds == 12 and w.finished == 3
    assert [s.at for s in hist.pods["pod"]] == [0, 5, 12]
    w = tick(snap(16, 5))
    assert w is not None and w.seconds == 11  # against t=5, the newest >= 10 s old
    assert [s.at for s in hist.pods["pod"]] == [5, 12, 16]
    assert tick(snap(30, 0)) is None  # went down: a restarted router
    assert [s.at for s in hist.pods["pod"]] == [30]


def test_pods_keep_their_own_baselines() -> None:
    """Two pods; one restarts, one appears, one vanishes, one fails: each only moves its own
    baseline, and the window is the sum of the pods' own deltas."""
    hist = pod_windows.History()

    def tick(scraped: dict[str, observe.Snapshot], failed: tuple[str, ...] = ()) -> observe.Window:
        w = pod_windows.update(hist, scraped, failed, 10)
        assert w is not None
        return w

    assert pod_windows.update(hist, {"a": snap(0, 100), "b": snap(0, 50)}, (), 10) is None
    w = tick({"a": snap(10, 110, inflight=3), "b": snap(10, 70, inflight=4)})
    assert (w.finished, w.concurrent_seqs, w.requests_per_s) == (30, 7, 3.0)
    # b restarted (its count went down): only b starts again, a's window still counts
    w = tick({"a": snap(20, 130), "b": snap(20, 5)})
    assert w.finished == 20 and [s.at for s in hist.pods["b"]] == [20]
    # c appears: a baseline only, then its delta over its own (shorter) time
    w = tick({"a": snap(25, 140), "b": snap(25, 9), "c": snap(25, 1000)})
    assert w.finished == 30 + 4 and "c" in hist.pods  # a vs t=10, b vs t=20 (partial)
    w = tick({"a": snap(30, 150), "b": snap(30, 15), "c": snap(30, 1010)})
    assert w.finished == 20 + 10 + 10  # a vs t=20, b vs t=20, c vs t=25 (partial)
    assert w.requests_per_s == pytest.approx(2 + 1 + 2)  # c: 10 in its own 5 s
    # a fails to scrape: left out, its history kept; c vanished: dropped
    w = tick({"b": snap(35, 16)}, failed=("a",))
    assert w.finished == 7 and set(hist.pods) == {"a", "b"}  # b vs t=25
    w = tick({"a": snap(40, 160), "b": snap(40, 17)})  # a answers again, vs its t=30
    assert w.finished == 10 + 2
    # nothing scraped (all failed): no window, histories kept; all gone: dropped
    assert pod_windows.update(hist, {}, ("a", "b"), 10) is None and set(hist.pods) == {"a", "b"}
    assert pod_windows.update(hist, {}, (), 10) is None and hist.pods == {}


def test_metrics_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSERVE_METRICS_URL", raising=False)
    monkeypatch.delenv("SPLITSERVE_ROUTER_POD_METRICS_URL", raising=False)
    assert settings.metrics_url("tiny", "ns") is None  # default: scrape each router pod
    url = settings.pod_metrics_url("tiny", "ns", "tiny-router-x", "10.1.2.3", 8000)
    assert url == "http://10.1.2.3:8000/metrics"
    monkeypatch.setenv("SPLITSERVE_ROUTER_POD_METRICS_URL", "http://127.0.0.1:9/{namespace}/{pod}")
    assert settings.pod_metrics_url("a", "b", "p", "h", 1) == "http://127.0.0.1:9/b/p"
    monkeypatch.setenv("SPLITSERVE_METRICS_URL", "http://127.0.0.1:9/{namespace}/{name}")
    assert settings.metrics_url("a", "b") == "http://127.0.0.1:9/b/a"  # single-URL mode
    assert router_pods.targets("a", "b", []) == [router_pods.Target(*["http://127.0.0.1:9/b/a"] * 3)]
    monkeypatch.setenv("SPLITSERVE_METRICS_URL", "http://x/{pod}")
    with pytest.raises(ValueError, match="SPLITSERVE_METRICS_URL"):
        settings.metrics_url("a", "b")


def test_a_pod_that_fails_is_left_out_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=slo_loop.log.name)
    with PodsMetricsStub(lambda i, m: m.inflight.set(5)) as stub:
        good = router_pods.Target("uid-a", "a", stub.url_template.format(pod="a"))
        bad = router_pods.Target("uid-b", "b", stub.url.replace("/metrics", "/b/nope"))
        mem = slo_loop.Memory()
        for _ in range(2):
            scraped, failed = slo_loop._scrape([good, bad], mem, slo_loop.log)
            assert set(scraped) == {"uid-a"} and failed == {"uid-b"}
        assert scraped["uid-a"].inflight == 5
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and "router pod b" in warned[0]  # once per failure streak
        back = router_pods.Target("uid-b", "b", stub.url_template.format(pod="b"))
        scraped, failed = slo_loop._scrape([good, back], mem, slo_loop.log)
        assert set(scraped) == {"uid-a", "uid-b"} and not failed and not mem.failing
        assert "router pod b answers again" in caplog.text


def test_ready_endpoints_from_pods() -> None:
    def pod(name: str, ip: str | None, ready: str = "True", port: str = "http",
            terminating: bool = False) -> dict:
        meta = {"name": name, "uid": f"uid-{name}"}
        if terminating:
            meta["deletionTimestamp"] = "2026-12-04T00:00:00Z"
        status = {"conditions": [{"type": "Ready", "status": ready}]}
        if ip:
            status["podIP"] = ip
        ports = [{"name": port, "containerPort": 8000}]
        return {"metadata": meta, "status": status, "spec": {"containers": [{"ports": ports}]}}

    pods = [
        pod("r-b", "127.244.0.2"), pod("r-c", "127.244.0.3", ready="False"),
        pod("r-a", "127.244.0.1"), pod("r-d", "127.244.0.4", port="other"),
        pod("r-e", "fd00::5"), pod("r-f", None),  # scheduled, no address yet
        pod("r-g", "127.244.0.7", terminating=True),
    ]  # fmt: skip
    got = router_pods.ready_endpoints(pods)
    # not ready (c), not serving http (d), no address (f) and terminating (g) left out
    assert [(e.pod, e.key, e.host, e.port) for e in got] == [
        ("r-a", "uid-r-a", "127.244.0.1", 8000),
        ("r-b", "uid-r-b", "127.244.0.2", 8000),
        ("r-e", "uid-r-e", "fd00::5", 8000),
    ]
    assert router_pods.url_host("fd00::5") == "[fd00::5]"
    assert router_pods.url_host("10.0.0.1") == "10.0.0.1"


def test_loop_tracks_objects_from_watch_events() -> None:
    loop = slo_loop.SloLoop(1.0)
    loop.note(None, "ns", "a")  # kopf's initial listing
    loop.note("ADDED", "ns", "b")
    loop.note("MODIFIED", "ns", "a")
    assert loop.tracked() == [("ns", "a"), ("ns", "b")]
    loop.note("DELETED", "ns", "a")
    assert loop.tracked() == [("ns", "b")]
    with pytest.raises(ValueError, match="interval"):
        slo_loop.SloLoop(0)


@pytest.mark.k8s
@pytest.mark.timeout(120, func_only=True)
@pytest.mark.usefixtures("crd_installed")
def test_status_adds_up_every_router_pod(k8s: K8sEnv) -> None:
    """Two router pods (kwok) serving different /metrics (a local server stands in for each,
    through SPLITSERVE_ROUTER_POD_METRICS_URL): the status is their sum, never one pod's share;
    scaled to one router pod, the one left alone."""
    ns = k8s.create_namespace("slo-pods")

    def load(i: int, m: RouterMetrics) -> None:  # one scrape interval of one pod's traffic
        ttfts = (0.3, 0.3, 0.3, 0.3) if i == 0 else (0.7,)  # pod 0 in SLO, pod 1 misses TTFT
        for ttft in ttfts:
            m.observe_sequence(ttft, 0.04, 0.5, 10, slo_ttft_s=0.5, slo_tpot_s=0.05)
        m.inflight.set(10 if i == 0 else 20)

    def observed(concurrent: tuple[float, ...]) -> dict[str, Any] | None:
        """The status once its concurrency is one of ``concurrent``, else None."""
        op.assert_alive()
        st = isvc(k8s, ns, "pods").get("status", {})
        return st if st.get("observed", {}).get("concurrentSequences") in concurrent else None

    with PodsMetricsStub(load) as stub:
        env = {"SPLITSERVE_ROUTER_POD_METRICS_URL": stub.url_template,
               "SPLITSERVE_SLO_TICK_SECONDS": "1"}  # fmt: skip
        with operator_in(k8s, ns, env) as op:
            doc = example("pods")
            doc["spec"] |= {
                "model": {"name": "tiny-qwen2", "path": "/models/tiny-qwen2"},
                "redis": {"managed": False, "url": "redis://redis.example:6379/0"},
                "decode": {"replicas": 1},
                "router": {"replicas": 2},
                "autoscaling": {"enabled": False, "windowSeconds": 1},
            }
            k8s.apply(doc, namespace=ns)
            # both pods' traffic: 4 + 1 finished per interval, 10 + 20 in flight
            st = wait_until("status of both router pods", lambda: observed((30,)), 60)
            assert st["attainment"] == 0.8
            # 4 TTFTs in (0.25, 0.5] and 1 in (0.5, 1] in the summed buckets: p90 = 0.75 s
            assert st["ttftMs"] == 750.0 and st["tpotMs"] == 38.0
            assert len(stub.pods) == 2 and all(p.startswith("pods-router-") for p in stub.pods)

            k8s.kubectl("patch", "infsvc", "pods", "-n", ns, "--type=merge",
                        "-p", '{"spec": {"router": {"replicas": 1}}}')  # fmt: skip
            # one pod left: its own numbers alone (which one stays is the ReplicaSet's choice)
            st = wait_until("status of the one router pod", lambda: observed((10, 20)), 30)
            assert st["attainment"] == (1.0 if st["observed"]["concurrentSequences"] == 10 else 0)


def test_a_tick_lists_the_services_pods_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One listing serves the status (pod problems), the router pods to scrape and the
    planner's pod start times: one list call per tick, autoscaling or not."""
    from prometheus_client import generate_latest
    from splitserve.operator import kube

    def pod(component: str) -> dict[str, Any]:
        return {"metadata": {"name": f"svc-{component}-0", "uid": f"uid-{component}",
                             "labels": {manifests.LABEL_COMPONENT: component}},
                "spec": {"containers": [{"name": component,
                                         "ports": [{"name": "http", "containerPort": 8000}]}]},
                "status": {"phase": "Running", "podIP": "127.0.0.9",
                           "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip

    obj = {"apiVersion": "splitserve.io/v1alpha1", "kind": "InferenceService",
           "metadata": {"name": "svc", "namespace": "ns", "uid": "uid-svc"},
           "spec": BASE | {"prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 1},
                           "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 1},
                           "autoscaling": {"enabled": True, "windowSeconds": 1}}}  # fmt: skip
    listed: list[str] = []
    patched: list[dict[str, Any]] = []
    applied: list[str] = []
    text = generate_latest(RouterMetrics().registry).decode()
    clock = iter(range(100, 10_000, 100))

    def list_pods(labels: dict[str, str], namespace: str) -> list[dict[str, Any]]:
        listed.append(namespace)
        return [pod(c) for c in ("prefill", "decode", "router", "redis")]

    def apply(manifest: dict[str, Any]) -> Any:
        applied.append(manifest["metadata"]["name"])
        return kube.ApplyResult(manifest["kind"], manifest["metadata"]["name"], "unchanged")

    monkeypatch.delenv("SPLITSERVE_METRICS_URL", raising=False)
    monkeypatch.setattr(kube, "get_inference_service", lambda namespace, name: obj)
    monkeypatch.setattr(kube, "get", lambda kind, namespace, name: None)
    monkeypatch.setattr(kube, "list_pods", list_pods)
    monkeypatch.setattr(kube, "patch_status", lambda namespace, name, patch: patched.append(patch))
    monkeypatch.setattr(kube, "apply", apply)
    monkeypatch.setattr(slo_loop, "_scrape_one", lambda target: observe.parse(text, next(clock)))
    memory = slo_loop.Memory()
    slo_loop.tick("svc", "ns", memory)  # the first scrape: a baseline, no window yet
    assert listed == ["ns"] and list(memory.history.pods) == ["uid-router"]
    slo_loop.tick("svc", "ns", memory)  # a window: the planner runs and applies both pools
    assert listed == ["ns", "ns"]
    assert applied == ["svc-prefill", "svc-decode"]
    assert any("autoscaling" in p for p in patched)
