"""The status says why, on the real control plane (issue 17, item 5): an InferenceService whose
pods cannot serve names the pool and the pods' own reason in its conditions and in an Event on
itself (what ``kubectl describe infsvc`` shows), one Event per change of reason, not per refresh.

The scheduler cases run the real kube-scheduler against kwok nodes: a model PVC that does not
exist, a node selector no node has, more GPUs than any node has. Image pulls, crash loops and
probes are a kubelet's business and kwok's nodes have none, so that test puts its pods on the
process-backed node (``k8s_env.PROCESS_NODE``: kwok's stages skip it) without starting
``pod_processes``, and the test itself plays that node's kubelet: it writes the pod status
subresource as a kubelet does (container states, last termination, Ready condition) and posts
the ``Unhealthy`` Event a kubelet posts for a failed readiness probe.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from k8s_env import K8sEnv, wait_until
from test_operator_k8s import (
    OperatorProcess,
    condition,
    example,
    isvc,
    k8s_fixture,  # noqa: F401  (the session fixture `k8s`)
    make_model_volume,
    operator_in,
)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240, func_only=True)]
OPERATOR_ENV = {"SPLITSERVE_SLO_TICK_SECONDS": "1", "SPLITSERVE_NOT_READY_SECONDS": "2"}
WHY = {"PodsUnschedulable", "ImagePullFailing", "CrashLooping", "ContainerFailing",
       "ReadinessFailing", "PodsRecovered"}  # fmt: skip


def small(name: str, claim: str = "models") -> dict[str, Any]:
    doc = example(name)
    doc["spec"]["decode"]["replicas"] = 1
    doc["spec"]["model"]["pvc"]["claimName"] = claim
    return doc


def events(k8s: K8sEnv, ns: str, name: str) -> list[dict[str, Any]]:
    """The Events about the InferenceService, oldest first (``kubectl describe`` lists these)."""
    sel = f"involvedObject.kind=InferenceService,involvedObject.name={name}"
    items = k8s.get_json("events", "-n", ns, "--field-selector", sel)["items"]
    return sorted(items, key=lambda e: (e["metadata"]["creationTimestamp"], e["metadata"]["name"]))


def why_events(k8s: K8sEnv, ns: str, name: str, reason: str) -> list[str]:
    return [e["message"] for e in events(k8s, ns, name) if e["reason"] == reason]


def wait_degraded(k8s: K8sEnv, op: OperatorProcess, ns: str, name: str, reason: str,
                  *parts: str, timeout: float = 60) -> dict[str, Any]:
    """Wait until Degraded is True with ``reason`` and a message holding every one of ``parts``."""
    def done() -> dict[str, Any] | None:
        op.assert_alive()
        cond = condition(isvc(k8s, ns, name), "Degraded")
        ok = cond.get("status") == "True" and cond.get("reason") == reason
        return cond if ok and all(p in cond.get("message", "") for p in parts) else None

    try:
        return wait_until(f"{name} Degraded {reason}", done, timeout, interval=0.5)
    except TimeoutError:
        print(json.dumps(isvc(k8s, ns, name).get("status"), indent=1))
        raise


def settle(op: OperatorProcess, seconds: float) -> None:
    """Let the operator refresh the status several times (the SLO tick is 1 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        op.assert_alive()
        time.sleep(0.5)


def pods_of(k8s: K8sEnv, ns: str, name: str, component: str) -> list[dict[str, Any]]:
    sel = f"app.kubernetes.io/instance={name},app.kubernetes.io/component={component}"
    return k8s.get_json("pods", "-n", ns, "-l", sel)["items"]


# ---------------------------------------------------------------- the real scheduler ----------
@pytest.fixture
def ns(k8s: K8sEnv, request: pytest.FixtureRequest) -> str:
    return k8s.create_namespace(f"why-{request.node.name.split('_')[1]}"[:40])


def test_missing_model_pvc_is_named_in_conditions_and_one_event_per_pool(
    k8s: K8sEnv, ns: str
) -> None:
    """The issue's new user: PVC "weights" does not exist. The scheduler's own words reach the
    conditions and an Event per waiting pool (prefill, decode and the router, for its tokenizer,
    mount it; Redis runs), exactly once while they wait; creating the PVC heals it with a Recovered Event."""
    with operator_in(k8s, ns, OPERATOR_ENV) as op:
        k8s.apply(small("weights-missing", claim="weights"), namespace=ns)
        cond = wait_degraded(k8s, op, ns, "weights-missing", "PodsUnschedulable",
                             "decode: 1/1 pods Pending: ", "prefill: 1/1 pods Pending: ",
                             'persistentvolumeclaim "weights" not found')  # fmt: skip
        obj = isvc(k8s, ns, "weights-missing")
        assert condition(obj, "Ready")["reason"] == "PodsUnschedulable"
        print(cond["message"])
        assert "redis" not in cond["message"]
        assert [(p["pool"], p["reason"], p["pods"]) for p in obj["status"]["problems"]] == [
            (pool, "PodsUnschedulable", "1/1") for pool in ("prefill", "decode", "router")]
        settle(op, 5)  # ~5 SLO ticks and pod events: no new Event
        warned = why_events(k8s, ns, "weights-missing", "PodsUnschedulable")
        assert sorted(m.split(":")[0] for m in warned) == ["decode", "prefill", "router"], warned
        assert all('persistentvolumeclaim "weights" not found' in m for m in warned), warned
        described = k8s.kubectl("describe", "infsvc", "weights-missing", "-n", ns).stdout
        assert "PodsUnschedulable" in described and '"weights" not found' in described

        make_model_volume(k8s, ns, claim="weights")  # the user creates it: the pods schedule

        def healed() -> bool:
            obj = isvc(k8s, ns, "weights-missing")
            return (condition(obj, "Ready").get("status") == "True"
                    and condition(obj, "Degraded").get("status") == "False")

        wait_until("healed once the PVC exists", healed, 90, interval=0.5)
        assert isvc(k8s, ns, "weights-missing")["status"]["problems"] == []
        recovered = why_events(k8s, ns, "weights-missing", "PodsRecovered")
        assert sorted(recovered) == [f"{pool}: no longer PodsUnschedulable"
                                     for pool in ("decode", "prefill", "router")], recovered


def test_unsatisfiable_placement_names_the_missing_resource(k8s: K8sEnv, ns: str) -> None:
    """A node selector no node matches (prefill) and more GPUs than any node has (decode):
    each pool says which, in the scheduler's words."""
    make_model_volume(k8s, ns)
    doc = small("nowhere")
    doc["spec"]["prefill"]["nodeSelector"] = {"splitserve.io/pool": "no-such-node"}
    doc["spec"]["decode"]["resources"] = {"requests": {"cpu": "1", "nvidia.com/gpu": 64},
                                          "limits": {"nvidia.com/gpu": 64}}  # fmt: skip
    with operator_in(k8s, ns, OPERATOR_ENV) as op:
        k8s.apply(doc, namespace=ns)
        cond = wait_degraded(k8s, op, ns, "nowhere", "PodsUnschedulable",
                             "prefill: 1/1 pods Pending: ", "decode: 1/1 pods Pending: ",
                             "Insufficient nvidia.com/gpu",
                             "didn't match Pod's node affinity/selector")  # fmt: skip
        print(cond["message"])
        wait_until("an Event per pool", lambda: len(why_events(
            k8s, ns, "nowhere", "PodsUnschedulable")) == 2, 20)  # fmt: skip


# ---------------------------------------------------------------- the test plays the kubelet --
@pytest.fixture
def kubelet_ns(k8s: K8sEnv) -> Iterator[str]:
    """A namespace whose pods land on the process-backed node, where nothing runs them."""
    ns = k8s.process_backed_namespace("why-kubelet")
    make_model_volume(k8s, ns)
    yield ns
    # no kubelet confirms these pods' deletion: remove them as one would for a lost node, so a
    # later pod_processes on that node never meets them
    def gone() -> bool:
        left = k8s.get_json("pods", "-n", ns)["items"]
        if left:
            k8s.kubectl("delete", "pods", "--all", "-n", ns, "--force", "--grace-period=0",
                        "--wait=false", check=False)  # fmt: skip
        return not left

    with contextlib.suppress(TimeoutError):
        wait_until(f"pods of {ns} removed", gone, 30, interval=1)


def set_status(k8s: K8sEnv, ns: str, pod: dict[str, Any], status: dict[str, Any]) -> None:
    """Write the pod's status subresource as its kubelet would (merge patch: lists replace)."""
    k8s.kubectl("patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status",
                "--type=merge", "-p", json.dumps({"status": status}))  # fmt: skip


def kubelet_status(container: dict[str, Any], phase: str, ready: bool,
                   ready_since: str) -> dict[str, Any]:
    conds = [{"type": t, "status": "True", "lastTransitionTime": ready_since}
             for t in ("PodReadyToStartContainers", "Initialized", "PodScheduled")]
    r = "True" if ready else "False"
    extra = {} if ready else {"reason": "ContainersNotReady",
                              "message": "containers with unready status: [prefill]"}
    conds += [{"type": t, "status": r, "lastTransitionTime": ready_since, **extra}
              for t in ("Ready", "ContainersReady")]
    return {"phase": phase, "hostIP": "127.240.0.1", "podIP": "127.244.199.1",
            "startTime": ready_since, "conditions": conds,
            "containerStatuses": [{"name": "prefill", "image": "splitserve:cpu", "imageID": "",
                                   "ready": ready, "restartCount": 0, **container}]}  # fmt: skip


def test_image_pull_crash_loop_and_readiness_named_from_the_kubelets_status(
    k8s: K8sEnv, kubelet_ns: str
) -> None:
    ns, name = kubelet_ns, "kubelet-says"
    with operator_in(k8s, ns, OPERATOR_ENV) as op:
        k8s.apply(small(name), namespace=ns)
        pod = wait_until("prefill pod scheduled", lambda: next(
            (p for p in pods_of(k8s, ns, name, "prefill") if p["spec"].get("nodeName")), None), 60)
        since = pod["metadata"]["creationTimestamp"]

        pull = {"waiting": {"reason": "ErrImagePull", "message": 'failed to pull and unpack image'
                            ' "docker.io/library/splitserve:cpu": pull access denied'}}
        set_status(k8s, ns, pod, kubelet_status({"state": pull, "started": False}, "Pending",
                                                False, since))  # fmt: skip
        wait_degraded(k8s, op, ns, name, "ImagePullFailing",
                      "prefill: 1/1 pods ErrImagePull: failed to pull", "pull access denied")
        back_off = {"waiting": {"reason": "ImagePullBackOff",
                                "message": 'Back-off pulling image "splitserve:cpu"'}}
        set_status(k8s, ns, pod, kubelet_status({"state": back_off, "started": False}, "Pending",
                                                False, since))  # fmt: skip
        wait_degraded(k8s, op, ns, name, "ImagePullFailing", "pods ImagePullBackOff: Back-off")

        crash = {"state": {"waiting": {"reason": "CrashLoopBackOff",
                                       "message": "back-off 20s restarting failed container"}},
                 "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                              "startedAt": since, "finishedAt": since}},
                 "started": False, "restartCount": 2}  # fmt: skip
        set_status(k8s, ns, pod, kubelet_status(crash, "Running", False, since))
        wait_degraded(k8s, op, ns, name, "CrashLooping",
                      "prefill: 1/1 pods CrashLoopBackOff: container prefill last exited with"
                      " code 137 (OOMKilled)")  # fmt: skip

        running = {"state": {"running": {"startedAt": since}}, "started": True}
        set_status(k8s, ns, pod, kubelet_status(running, "Running", False, since))
        probe = "Readiness probe failed: HTTP probe failed with statuscode: 503"
        k8s.apply({
            "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "Unhealthy",
            "metadata": {"name": f"{pod['metadata']['name']}.probe", "namespace": ns},
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": ns,
                               "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"],
                               "fieldPath": "spec.containers{prefill}"},
            "message": probe, "count": 4, "source": {"component": "kubelet", "host": "proc-node-0"},
        }, namespace=ns)  # fmt: skip
        # SPLITSERVE_NOT_READY_SECONDS=2, and the SLO tick re-reads: no pod change needed
        wait_degraded(k8s, op, ns, name, "ReadinessFailing", "prefill: 1/1 pods Running but not"
                      " Ready for ", probe)  # fmt: skip

        # one Warning per change of reason: the pull's two states share one. A tick that lands
        # while the restarted container runs but its readiness grace has not passed sees a
        # healthy pool and may say PodsRecovered (Normal) in between: a starting pod is no fault.
        warned = Counter((e["type"], e["reason"]) for e in events(k8s, ns, name)
                         if e["reason"] in WHY and e["type"] == "Warning")  # fmt: skip
        assert warned == Counter([("Warning", "ImagePullFailing"), ("Warning", "CrashLooping"),
                                  ("Warning", "ReadinessFailing")]), warned
