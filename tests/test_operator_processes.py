"""A served request inside the test cluster: the chart installed with helm, an InferenceService
applied with kubectl, and its pods run as real processes (tests/pod_processes.py): redis-server,
a prefill and a decode worker, a router. The openai client, through the router Service's
ClusterIP, gets the greedy output of transformers; the operator's SLO loop scrapes the router pod
at its pod IP and ``kubectl get infsvc`` shows what that traffic measured; a worker pod deleted
under load is replaced and no request hangs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from k8s_env import K8sEnv, k8s_fixture, wait_until  # noqa: F401  (the session fixture `k8s`)
from pod_processes import PodProcesses
from splitserve.engine.demo_model import DemoModelSpec, init_demo_model
from splitserve.launcher.up import free_port
from test_e2e_disagg import PROMPTS, hf_reference
from test_operator_k8s import CHART, OperatorProcess, example, isvc, make_model_volume, wait_ready

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240, func_only=True)]

NAME = "tiny"
MAX_TOKENS = 16
MODEL = DemoModelSpec(model_type="qwen2", tie_word_embeddings=True, num_heads=4, num_kv_heads=1,
                      seed=1)  # fmt: skip


@dataclass
class Served:
    """The running service: where its model lives, its namespace and its router's address."""

    k8s: K8sEnv
    node: PodProcesses
    op: OperatorProcess
    ns: str
    model: Path
    router_ip: str

    @property
    def base_url(self) -> str:
        return f"http://{self.router_ip}:8000/v1"

    def pods(self, component: str) -> list[dict]:
        sel = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component={component}"
        return self.k8s.get_json("pods", "-n", self.ns, "-l", sel)["items"]

    def client(self, timeout: float = 30):  # noqa: ANN201 (openai.OpenAI, imported lazily)
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=timeout)


def helm_install(k8s: K8sEnv, system: str, watched: str) -> None:
    """The chart, its operator watching ``watched`` with least-privilege RBAC there."""
    k8s.helm("install", "splitserve", str(CHART), "--namespace", system,
             "--set", "image.repository=splitserve",
             "--set", f"operator.watchNamespaces={{{watched}}}",
             "--wait", "--timeout", "120s", timeout=180)  # fmt: skip


