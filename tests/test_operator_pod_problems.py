"""pod_problems.py and the status it feeds, on pod dicts shaped like the API server's own: what
the scheduler writes on an unschedulable pod, what a kubelet writes for a failed image pull, a
crash loop and a failing readiness probe; then the conditions and Events rendered from them."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from splitserve.operator import crd, pod_problems, status
from splitserve.operator.pod_problems import Reason
from test_operator_k8s import EXAMPLE

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def stamp(seconds_ago: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(NOW - seconds_ago, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(name: str, uid: str = "", **status_fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "uid": uid or f"uid-{name}",
                     "labels": {"app.kubernetes.io/component": "decode"}},
        "spec": {"containers": [{"name": "decode", "image": "splitserve:cpu"}]},
        "status": {"qosClass": "Burstable", **status_fields},
    }  # fmt: skip


SCHED_MSG = ('0/3 nodes are available: persistentvolumeclaim "weights" not found. preemption: '
             '0/3 nodes are available: 3 Preemption is not helpful for scheduling.')  # fmt: skip


def unschedulable(name: str = "tiny-decode-7d9-abcde") -> dict[str, Any]:
    return pod(name, phase="Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": SCHED_MSG, "lastProbeTime": None, "lastTransitionTime": stamp(30)}])  # fmt: skip


def scheduled_conditions(ready: str = "False", ready_age: float = 30,
                         ready_message: str | None = None) -> list[dict[str, Any]]:
    ready_cond = {"type": "Ready", "status": ready, "lastProbeTime": None,
                  "lastTransitionTime": stamp(ready_age)}  # fmt: skip
    if ready == "False":
        ready_cond |= {"reason": "ContainersNotReady",
                       "message": ready_message or "containers with unready status: [decode]"}
    return [
        {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": stamp(40)},
        {"type": "Initialized", "status": "True", "lastTransitionTime": stamp(40)},
        ready_cond,
        {"type": "ContainersReady", "status": ready, "lastTransitionTime": stamp(ready_age)},
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp(41)},
    ]


def waiting(name: str, reason: str, message: str = "", **container: Any) -> dict[str, Any]:
    state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    return pod(name, phase="Pending" if "Image" in reason else "Running",
               hostIP="127.240.0.1", podIP="127.244.0.9", startTime=stamp(40),
               conditions=scheduled_conditions(),
               containerStatuses=[{"name": "decode", "image": "splitserve:cpu", "imageID": "",
                                   "ready": False, "started": False, "restartCount": 0,
                                   "state": state, "lastState": {}, **container}])  # fmt: skip


def image_pull(name: str = "tiny-decode-7d9-fghij") -> dict[str, Any]:
    return waiting(name, "ImagePullBackOff",
                   'Back-off pulling image "registry.invalid/splitserve:nope"')


def crash_loop(name: str = "tiny-decode-7d9-klmno") -> dict[str, Any]:
    return waiting(name, "CrashLoopBackOff",
                   "back-off 40s restarting failed container=decode pod=" + name,
                   restartCount=3, lastState={"terminated": {
                       "exitCode": 2, "reason": "Error", "message": "no model at /models/x",
                       "startedAt": stamp(50), "finishedAt": stamp(45), "containerID": "c://1"}})


def running(name: str, ready: bool, for_s: float, message: str | None = None) -> dict[str, Any]:
    return pod(name, phase="Running", hostIP="127.240.0.1", podIP="127.244.0.7",
               startTime=stamp(for_s + 20),
               conditions=scheduled_conditions("True" if ready else "False", for_s, message),
               containerStatuses=[{"name": "decode", "ready": ready, "started": True,
                                   "restartCount": 0, "image": "splitserve:cpu",
                                   "state": {"running": {"startedAt": stamp(for_s + 10)}},
                                   "lastState": {}}])  # fmt: skip


def unhealthy_event(pod_uid: str, message: str, age: float) -> dict[str, Any]:
    """An Event as the kubelet posts it for a failed readiness probe (core/v1)."""
    return {
        "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "Unhealthy",
        "metadata": {"name": f"x.{age}", "namespace": "ns", "creationTimestamp": stamp(age + 60)},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "ns", "uid": pod_uid,
                           "fieldPath": "spec.containers{decode}"},
        "message": message, "count": 7, "lastTimestamp": stamp(age),
        "source": {"component": "kubelet", "host": "node-1"},
    }  # fmt: skip


# ---------------------------------------------------------------- one pod ---------------------
def test_unschedulable_pod_says_the_schedulers_message() -> None:
    got = pod_problems.pod_problem(unschedulable(), NOW)
    assert got is not None
    assert (got.reason, got.state) == (Reason.UNSCHEDULABLE, "Pending")
    assert 'persistentvolumeclaim "weights" not found' in got.detail


def test_image_pull_error_says_the_kubelets_message() -> None:
    got = pod_problems.pod_problem(image_pull(), NOW)
    assert got is not None and got.reason is Reason.IMAGE_PULL
    assert got.state == "ImagePullBackOff"
    assert got.detail == 'Back-off pulling image "registry.invalid/splitserve:nope"'
    got = pod_problems.pod_problem(waiting("p", "ErrImagePull"), NOW)  # no message: still named
    assert got is not None and got.state == "ErrImagePull" and "decode" in got.detail


def test_crash_loop_says_the_last_exit() -> None:
    got = pod_problems.pod_problem(crash_loop(), NOW)
    assert got is not None and got.reason is Reason.CRASH_LOOP
    assert got.detail == "container decode last exited with code 2 (Error): no model at /models/x"


def test_container_config_error() -> None:
    p = waiting("p", "CreateContainerConfigError", 'secret "tiny-internal" not found')
    got = pod_problems.pod_problem(p, NOW)
    assert got is not None and got.reason is Reason.CONTAINER_ERROR
    assert got.detail == 'secret "tiny-internal" not found'


def test_not_ready_only_after_the_grace_with_the_probe_message() -> None:
    fresh = running("p", ready=False, for_s=20)
    assert pod_problems.pod_problem(fresh, NOW, not_ready_after=60) is None  # just a blip
    stale = running("p", ready=False, for_s=90)
    got = pod_problems.pod_problem(stale, NOW, not_ready_after=60)
    assert got is not None and got.reason is Reason.NOT_READY
    assert got.state == "Running but not Ready for 90s"
    assert got.detail == "containers with unready status: [decode]"  # no probe Event read
    events = [unhealthy_event("uid-p", "Readiness probe failed: HTTP probe failed with "
                              "statuscode: 503", age=5),
              unhealthy_event("uid-p", "Readiness probe failed: connection refused", age=50),
              unhealthy_event("uid-p", "Liveness probe failed: timeout", age=1),
              unhealthy_event("uid-other", "Readiness probe failed: other pod", age=1)]  # fmt: skip
    probes = pod_problems.probe_messages(events)
    got = pod_problems.pod_problem(stale, NOW, 60, probes)
    assert got is not None
    assert got.detail == "Readiness probe failed: HTTP probe failed with statuscode: 503"
    assert pod_problems.needs_probe_messages([fresh, stale], NOW, 60)
    assert not pod_problems.needs_probe_messages([fresh], NOW, 60)


def test_healthy_and_starting_pods_have_no_problem() -> None:
    assert pod_problems.pod_problem(running("p", ready=True, for_s=300), NOW) is None
    starting = running("p", ready=False, for_s=300)
    starting["status"]["containerStatuses"][0]["started"] = False  # startup probe not passed
    assert pod_problems.pod_problem(starting, NOW) is None
    creating = waiting("p", "ContainerCreating")
    assert pod_problems.pod_problem(creating, NOW) is None
    assert pod_problems.pod_problem(pod("p", phase="Pending"), NOW) is None  # not yet seen


# ---------------------------------------------------------------- one pool --------------------
def test_pool_reports_its_most_severe_reason_and_counts() -> None:
    terminating = copy.deepcopy(unschedulable("tiny-decode-old"))
    terminating["metadata"]["deletionTimestamp"] = stamp(1)
    pods = [running("tiny-decode-a", True, 300), crash_loop("tiny-decode-b"),
            unschedulable("tiny-decode-c"), unschedulable("tiny-decode-d"), terminating]
    got = pod_problems.pool_problem("decode", pods, NOW)
    assert got is not None
    assert (got.reason, got.affected, got.total) == (Reason.UNSCHEDULABLE, 2, 4)
    assert got.message == f"decode: 2/4 pods Pending: {SCHED_MSG}"
    assert got.example.pod == "tiny-decode-c"  # by name: stable between refreshes
    assert pod_problems.pool_problem("decode", [running("a", True, 300)], NOW) is None


def test_long_messages_are_clipped() -> None:
    p = waiting("p", "ErrImagePull", "x" * 5000)
    got = pod_problems.pod_problem(p, NOW)
    assert got is not None and len(got.detail) == pod_problems.MAX_DETAIL


# ---------------------------------------------------------------- status and Events -----------
def spec() -> dict[str, Any]:
    return crd.defaulted_spec(yaml.safe_load(EXAMPLE.read_text())["spec"])


def rolling_out(desired: int) -> dict[str, Any]:
    """A Deployment whose pods exist but none is available (what a Pending pool shows)."""
    return {"metadata": {"generation": 1}, "status": {
        "observedGeneration": 1, "replicas": desired, "updatedReplicas": desired,
        "unavailableReplicas": desired, "conditions": [{
            "type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}}


def test_status_names_pool_and_reason_where_it_said_no_failures() -> None:
    full = spec()
    deps = {c: rolling_out(n) for c, n in (("prefill", 1), ("decode", 2), ("router", 1),
                                            ("redis", 1))}  # fmt: skip
    before = {c["type"]: c for c in status.compute(full, deps, 1)["conditions"]}
    assert before["Degraded"]["message"] == "no failures"  # the complaint
    problems = [
        pod_problems.pool_problem("prefill", [crash_loop("tiny-prefill-a")], NOW),
        pod_problems.pool_problem("decode", [unschedulable("tiny-decode-a"),
                                             unschedulable("tiny-decode-b")], NOW),
    ]  # fmt: skip
    st = status.compute(full, deps, 1, problems=[p for p in problems if p])
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Degraded"]["status"] == "True"
    assert conds["Degraded"]["reason"] == "PodsUnschedulable"  # the most severe first
    assert conds["Degraded"]["message"].startswith(f"decode: 2/2 pods Pending: {SCHED_MSG}; "
                                                   "prefill: 1/1 pods CrashLoopBackOff: ")
    assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("False", "PodsUnschedulable")
    assert conds["Progressing"]["reason"] == "RollingOut"  # still true: it is under way
    assert [(p["pool"], p["reason"], p["pods"]) for p in st["problems"]] == [
        ("decode", "PodsUnschedulable", "2/2"), ("prefill", "CrashLooping", "1/1")]
    # a reconcile error still comes first
    err = {c["type"]: c for c in status.compute(full, deps, 1, None, "boom",
                                                problems=[p for p in problems if p])["conditions"]}
    assert err["Degraded"]["reason"] == "ReconcileError"
    assert err["Degraded"]["message"].startswith("boom; decode: 2/2 pods Pending")


def test_events_only_when_a_pools_reason_changes() -> None:
    def entries(*problems: pod_problems.PoolProblem | None) -> list[dict[str, Any]]:
        return [p.to_status() for p in problems if p]

    one = entries(pod_problems.pool_problem("decode", [unschedulable("a")], NOW))
    two = entries(pod_problems.pool_problem("decode", [unschedulable("a"), unschedulable("b")],
                                            NOW))  # fmt: skip
    first = pod_problems.transitions(None, one)
    assert [(t.warning, t.reason) for t in first] == [(True, "PodsUnschedulable")]
    assert first[0].message.startswith("decode: 1/1 pods Pending: 0/3 nodes are available")
    assert pod_problems.transitions(one, one) == []  # a refresh: nothing
    assert pod_problems.transitions(one, two) == []  # more pods, same reason: nothing
    crash = entries(pod_problems.pool_problem("decode", [crash_loop("a")], NOW))
    assert [t.reason for t in pod_problems.transitions(two, crash)] == ["CrashLooping"]
    healed = pod_problems.transitions(crash, [])
    assert [(t.warning, t.reason, t.message) for t in healed] == [
        (False, "PodsRecovered", "decode: no longer CrashLooping")]


def test_crd_keeps_the_problems_field() -> None:
    item = crd.status_schema()["properties"]["problems"]["items"]["properties"]
    entry = pod_problems.pool_problem("decode", [unschedulable()], NOW)
    assert entry is not None and set(entry.to_status()) <= set(item)


def test_pools_grouped_by_component_and_probe_events_optional(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``reconcile.pool_problems`` on listed pods: grouped by component label, probe Events read
    only when a pod is not Ready for long, and unreadable Events (RBAC) do not hide the problem."""
    from kubernetes.client.exceptions import ApiException
    from splitserve.operator import kube, reconcile

    stale = running("tiny-decode-a", ready=False, for_s=600)
    router = unschedulable("tiny-router-a")
    router["metadata"]["labels"] = {"app.kubernetes.io/component": "router"}
    asked: list[str] = []

    def events(namespace: str, reason: str) -> list[dict[str, Any]]:
        asked.append(reason)
        raise ApiException(status=403, reason="Forbidden")

    monkeypatch.setattr(kube, "list_pods", lambda labels, ns: [stale, router])
    monkeypatch.setattr(kube, "list_pod_events", events)
    got = reconcile.pool_problems(reconcile.pods_by_pool("tiny", "ns"), "ns", NOW)
    assert [(p.pool, p.reason) for p in got] == [("decode", Reason.NOT_READY),
                                                 ("router", Reason.UNSCHEDULABLE)]
    assert got[0].example.detail == "containers with unready status: [decode]"
    assert asked == ["Unhealthy"]
    monkeypatch.setattr(kube, "list_pods", lambda labels, ns: [router])
    reconcile.pool_problems(reconcile.pods_by_pool("tiny", "ns", ("router",)), "ns", NOW)
    assert asked == ["Unhealthy"]  # nobody not Ready: no Event read
