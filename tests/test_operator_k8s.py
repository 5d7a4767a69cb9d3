"""The operator against a real control plane (etcd, kube-apiserver, controller-manager,
scheduler, kwok fake nodes): CRD validation, children, pods Ready, status, resize, restart,
delete, the SLO loop scaling pools from a router's /metrics (a real HTTP server on loopback), and
the Helm chart installed with its own least-privilege RBAC.

The control plane starts once for the session (tests/k8s_env.py); each group of tests uses its
own namespace. The operator runs as a real process (``python -m splitserve.operator.main``), so
"kill and restart" is a SIGKILL.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_env import (
    REPO,
    K8sEnv,
    die_with_parent,
    k8s_fixture,  # noqa: F401  (the session fixture `k8s`)
    wait_until,
)
from splitserve.launcher.up import free_port
from splitserve.operator import settings
from splitserve.router.metrics import RouterMetrics
from test_operator_observe import MetricsStub

# func_only: a first run on a fresh machine builds the binaries inside the session fixture
# (scripts/k8s-build.sh, its own time limit); only the test bodies are bounded here.
pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300, func_only=True)]

CHART = REPO / "charts" / "splitserve"
CRD_FILE = CHART / "crds" / "inferenceservices.splitserve.io.yaml"
EXAMPLE = CHART / "examples" / "inferenceservice.yaml"
COMPONENTS = ("prefill", "decode", "router", "redis")
CHILD_KINDS = "deployments,services,configmaps,poddisruptionbudgets"


class OperatorProcess:
    """``python -m splitserve.operator.main`` as a child process with a log file."""

    def __init__(
        self,
        k8s: K8sEnv,
        namespace: str,
        kubeconfig: Path | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.k8s = k8s
        self.extra = extra
        self.env = env or {}
        self.namespace = namespace
        self.kubeconfig = kubeconfig or k8s.kubeconfig
        self.log_path = k8s.root / f"operator-{namespace}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> OperatorProcess:
        env = {**self.k8s.env, "KUBECONFIG": str(self.kubeconfig), "SPLITSERVE_WATCH_TIMEOUT": "30",
               **self.env}  # fmt: skip
        argv = [sys.executable, "-m", "splitserve.operator.main", "--namespace", self.namespace,
                "--standalone", "--verbose", *self.extra]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.k8s.root,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def assert_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"operator exited:\n{self.log()[-4000:]}")


# ---------------------------------------------------------------- helpers -----------------------
@contextlib.contextmanager
def operator_in(k8s: K8sEnv, ns: str, env: dict[str, str]) -> Iterator[OperatorProcess]:
    """An operator for one test's namespace: its log is printed if the test fails, it must log
    no traceback, and the namespace is deleted with it."""
    op = OperatorProcess(k8s, ns, env=env).start()
    try:
        yield op
        log = op.log()
        assert "Traceback" not in log, log[-4000:]
    except BaseException:
        print(op.log()[-6000:])
        raise
    finally:
        op.stop()
        k8s.kubectl("delete", "namespace", ns, "--wait=false")


def example(name: str | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    if name:
        doc["metadata"]["name"] = name
    return doc


def isvc(k8s: K8sEnv, ns: str, name: str) -> dict[str, Any]:
    return k8s.get_json("inferenceservice", name, "-n", ns)


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == ctype:
            return cond
    return {}


def children(k8s: K8sEnv, ns: str, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    items = k8s.get_json(CHILD_KINDS, "-n", ns, "-l", f"app.kubernetes.io/instance={name}")
    return {(o["kind"], o["metadata"]["name"]): o for o in items["items"]}


def snapshot(k8s: K8sEnv, ns: str, name: str) -> dict[tuple[str, str], tuple[str, Any]]:
    """What "changed nothing" compares: uid plus the spec generation where there is one
    (Deployments, PDBs: their status moves on its own), else the resourceVersion."""
    out = {}
    for key, obj in children(k8s, ns, name).items():
        meta = obj["metadata"]
        out[key] = (meta["uid"], meta.get("generation", meta["resourceVersion"]))
    return out


def applied_children(name: str, ns: str) -> int:
    """How many children the operator applies for the example InferenceService ``name``."""
    from splitserve.operator import manifests

    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    return len(manifests.render_all(name, ns, spec, secret=manifests.secret_values(None)))


def reconciled_events(k8s: K8sEnv, ns: str, name: str) -> list[str]:
    sel = f"involvedObject.name={name},reason=Reconciled"
    items = k8s.get_json("events", "-n", ns, "--field-selector", sel)["items"]
    return [e["message"] for e in sorted(items, key=lambda e: e["metadata"]["creationTimestamp"])]


def wait_ready(k8s: K8sEnv, op: OperatorProcess, ns: str, name: str, timeout: float = 90) -> dict:
    def ready() -> dict | None:
        op.assert_alive()
        k8s.check_alive()
        obj = isvc(k8s, ns, name)
        current = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
        return obj if current and condition(obj, "Ready").get("status") == "True" else None

    try:
        return wait_until(f"{name} Ready", ready, timeout, interval=0.5)
    except TimeoutError:
        print(op.log()[-6000:])
        print(json.dumps(isvc(k8s, ns, name).get("status"), indent=1))
        raise


def make_model_volume(k8s: K8sEnv, ns: str, claim: str = "models") -> None:
    """The example reads its model from PVC "models" (``claim``): a hostPath PV bound by the
    controller."""
    pv = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{claim}-{ns}"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                 "hostPath": {"path": "/srv/models"}, "storageClassName": "manual",
                 "claimRef": {"namespace": ns, "name": claim}},
    }  # fmt: skip
    pvc = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": ns},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "manual",
                 "volumeName": f"{claim}-{ns}", "resources": {"requests": {"storage": "1Gi"}}},
    }  # fmt: skip
    k8s.apply([pv, pvc])
    wait_until("PVC bound", lambda: k8s.get_json("pvc", claim, "-n", ns)
               .get("status", {}).get("phase") == "Bound", 60)  # fmt: skip


# ---------------------------------------------------------------- fixtures ----------------------
@pytest.fixture(scope="module")
def crd_installed(k8s: K8sEnv) -> None:
    k8s.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    k8s.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                f"crd/{'inferenceservices.splitserve.io'}")  # fmt: skip


@pytest.fixture(scope="module")
def ns(k8s: K8sEnv, crd_installed: None) -> str:
    name = k8s.create_namespace("serving")
    make_model_volume(k8s, name)
    return name


@pytest.fixture(scope="module")
def operator(k8s: K8sEnv, ns: str) -> Iterator[OperatorProcess]:
    op = OperatorProcess(k8s, ns).start()
    try:
        yield op
    finally:
        op.stop()


# ---------------------------------------------------------------- tests -------------------------
@pytest.mark.parametrize(
    "patch, field",
    [
        ({"decode": {"replicas": -1}}, "spec.decode.replicas"),
        ({"kvTransfer": {"backend": "carrier-pigeon"}}, "spec.kvTransfer.backend"),
        ({"model": None}, "spec.model"),
        ({"model": {"name": "m"}}, "spec.model"),
        ({"model": {"name": "m", "path": "/m", "pvc": {"claimName": "x"}}}, "spec.model"),
        ({"prefill": {"replicas": 1, "minReplicas": 3, "maxReplicas": 2}},
         "spec.prefill.minReplicas"),
        ({"decode": {"replicas": 9, "maxReplicas": 8}}, "spec.decode.replicas"),
        ({"slo": {"attainment": 1.5}}, "spec.slo.attainment"),
        ({"redis": {"url": "redis://x:6379"}}, "spec.redis.url"),
        ({"image": None}, "spec.image"),
        ({"decode": {"replicaz": 2}}, "spec.decode.replicaz"),  # unknown fields are refused
        ({"decode": {"resources": {"requests": {"cpu": "lots"}}}},
         "spec.decode.resources.requests.cpu"),
        ({"router": {"limits": {"maxBodyBytes": 0}}}, "spec.router.limits.maxBodyBytes"),
        ({"router": {"limits": {"headerTimeoutSeconds": 0}}},
         "spec.router.limits.headerTimeoutSeconds"),
        ({"router": {"failover": {"streamStallTimeoutSeconds": 0}}},
         "spec.router.failover.streamStallTimeoutSeconds"),
        ({"router": {"failover": {"maxAttempts": 0}}}, "spec.router.failover.maxAttempts"),
        ({"router": {"admission": {"maxQueueMilliseconds": -1}}},
         "spec.router.admission.maxQueueMilliseconds"),
    ],
)  # fmt: skip
def test_invalid_resources_refused_naming_the_field(
    k8s: K8sEnv,
    crd_installed: None,
    patch: dict,
    field: str,
) -> None:
    doc = example("bad")
    for key, value in patch.items():
        if value is None:
            doc["spec"].pop(key)
        else:
            doc["spec"][key] = value
    got = k8s.kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-",
        input=yaml.safe_dump(doc), check=False,
    )  # fmt: skip
    assert got.returncode != 0, f"accepted: {patch}"
    assert field in got.stderr, got.stderr


def test_apply_creates_children_pods_ready_and_status(
    k8s: K8sEnv,
    ns: str,
    operator: OperatorProcess,
) -> None:
    k8s.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    obj = wait_ready(k8s, operator, ns, "tiny")
    kids = children(k8s, ns, "tiny")
    uid = obj["metadata"]["uid"]
    # no finalizer: children go by owner references, so deleting never needs the operator
    assert not obj["metadata"].get("finalizers")
    assert len(kids) == 12, sorted(kids)
    for key, child in kids.items():
        refs = child["metadata"].get("ownerReferences", [])
        assert [(r["kind"], r["uid"], r.get("controller")) for r in refs] == [
            ("InferenceService", uid, True)
        ], key
    decode = kids[("Deployment", "tiny-decode")]
    assert decode["spec"]["replicas"] == 2
    cmd = decode["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["splitserve", "decode"] and "--kv-port" in cmd
    assert cmd[cmd.index("--model") + 1] == "/models/tiny-qwen2"
    assert decode["spec"]["template"]["spec"]["volumes"][-1]["persistentVolumeClaim"] == {
        "claimName": "models", "readOnly": True,
    }  # fmt: skip
    # pods really scheduled on kwok nodes and Ready
    pods = k8s.get_json("pods", "-n", ns, "-l", "app.kubernetes.io/instance=tiny")["items"]
    assert len(pods) == 1 + 2 + 1 + 1  # prefill, decode x2, router, redis
    for pod in pods:
        assert pod["spec"]["nodeName"].startswith("kwok-node-")
        assert condition(pod, "Ready").get("status") == "True"
    st = obj["status"]
    assert st["prefill"]["ready"] == "1/1" and st["decode"]["ready"] == "2/2"
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    assert st["endpoint"] == f"http://tiny-router.{ns}.svc:8000"
    assert condition(obj, "Progressing")["status"] == "False"
    assert condition(obj, "Degraded")["status"] == "False"
    table = k8s.kubectl("get", "infsvc", "tiny", "-n", ns).stdout.split("\n")
    header = table[0].split()
    assert header[:5] == ["NAME", "READY", "PREFILL", "DECODE", "ENDPOINT"], table
    assert {"TTFT", "TPOT", "AGE"} <= set(header)
    assert table[1].split()[:5] == ["tiny", "True", "1/1", "2/2", st["endpoint"]], table
    assert reconciled_events(k8s, ns, "tiny"), "no Reconciled event"
    assert_every_cluster_address_is_loopback(k8s)


def assert_every_cluster_address_is_loopback(k8s: K8sEnv) -> None:
    """Every pod IP, host IP, node address and Service IP the test cluster hands out is in
    127.0.0.0/8: the operator and the tests follow these addresses, and no server of ours is at
    any other (issue 12)."""
    seen: list[tuple[str, str]] = []
    for pod in k8s.get_json("pods", "-A")["items"]:
        st, who = pod.get("status", {}), f"pod {pod['metadata']['name']}"
        seen += [(who, a) for a in [st.get("podIP"), st.get("hostIP")] if a]
        seen += [(who, a["ip"]) for a in st.get("podIPs", []) + st.get("hostIPs", [])]
    for node in k8s.get_json("nodes")["items"]:
        for addr in node.get("status", {}).get("addresses", []):
            if addr["type"] in ("InternalIP", "ExternalIP"):
                seen.append((f"node {node['metadata']['name']}", addr["address"]))
    for svc in k8s.get_json("services", "-A")["items"]:
        ips = svc["spec"].get("clusterIPs") or [svc["spec"].get("clusterIP")]
        seen += [(f"service {svc['metadata']['name']}", ip) for ip in ips if ip and ip != "None"]
    assert any(who.startswith("pod") for who, _ in seen), "no pod addresses to check"
    off_loopback = [(who, a) for who, a in seen if not ipaddress.ip_address(a).is_loopback]
    assert not off_loopback, off_loopback


def test_edit_decode_replicas_changes_only_decode(
    k8s: K8sEnv,
    ns: str,
    operator: OperatorProcess,
) -> None:
    before = snapshot(k8s, ns, "tiny")
    k8s.kubectl("patch", "infsvc", "tiny", "-n", ns, "--type=merge",
                "-p", '{"spec": {"decode": {"replicas": 3}}}')  # fmt: skip
    wait_until(
        "decode Deployment at 3",
        lambda: k8s.get_json("deployment", "tiny-decode", "-n", ns)["spec"]["replicas"] == 3,
        30,
    )
    obj = wait_ready(k8s, operator, ns, "tiny")
    wait_until("decode 3/3 in status",
               lambda: isvc(k8s, ns, "tiny")["status"]["decode"]["ready"] == "3/3", 30)  # fmt: skip
    after = snapshot(k8s, ns, "tiny")
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == [("Deployment", "tiny-decode")]
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]


def test_router_options_reach_the_router_args_only(
    k8s: K8sEnv,
    ns: str,
    operator: OperatorProcess,
) -> None:
    before = snapshot(k8s, ns, "tiny")

    def router_command() -> list[str]:
        dep = k8s.get_json("deployment", "tiny-router", "-n", ns)
        return dep["spec"]["template"]["spec"]["containers"][0]["command"]

    k8s.kubectl("patch", "infsvc", "tiny", "-n", ns, "--type=merge",
                "-p", '{"spec": {"router": {"limits": {"maxSequences": 8},'
                ' "failover": {"streamStallTimeoutSeconds": 0.5},'
                ' "admission": {"maxQueueMilliseconds": 0}}}}')  # fmt: skip
    wait_until("--max-sequences 8 on the router", lambda: "--max-sequences" in router_command(), 30)
    command = router_command()
    assert command[command.index("--max-sequences") + 1] == "8"
    assert command[command.index("--stream-stall-timeout") + 1] == "0.5"
    assert command[command.index("--max-queue-ms") + 1] == "0"  # 0 is a value here: never wait
    wait_ready(k8s, operator, ns, "tiny")
    after = snapshot(k8s, ns, "tiny")
    assert sorted(k for k in before if before[k] != after[k]) == [("Deployment", "tiny-router")]


def test_reapply_and_operator_restart_change_nothing(
    k8s: K8sEnv,
    ns: str,
    operator: OperatorProcess,
) -> None:
    before = snapshot(k8s, ns, "tiny")
    events = len(reconciled_events(k8s, ns, "tiny"))
    operator.stop(kill=True)  # SIGKILL: no graceful shutdown
    operator.start()
    wait_until("resume reconcile", lambda: len(reconciled_events(k8s, ns, "tiny")) > events, 60)
    # every child the operator applies (those CHILD_KINDS lists, the Secret, NetworkPolicies)
    assert reconciled_events(k8s, ns, "tiny")[-1] == f"resume: {applied_children('tiny', ns)} unchanged"
    wait_ready(k8s, operator, ns, "tiny")
    assert snapshot(k8s, ns, "tiny") == before

    # a change made while the operator is down is picked up on restart, and only that
    operator.stop(kill=True)
    k8s.kubectl("patch", "infsvc", "tiny", "-n", ns, "--type=merge",
                "-p", '{"spec": {"router": {"replicas": 2}}}')  # fmt: skip
    operator.start()
    wait_until(
        "router Deployment at 2",
        lambda: k8s.get_json("deployment", "tiny-router", "-n", ns)["spec"]["replicas"] == 2,
        60,
    )
    wait_ready(k8s, operator, ns, "tiny")
    after = snapshot(k8s, ns, "tiny")
    assert sorted(k for k in before if before[k] != after[k]) == [("Deployment", "tiny-router")]


def test_model_change_rolls_prefill_and_decode_together(
    k8s: K8sEnv,
    ns: str,
    operator: OperatorProcess,
) -> None:
    def generations() -> dict[str, str]:
        out = {}
        for comp in ("prefill", "decode"):
            dep = k8s.get_json("deployment", f"tiny-{comp}", "-n", ns)
            out[comp] = dep["spec"]["template"]["metadata"]["labels"][
                "splitserve.io/serving-generation"
            ]
        return out

    old = generations()
    k8s.kubectl("patch", "infsvc", "tiny", "-n", ns, "--type=merge",
                "-p", '{"spec": {"image": "splitserve:cpu-v2"}}')  # fmt: skip
    # The two Deployments are separate API writes, so a read can land between them: wait for
    # both to leave the old generation, then require that they arrived at the same one.
    new = wait_until(
        "new generation on both pools",
        lambda: (g := generations())["prefill"] != old["prefill"]
        and g["decode"] != old["decode"]
        and g,
        30,
    )
    assert new["prefill"] == new["decode"]
    obj = wait_ready(k8s, operator, ns, "tiny", timeout=120)
    assert obj["status"]["servingGeneration"] == new["prefill"]


def test_child_refused_by_api_server_sets_degraded_then_heals(
    k8s: K8sEnv,
    ns: str,
    operator: OperatorProcess,
) -> None:
    doc = example("broken")
    doc["spec"]["prefill"]["nodeSelector"] = {"not a label!": "x"}  # the Deployment refuses it
    k8s.apply(doc, namespace=ns)

    def degraded() -> dict | None:
        operator.assert_alive()
        obj = isvc(k8s, ns, "broken")
        return obj if condition(obj, "Degraded").get("status") == "True" else None

    obj = wait_until("Degraded", degraded, 60)
    cond = condition(obj, "Degraded")
    assert cond["reason"] == "ReconcileError" and "broken-prefill" in cond["message"]
    assert condition(obj, "Ready")["status"] == "False"
    k8s.kubectl("patch", "infsvc", "broken", "-n", ns, "--type=merge",
                "-p", '{"spec": {"prefill": {"nodeSelector": null}}}')  # fmt: skip
    healed = wait_ready(k8s, operator, ns, "broken")
    assert condition(healed, "Degraded")["status"] == "False"
    k8s.kubectl("delete", "infsvc", "broken", "-n", ns, "--wait=true", "--timeout=60s")


def test_delete_removes_everything(
    k8s: K8sEnv,
    ns: str,
    operator: OperatorProcess,
) -> None:
    k8s.kubectl("delete", "infsvc", "tiny", "-n", ns, "--wait=true", "--timeout=60s")

    def gone() -> bool:
        left = k8s.get_json(CHILD_KINDS + ",pods,replicasets", "-n", ns,
                            "-l", "app.kubernetes.io/instance=tiny")["items"]  # fmt: skip
        return not left

    wait_until("children garbage-collected", gone, 90, interval=1)


def test_slo_loop_scales_pools_from_router_metrics(k8s: K8sEnv, crd_installed: None) -> None:
    """A router under load (stub /metrics: 30 sequences in flight, 10k prompt tokens/s, 4 of 5
    requests in SLO) -> status TTFT/TPOT/attainment, decode 1 -> 4 and prefill 1 -> 3 with a
    Scaled Event; a reconcile keeps the planner's sizes; autoscaling off restores the spec's."""
    ns = k8s.create_namespace("slo")

    def load(m: RouterMetrics, prompt: Any) -> None:  # one scrape interval of traffic
        for ttft in (0.3, 0.3, 0.3, 0.3, 0.7):
            m.observe_sequence(ttft, 0.04, 2.0, 10, slo_ttft_s=0.5, slo_tpot_s=0.05)
        m.inflight.set(30)
        prompt.inc(10_000)

    def replicas(comp: str) -> int:
        return k8s.get_json("deployment", f"auto-{comp}", "-n", ns)["spec"]["replicas"]

    def events(reason: str) -> list[str]:
        sel = f"involvedObject.name=auto,reason={reason}"
        items = k8s.get_json("events", "-n", ns, "--field-selector", sel)["items"]
        return [e["message"] for e in items]

    with MetricsStub(load) as stub:
        env = {"SPLITSERVE_METRICS_URL": stub.url, "SPLITSERVE_SLO_TICK_SECONDS": "1"}
        with operator_in(k8s, ns, env) as op:
            doc = example("auto")
            doc["spec"] |= {
                "model": {"name": "tiny-qwen2", "path": "/models/tiny-qwen2"},
                "redis": {"managed": False, "url": "redis://redis.example:6379/0"},
                "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3},
                "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
                "autoscaling": {"enabled": True, "windowSeconds": 1, "scaleUpCooldownSeconds": 0,
                                "decodeSequencesPerReplica": 10, "prefillTokensPerSecond": 2000},
            }  # fmt: skip
            k8s.apply(doc, namespace=ns)
            # 30 / (10 * 0.8) -> 4 decode; 10k tokens/s / (2000 * 0.8) -> 7, bounded to 3 prefill
            wait_until("decode scaled to 4",
                       lambda: op.assert_alive() or replicas("decode") == 4, 40)  # fmt: skip
            assert replicas("prefill") == 3
            st = isvc(k8s, ns, "auto")["status"]
            # per interval 4 TTFTs in (0.25, 0.5] and 1 in (0.5, 1]: p90 = 0.5 + 0.5 * 0.5
            assert st["ttftMs"] == 750.0 and st["tpotMs"] == 38.0 and st["attainment"] == 0.8
            assert st["observed"]["concurrentSequences"] == 30
            assert st["lastScaling"]["decode"] == {"from": 1, "to": 4}
            assert st["autoscaling"]["decode"]["replicas"] == 4
            (scaled,) = wait_until("Scaled Event", lambda: events("Scaled"), 10)
            assert "decode: 1->4" in scaled and "prefill: 1->3" in scaled, scaled
            assert k8s.get_json("infsvc", "auto", "-n", ns)["spec"]["decode"]["replicas"] == 1
            wait_until("status decode 4/4", lambda: isvc(k8s, ns, "auto")["status"]["decode"]
                       ["ready"] == "4/4", 30)  # fmt: skip

            # a spec edit reconciles every child: the planner's sizes stay
            before = len(reconciled_events(k8s, ns, "auto"))
            k8s.kubectl("patch", "infsvc", "auto", "-n", ns, "--type=merge",
                        "-p", '{"spec": {"slo": {"ttftMs": 600}}}')  # fmt: skip
            wait_until("update reconciled",
                       lambda: len(reconciled_events(k8s, ns, "auto")) > before, 30)  # fmt: skip
            assert (replicas("prefill"), replicas("decode")) == (3, 4)

            # autoscaling off: the spec's replicas again
            k8s.kubectl("patch", "infsvc", "auto", "-n", ns, "--type=merge",
                        "-p", '{"spec": {"autoscaling": {"enabled": false}}}')  # fmt: skip
            wait_until("decode back to 1", lambda: replicas("decode") == 1, 30)
            assert replicas("prefill") == 1


def test_helm_lint_and_template_valid_against_api_server(
    k8s: K8sEnv,
    crd_installed: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lint = k8s.helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in lint.stdout, lint.stdout
    for values in ([], ["--set", "operator.allNamespaces=true"],
                   ["--set", "operator.watchNamespaces={default,kube-public}"],
                   ["--set", "operator.slo.latencyModelConfigMap=latency"]):  # fmt: skip
        rendered = k8s.helm("template", "rel", str(CHART), "--namespace", "default",
                            "--include-crds", *values).stdout  # fmt: skip
        kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
        assert {"Deployment", "ServiceAccount", "CustomResourceDefinition"} <= kinds
        k8s.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    # routerLimits and routerFailover reach the operator as its defaults for every router, read
    # as it reads them
    rendered = k8s.helm("template", "rel", str(CHART), "--set", "routerLimits.maxSequences=8",
                        "--set", "routerLimits.headerTimeoutSeconds=2.5",
                        "--set", "routerFailover.streamStallTimeoutSeconds=0.5").stdout
    op = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}
    for var in ("SPLITSERVE_ROUTER_LIMITS", "SPLITSERVE_ROUTER_FAILOVER"):
        monkeypatch.setenv(var, env[var])
    assert settings._router_options("limits", "SPLITSERVE_ROUTER_LIMITS") == {
        "maxSequences": 8, "headerTimeoutSeconds": 2.5}
    assert settings._router_options("failover", "SPLITSERVE_ROUTER_FAILOVER") == {
        "streamStallTimeoutSeconds": 0.5}
    # every example the chart ships is a valid InferenceService
    k8s.kubectl("apply", "--dry-run=server", "-n", "default", "-f", str(CHART / "examples"))
    # the dashboard ConfigMap (on by default, applied above) and, when asked, a PodMonitor for
    # the router and worker pods (its CRD is Prometheus Operator's: rendered, not applied here)
    rendered = k8s.helm("template", "rel", str(CHART), "--set", "podMonitor.enabled=true",
                        "--set", "podMonitor.labels.release=prom").stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered) if d}
    monitor = docs["PodMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    dashboards = [d for d in yaml.safe_load_all(rendered)
                  if d and d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard")]
    assert len(dashboards) == 1 and json.loads(dashboards[0]["data"]["splitserve.json"])["panels"]


def test_helm_install_brings_operator_up_with_least_privilege(
    k8s: K8sEnv,
    crd_installed: None,
) -> None:
    ns = k8s.create_namespace("splitserve-system")
    make_model_volume(k8s, ns)
    k8s.helm("install", "splitserve", str(CHART), "--namespace", ns,
             "--set", "image.repository=splitserve", "--wait", "--timeout", "120s",
             timeout=180)  # fmt: skip
    try:
        dep = k8s.get_json("deployment", "splitserve", "-n", ns)
        assert dep["status"].get("availableReplicas") == 1
        cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[:3] == ["splitserve", "--log-level=INFO", "operator"]
        assert f"--namespace={ns}" in cmd and "--standalone" in cmd
        # the pod is fake (kwok): run the same operator here, as the chart's ServiceAccount
        sa_config = k8s.token_kubeconfig(ns, "splitserve", k8s.root / f"sa-{ns}.kubeconfig")
        live, prom = free_port(), free_port()
        flags = (f"--liveness=http://127.0.0.1:{live}/healthz", f"--metrics-port={prom}")
        op = OperatorProcess(k8s, ns, kubeconfig=sa_config, extra=flags).start()
        try:
            doc = example("helm-demo")
            doc["spec"]["decode"]["replicas"] = 1
            k8s.apply(doc, namespace=ns)
            obj = wait_ready(k8s, op, ns, "helm-demo")
            assert obj["status"]["decode"]["ready"] == "1/1"
            # the chart's probe and scrape targets answer
            with urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=5) as r:
                assert r.status == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{prom}/metrics", timeout=5) as r:
                assert (
                    b'splitserve_operator_reconciles_total{cause="create",result="ok"}' in r.read()
                )
            k8s.kubectl("delete", "infsvc", "helm-demo", "-n", ns, "--wait=true")
            log = op.log()
            assert "forbidden" not in log.lower(), log[-4000:]  # RBAC gave all it needs
        finally:
            op.stop()
        # least privilege: the operator's account cannot touch other namespaces or secrets
        for verb, what, where in (("list", "secrets", ns), ("create", "deployments", "default"),
                                  ("delete", "nodes", None)):  # fmt: skip
            args = ["auth", "can-i", verb, what, f"--as=system:serviceaccount:{ns}:splitserve"]
            args += ["-n", where] if where else []
            assert k8s.kubectl(*args, check=False).stdout.strip() == "no", (verb, what, where)
    finally:
        with contextlib.suppress(RuntimeError):
            k8s.helm("uninstall", "splitserve", "--namespace", ns, "--wait", timeout=120)