@pytest.fixture(scope="module")
def served(k8s: K8sEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    models = tmp_path_factory.mktemp("srv-models")
    model = init_demo_model(models / "tiny-qwen2", MODEL)
    ns = k8s.process_backed_namespace("e2e")
    make_model_volume(k8s, ns)  # PV hostPath /srv/models, mapped to `models` below
    system = k8s.create_namespace("e2e-system")
    helm_install(k8s, system, ns)
    # the chart's operator pod is kwok's (its image is not here): the same operator runs here,
    # as the chart's ServiceAccount, so its RBAC is what is exercised
    sa_config = k8s.token_kubeconfig(system, "splitserve", k8s.root / "sa-e2e.kubeconfig")
    op = OperatorProcess(k8s, ns, kubeconfig=sa_config,
                         extra=(f"--liveness=http://127.0.0.1:{free_port()}/healthz",),
                         env={"SPLITSERVE_SLO_TICK_SECONDS": "1"}).start()  # fmt: skip
    with PodProcesses(k8s, {"/srv/models": models}) as node:
        try:
            doc = example(NAME)
            doc["spec"]["decode"]["replicas"] = 1
            doc["spec"]["autoscaling"] = {"enabled": False, "windowSeconds": 2}
            k8s.apply(doc, namespace=ns)
            wait_ready(k8s, op, ns, NAME, timeout=180)
            router_ip = k8s.get_json("service", f"{NAME}-router", "-n", ns)["spec"]["clusterIP"]
            node.wait_reachable(router_ip, 8000)
            yield Served(k8s, node, op, ns, model, router_ip)
            k8s.kubectl("delete", "infsvc", NAME, "-n", ns, "--wait=true", timeout=200)
            wait_until("pods gone", lambda: not k8s.get_json("pods", "-n", ns)["items"], 60)
            assert "Traceback" not in op.log(), op.log()[-4000:]
        except BaseException:
            print(op.log()[-5000:])
            print(node.logs(ns)[-12000:])
            raise
        finally:
            op.stop()
            with contextlib.suppress(RuntimeError):
                k8s.helm("uninstall", "splitserve", "--namespace", system, "--wait", timeout=120)
            k8s.kubectl("delete", "namespace", ns, system, "--wait=false")


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, served: Served) -> Iterator[None]:
    """A failed test prints the operator's and the pods' logs (the call's report is counted
    before this teardown runs)."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        print(served.op.log()[-5000:])
        print(served.node.logs(served.ns)[-12000:])
        print("kubelet errors:", served.node.errors[-10:])


def complete(client, prompt: str) -> str:  # noqa: ANN001
    r = client.completions.create(model="tiny-qwen2", prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    return r.choices[0].text


def test_openai_client_through_router_service_matches_transformers(served: Served) -> None:
    client = served.client()
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(lambda p: complete(client, p), PROMPTS))
    assert texts == hf_reference(served.model, PROMPTS, MAX_TOKENS)
    # every pod ran for real at its own address
    for component in ("prefill", "decode", "router", "redis"):
        (pod,) = served.pods(component)
        assert pod["status"]["podIP"].startswith("127.244.200."), pod["status"]
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("process://")
    # the real redis-server got its password from the Secret (a config file, not an argument)
    import redis

    (redis_pod,) = served.pods("redis")
    anonymous = redis.Redis(host=redis_pod["status"]["podIP"], port=6379, socket_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()


def test_status_shows_ttft_tpot_attainment_measured_from_traffic(served: Served) -> None:
    """The SLO loop scrapes the router pod at its pod IP; what it saw reaches the status and
    ``kubectl get infsvc``."""
    client = served.client()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            complete(client, PROMPTS[0])

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(traffic)
        try:
            status = wait_until("measured status", lambda: (
                (st := isvc(served.k8s, served.ns, NAME).get("status", {})).get("ttftMs")
                and st.get("tpotMs") and st.get("attainment") is not None and st), 60)  # fmt: skip
        finally:
            stop.set()
        load.result(30)
    assert 0 < status["ttftMs"] < 60_000 and 0 < status["tpotMs"] < 10_000, status
    assert 0 <= status["attainment"] <= 1
    table = served.k8s.kubectl("get", "infsvc", NAME, "-n", served.ns).stdout
    header, row = table.splitlines()[:2]
    values = dict(zip(header.split(), row.split(), strict=False))
    assert values["TTFT"] not in ("", "<none>") and values["TPOT"] not in ("", "<none>"), table


def test_worker_pod_deleted_under_load_is_replaced_and_no_request_hangs(served: Served) -> None:
    """Two decode pods; one is deleted while three users send requests: its preStop drains it,
    the Deployment replaces it, and every request gets an answer: tokens, or a clear error at
    once, never a hang."""
    k8s, ns = served.k8s, served.ns
    k8s.kubectl("patch", "infsvc", NAME, "-n", ns, "--type=merge",
                "-p", '{"spec": {"decode": {"replicas": 2}}}')  # fmt: skip
    wait_until("2 decode pods Ready", lambda: len(ready_pods(served, "decode")) == 2, 90)
    old_name = ready_pods(served, "decode")[0]
    client = served.client(timeout=30)
    stop = threading.Event()
    outcomes: list[str] = []

    def user() -> None:
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        while not stop.is_set():
            try:
                complete(client, PROMPTS[1])
                outcomes.append("ok")
                continue
            except APITimeoutError:
                outcomes.append("hung")
            except APIStatusError as exc:
                outcomes.append(f"http {exc.status_code}: {exc.message[:120]}")
            except APIConnectionError as exc:
                outcomes.append(f"connection: {exc}")
            time.sleep(0.2)  # a client backs off before it retries

    def replaced() -> bool:
        names = ready_pods(served, "decode")
        return len(names) == 2 and old_name not in names

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        users = [pool.submit(user) for _ in range(3)]
        try:
            wait_until("load flowing", lambda: outcomes.count("ok") >= 3, 30)
            k8s.kubectl("delete", "pod", old_name, "-n", ns, "--wait=false")
            wait_until("the deleted decode pod replaced", replaced, 120, interval=0.5)
            served_before = outcomes.count("ok")
            wait_until("requests served after the replacement",
                       lambda: outcomes.count("ok") >= served_before + 3, 60)  # fmt: skip
        finally:
            stop.set()
        for u in users:
            u.result(60)  # every user loop ended: no request outlived its timeout
    wait_until("the old decode pod drained and removed",
               lambda: old_name not in [p["metadata"]["name"] for p in served.pods("decode")],
               60)  # fmt: skip
    failed = [o for o in outcomes if o != "ok"]
    print(f"{len(outcomes)} requests while a decode pod was deleted; failed: {failed}")
    assert "hung" not in outcomes, outcomes
    assert not failed, failed
    assert complete(served.client(), PROMPTS[0]) == hf_reference(served.model, PROMPTS[:1],
                                                                 MAX_TOKENS)[0]  # fmt: skip


def ready_pods(served: Served, component: str) -> list[str]:
    """Names of the component's Ready, non-terminating pods."""
    return sorted(
        p["metadata"]["name"] for p in served.pods(component)
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True"
                for c in p["status"].get("conditions", []))
    )  # fmt: skip


LONG_PROMPT = "cluster pod node memory compute batch stream transfer layer attention " * 40


def test_autoscaling_long_prompt_ramp_raises_prefill_only_and_idle_returns_to_min(
    served: Served,
) -> None:
    """Autoscaling on real traffic: a ramp of long prompts with few tokens out raises prefill
    (prompt tokens/s over one replica's capacity) and not decode (few sequences at once); idle,
    both pools return to their minimum; no request fails; the Scaled Events say why."""
    k8s, ns = served.k8s, served.ns
    patch = {"spec": {
        "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 2},
        "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 2},
        "autoscaling": {"enabled": True, "windowSeconds": 2, "scaleUpCooldownSeconds": 0,
                        "scaleDownCooldownSeconds": 8, "prefillTokensPerSecond": 300,
                        "decodeSequencesPerReplica": 16},
    }}  # fmt: skip
    k8s.kubectl("patch", "infsvc", NAME, "-n", ns, "--type=merge", "-p", json.dumps(patch))
    wait_until("1 prefill and 1 decode pod", lambda: len(served.pods("decode")) == 1
               and len(ready_pods(served, "prefill")) == 1, 90)  # fmt: skip

    def replicas() -> tuple[int, int]:
        return tuple(k8s.get_json("deployment", f"{NAME}-{pool}", "-n", ns)["spec"]["replicas"]
                     for pool in ("prefill", "decode"))  # type: ignore[return-value]

    client = served.client(timeout=60)
    users: list[concurrent.futures.Future] = []
    stop = threading.Event()
    outcomes: list[str] = []
    seen: list[tuple[int, int]] = []

    def user() -> None:
        while not stop.is_set():
            try:
                client.completions.create(model="tiny-qwen2", prompt=LONG_PROMPT, max_tokens=2,
                                          temperature=0)  # fmt: skip
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001 (every failure is counted, not raised)
                outcomes.append(repr(exc)[:200])

    def watch(goal: tuple[int, int]) -> bool:
        seen.append(replicas())
        return seen[-1] == goal and len(ready_pods(served, "prefill")) == goal[0]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        try:
            for _ in range(3):  # the ramp: one more user every few seconds
                users.append(pool.submit(user))
                time.sleep(3)
            wait_until("prefill scaled to 2 and serving", lambda: watch((2, 1)), 90, interval=1)
            time.sleep(3)  # traffic on both prefill pods
        finally:
            stop.set()
        for u in users:
            u.result(90)
    try:
        wait_until("idle: both pools back to 1", lambda: watch((1, 1)), 90, interval=1)
    except TimeoutError:
        print("STATUS", json.dumps(isvc(k8s, ns, NAME).get("status", {}).get("autoscaling")))
        raise
    wait_until("the scaled-down prefill pod removed", lambda: len(served.pods("prefill")) == 1, 60)
    assert max(d for _, d in seen) == 1, seen  # decode never scaled
    failed = [o for o in outcomes if o != "ok"]
    assert outcomes and not failed, failed
    sel = f"involvedObject.name={NAME},reason=Scaled"
    events = [e["message"] for e in k8s.get_json("events", "-n", ns, "--field-selector", sel)
              ["items"]]  # fmt: skip
    assert any("prefill: 1->2" in m for m in events), events
    assert any("prefill: 2->1" in m for m in events), events
    print("\n".join(events))
