"""Unit tests of the operator's pure parts: CRD, child renderers, status (no cluster)."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from splitserve.operator import crd, drain, manifests, metrics, status

REPO = Path(__file__).resolve().parent.parent
CRD_FILE = REPO / "charts" / "splitserve" / "crds" / "inferenceservices.splitserve.io.yaml"
EXAMPLE = REPO / "charts" / "splitserve" / "examples" / "inferenceservice.yaml"

SPEC = {"model": {"name": "tiny", "path": "/models/tiny"}, "image": "splitserve:cpu"}


def by_kind_name(children: list[dict]) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_operator_has_no_init_file() -> None:
    # an operator/__init__.py at the repo root would shadow the stdlib `operator` module
    assert not (REPO / "operator" / "__init__.py").exists()


def test_chart_crd_matches_python_source() -> None:
    assert CRD_FILE.read_text() == crd.render_yaml(), (
        "regenerate: python -m splitserve.operator.crd > " + str(CRD_FILE.relative_to(REPO))
    )


def test_router_policies_match_router() -> None:
    """The CRD's (and so the chart's) policy enum is the router's list of presets, in order."""
    config = pytest.importorskip("splitserve.router.config")
    from splitserve.router.policy.presets import PRESETS

    enum = crd.spec_schema()["properties"]["router"]["properties"]["policy"]["enum"]
    assert enum == crd.ROUTER_POLICIES == list(PRESETS) == list(config.POLICIES)


def test_defaults_fill_like_the_api_server() -> None:
    full = crd.defaulted_spec(SPEC)
    assert full["prefill"]["replicas"] == 1 and full["decode"]["tensorParallel"] == 1
    assert full["kvTransfer"] == {"backend": "auto"}
    assert full["redis"] == {"managed": True, "image": "redis:7-alpine"}
    assert full["slo"] == {"ttftMs": 1000, "tpotMs": 100, "attainment": 0.9}
    assert SPEC == {"model": {"name": "tiny", "path": "/models/tiny"}, "image": "splitserve:cpu"}


def test_render_all_children_and_commands() -> None:
    children = by_kind_name(manifests.render_all("demo", "ns1", SPEC))
    assert set(children) == {
        ("ConfigMap", "demo-config"),
        ("Deployment", "demo-redis"), ("Service", "demo-redis"),
        ("Deployment", "demo-prefill"), ("Service", "demo-prefill"),
        ("Deployment", "demo-decode"), ("Service", "demo-decode"),
        ("Deployment", "demo-router"), ("Service", "demo-router"),
        ("PodDisruptionBudget", "demo-prefill"), ("PodDisruptionBudget", "demo-decode"),
        ("PodDisruptionBudget", "demo-router"),
        ("NetworkPolicy", "demo-prefill"), ("NetworkPolicy", "demo-decode"),
        ("NetworkPolicy", "demo-router"), ("NetworkPolicy", "demo-redis"),
    }  # fmt: skip
    gen = manifests.serving_generation("demo", "ns1", crd.defaulted_spec(SPEC))
    redis = "redis://demo-redis:6379/0"
    prefill = container(children[("Deployment", "demo-prefill")])
    assert prefill["command"] == [
        "splitserve", "prefill", "--model", "/models/tiny", "--host", "$(POD_IP)", "--port", "8100",
        "--kv-backend", "auto", "--redis-url", redis, "--advertise-host", "$(POD_IP)",
        "--generation", gen, "--public-metrics",
    ]  # fmt: skip
    decode = container(children[("Deployment", "demo-decode")])
    assert decode["command"][:10] == [
        "splitserve", "decode", "--model", "/models/tiny", "--host", "$(POD_IP)",
        "--port", "8200", "--kv-port", "8300",
    ]  # fmt: skip
    assert {p["containerPort"] for p in decode["ports"]} == {8200, 8300}
    router = container(children[("Deployment", "demo-router")])
    assert router["command"] == [
        "splitserve", "router", "--model", "/models/tiny", "--served-model-name", "tiny",
        "--host", "0.0.0.0", "--port", "8000", "--redis-url", redis, "--policy", "goodput",
        "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100",  # the CR's SLO (defaults) reach the router
        "--public-metrics",
    ]  # fmt: skip
    assert children[("Service", "demo-prefill")]["spec"]["clusterIP"] == "None"
    assert children[("Service", "demo-decode")]["spec"]["clusterIP"] == "None"
    assert children[("Service", "demo-router")]["spec"]["type"] == "ClusterIP"
    assert manifests.endpoint("demo", "ns1") == "http://demo-router.ns1.svc:8000"


@pytest.mark.parametrize("component", ["prefill", "decode", "router"])
def test_pods_are_hardened_and_probed(component: str) -> None:
    children = by_kind_name(manifests.render_all("demo", "ns1", SPEC))
    dep = children[("Deployment", f"demo-{component}")]
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert "preStop" in c["lifecycle"]
    # the selector never includes the generation (it would make the selector mutable)
    assert manifests.LABEL_GENERATION not in dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["template"]["metadata"]["labels"][manifests.LABEL_GENERATION]


def test_worker_pools_drain_in_prestop() -> None:
    children = by_kind_name(manifests.render_all("demo", "ns1", SPEC))
    for role, port in (("prefill", "8100"), ("decode", "8200")):
        hook = container(children[("Deployment", f"demo-{role}")])["lifecycle"]["preStop"]
        assert hook["exec"]["command"][:4] == ["splitserve", "drain", "--port", port]


def test_generation_rolls_both_pools_but_not_on_resize() -> None:
    base = manifests.render_all("demo", "ns1", SPEC)
    resized = copy.deepcopy(SPEC) | {"decode": {"replicas": 3}}
    after_resize = manifests.render_all("demo", "ns1", resized)
    changed = [a for a, b in zip(base, after_resize, strict=True) if a != b]
    assert [(c["kind"], c["metadata"]["name"]) for c in changed] == [("Deployment", "demo-decode")]
    reimaged = copy.deepcopy(SPEC) | {"image": "splitserve:v2"}
    new = by_kind_name(manifests.render_all("demo", "ns1", reimaged))
    old = by_kind_name(base)

    def gen(children: dict, comp: str) -> str:
        dep = children[("Deployment", f"demo-{comp}")]
        return dep["spec"]["template"]["metadata"]["labels"][manifests.LABEL_GENERATION]

    assert gen(new, "prefill") == gen(new, "decode") != gen(old, "prefill")


def test_pvc_model_and_external_redis() -> None:
    spec = {
        "model": {"name": "m", "pvc": {"claimName": "models", "subPath": "qwen"}},
        "image": "img",
        "redis": {"managed": False, "url": "redis://shared:6379/3"},
        "decode": {"resources": {"limits": {"nvidia.com/gpu": "1"}}, "replicas": 2},
    }
    children = by_kind_name(manifests.render_all("svc", "ns", spec))
    assert ("Deployment", "svc-redis") not in children
    dec = children[("Deployment", "svc-decode")]
    c = container(dec)
    assert c["command"][c["command"].index("--model") + 1] == "/models/qwen"
    assert c["command"][c["command"].index("--redis-url") + 1] == "redis://shared:6379/3"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert dec["spec"]["replicas"] == 2
    vols = dec["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
    } in vols


def test_config_map_holds_serving_config() -> None:
    cm = manifests.render_all("demo", "ns1", SPEC)[0]
    assert cm["kind"] == "ConfigMap"
    config = yaml.safe_load(cm["data"]["serving.json"])
    assert config["model"] == {"name": "tiny", "dir": "/models/tiny"}
    assert config["kvTransfer"] == {"backend": "auto"}


def test_ucx_transports_reach_the_worker_pods_only() -> None:
    spec = {**SPEC, "kvTransfer": {"backend": "nixl", "ucxTransports": "rc,cuda_ipc,cuda_copy"}}
    children = by_kind_name(manifests.render_all("demo", "ns1", spec))
    for role in ("prefill", "decode"):
        worker = container(children[("Deployment", f"demo-{role}")])
        assert {"name": "UCX_TLS", "value": "rc,cuda_ipc,cuda_copy"} in worker["env"]
        assert worker["command"][worker["command"].index("--kv-backend") + 1] == "nixl"
    assert "UCX_TLS" not in {e["name"] for e in container(children[("Deployment", "demo-router")])["env"]}
    default = by_kind_name(manifests.render_all("demo", "ns1", SPEC))
    assert "UCX_TLS" not in {e["name"] for e in container(default[("Deployment", "demo-prefill")])["env"]}


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"image": "x"}, "spec.model"),
        ({"model": {"name": "m", "path": "/m"}}, "spec.image"),
        ({"model": {"name": "m"}, "image": "x"}, "model.path"),
        ({"model": {"name": "m", "path": "/m"}, "image": "x", "redis": {"managed": False}},
         "spec.redis.url"),
    ],
)  # fmt: skip
def test_render_refuses_bad_specs_naming_the_field(spec: dict, field: str) -> None:
    with pytest.raises(manifests.SpecError, match=field):
        manifests.render_all("demo", "ns", spec)


def test_example_renders() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    children = manifests.render_all(doc["metadata"]["name"], "default", doc["spec"])
    assert len(children) == 16  # 12 workloads and services + 4 NetworkPolicies


def _deployment(ready: int, updated: int, replicas: int, gen: int = 1, observed: int = 1) -> dict:
    return {
        "metadata": {"generation": gen},
        "status": {"readyReplicas": ready, "updatedReplicas": updated, "replicas": replicas,
                   "observedGeneration": observed},
    }  # fmt: skip


def test_status_ready_progressing_degraded() -> None:
    full = crd.defaulted_spec(SPEC | {"decode": {"replicas": 2}})
    deps = {c: _deployment(1, 1, 1) for c in ("prefill", "router", "redis")}
    deps["decode"] = _deployment(1, 2, 2)
    st = status.compute(full, deps, generation=3)
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["decode"]["ready"] == "1/2" and st["prefill"]["ready"] == "1/1"
    assert conds["Ready"]["status"] == "False" and "decode 1/2" in conds["Ready"]["message"]
    assert conds["Progressing"]["status"] == "True" and conds["Degraded"]["status"] == "False"
    assert all(c["observedGeneration"] == 3 for c in conds.values())

    deps["decode"] = _deployment(2, 2, 2)
    st2 = status.compute(full, deps, 3, st["conditions"])
    conds2 = {c["type"]: c for c in st2["conditions"]}
    assert conds2["Ready"]["status"] == "True" and conds2["Ready"]["reason"] == "AllPoolsReady"
    assert conds2["Progressing"]["status"] == "False"
    # unchanged status keeps its transition time
    assert conds2["Degraded"]["lastTransitionTime"] == conds["Degraded"]["lastTransitionTime"]

    failing = copy.deepcopy(deps)
    failing["prefill"]["status"]["conditions"] = [
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "quota"}
    ]
    conds3 = {c["type"]: c for c in status.compute(full, failing, 3)["conditions"]}
    assert conds3["Degraded"]["status"] == "True" and "quota" in conds3["Degraded"]["message"]
    err = {c["type"]: c for c in status.compute(full, deps, 3, None, "boom")["conditions"]}
    assert err["Ready"]["reason"] == "ReconcileError" and err["Degraded"]["status"] == "True"


def test_drain_counts_sequences() -> None:
    assert drain.busy({"waiting": 1, "running": 2}) == 3
    assert drain.busy({"waiting": 0, "running": 0}) == 0
    # nothing listening: nothing to drain, returns at once
    assert drain.wait_idle("http://127.0.0.1:9/load", timeout=5) is True


def test_cli_registers_operator_and_drain() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "operator", "--help"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--all-namespaces" in out.stdout and "--standalone" in out.stdout


def test_reconcile_metrics_count_results() -> None:
    def count(result: str) -> float:
        return metrics.RECONCILES.labels("unit", result)._value.get()

    ok, err = count("ok"), count("error")
    with metrics.reconcile_timer("unit"):
        pass
    with pytest.raises(RuntimeError), metrics.reconcile_timer("unit"):
        raise RuntimeError("boom")
    assert (count("ok"), count("error")) == (ok + 1, err + 1)


def test_crd_backends_are_the_registered_ones() -> None:
    """A CR may only name a KV backend the workers can load (else pods would crash at start)."""
    from splitserve.kvtransfer import available_backends
    from splitserve.operator.crd import KV_BACKENDS

    assert sorted(KV_BACKENDS) == sorted(available_backends())


def test_status_schema_keeps_everything_the_planner_remembers() -> None:
    """The API server prunes status fields its schema does not name; a planner field missing
    there is lost between ticks (a lost observedSince kept every scale-down waiting forever)."""
    from splitserve.operator.planner import Forecast, PoolState
    from splitserve.operator.scaling import pool_state_status

    state = PoolState(2, 10.0, ((1.0, 2),), ((1.0, 3.5),), Forecast(3.5, 0.1, 1.0, 1), 1.1, 1.0)
    saved = pool_state_status(state)
    schema = crd.status_schema()["properties"]["autoscaling"]["properties"]["prefill"]
    assert set(saved) <= set(schema["properties"]), set(saved) - set(schema["properties"])
    assert set(saved["forecast"]) <= set(schema["properties"]["forecast"]["properties"])


# --------------------------------------------------------------------------- trust boundaries
SECRET = {"internal-secret": "s3cret-internal-value-0123456789", "redis-password": "redis-pw-0123456789"}


def test_internal_secret_is_generated_once_and_kept() -> None:
    fresh = manifests.secret_values(None)
    assert len(fresh["internal-secret"]) >= 32 and fresh["internal-secret"] != fresh["redis-password"]
    assert manifests.secret_values(None) != fresh  # random per service
    stored = manifests.render_internal_secret("demo", "ns1", fresh)
    assert stored["kind"] == "Secret" and stored["metadata"]["name"] == "demo-internal"
    assert manifests.secret_values(stored) == fresh  # a reconcile never rotates it
    conf = base64.b64decode(stored["data"]["redis.conf"]).decode()
    assert conf == f"requirepass {fresh['redis-password']}\n"


@pytest.mark.parametrize("component", ["prefill", "decode", "router"])
def test_pods_mount_the_secret_and_never_carry_it_on_a_command_line(component: str) -> None:
    spec = {**SPEC, "router": {"apiKeySecret": {"name": "clients", "key": "token"}}}
    children = by_kind_name(manifests.render_all("demo", "ns1", spec, secret=SECRET))
    assert ("Secret", "demo-internal") in children
    dep = children[("Deployment", f"demo-{component}")]
    c = container(dep)
    env = {e["name"]: e for e in c["env"]}
    path = env["SPLITSERVE_INTERNAL_SECRET_FILE"]["value"]
    assert path == "/etc/splitserve/secrets/internal-secret"
    assert env["SPLITSERVE_REDIS_PASSWORD_FILE"]["value"] == "/etc/splitserve/secrets/redis-password"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["internal"]["secret"]["secretName"] == "demo-internal"
    assert {"name": "internal", "mountPath": "/etc/splitserve/secrets", "readOnly": True} in c["volumeMounts"]
    rendered = json.dumps(dep)
    for value in SECRET.values():
        assert value not in rendered  # only the Secret holds values; pods hold references
    if component == "router":
        assert env["SPLITSERVE_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "clients", "key": "token"}}
        assert not any("api-key" in arg for arg in c["command"])
    else:  # workers listen on their pod IP only
        assert "SPLITSERVE_API_KEY" not in env
        assert c["command"][c["command"].index("--host") + 1] == "$(POD_IP)"


def test_managed_redis_requires_a_password_from_the_secret() -> None:
    children = by_kind_name(manifests.render_all("demo", "ns1", SPEC, secret=SECRET))
    dep = children[("Deployment", "demo-redis")]
    c = container(dep)
    assert c["command"] == ["redis-server", "/etc/redis/redis.conf"]
    assert SECRET["redis-password"] not in json.dumps(c)
    conf = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "conf")
    assert conf["secret"] == {"secretName": "demo-internal", "defaultMode": 0o440,
                              "items": [{"key": "redis.conf", "path": "redis.conf"}]}


def test_external_redis_gets_no_password_file_and_no_redis_policy() -> None:
    spec = {**SPEC, "redis": {"managed": False, "url": "redis://shared:6379/3"}}
    children = by_kind_name(manifests.render_all("svc", "ns", spec, secret=SECRET))
    env = {e["name"] for e in container(children[("Deployment", "svc-decode")])["env"]}
    assert "SPLITSERVE_REDIS_PASSWORD_FILE" not in env and "SPLITSERVE_INTERNAL_SECRET_FILE" in env
    assert ("NetworkPolicy", "svc-redis") not in children


def _ingress(children: dict, component: str) -> list[tuple[int, list[str]]]:
    """(port, [component or peer description]) per rule of one NetworkPolicy."""
    policy = children[("NetworkPolicy", f"demo-{component}")]["spec"]
    assert policy["podSelector"]["matchLabels"] == manifests.selector_labels("demo", component)
    assert policy["policyTypes"] == ["Ingress"]
    out = []
    for rule in policy["ingress"]:
        peers = [p["podSelector"]["matchLabels"].get(manifests.LABEL_COMPONENT, "other")
                 if "namespaceSelector" not in p else "namespace:" + json.dumps(p, sort_keys=True)
                 for p in rule.get("from", [{"podSelector": {"matchLabels": {
                     manifests.LABEL_COMPONENT: "anyone"}}}])]
        out += [(port["port"], peers) for port in rule["ports"]]
    return out


def test_network_policies_admit_only_the_designed_paths() -> None:
    children = by_kind_name(manifests.render_all("demo", "ns1", SPEC))
    assert _ingress(children, "prefill") == [(8100, ["router"])]
    assert _ingress(children, "decode") == [(8200, ["router"]), (8300, ["prefill"])]
    assert _ingress(children, "redis") == [(6379, ["router", "prefill", "decode"])]
    assert _ingress(children, "router") == [(8000, ["anyone"])]  # clients; the API key guards it


def test_metrics_peers_reach_the_http_ports_but_never_the_kv_port(monkeypatch) -> None:
    from splitserve.operator import settings

    monkeypatch.setenv("SPLITSERVE_OPERATOR_NAMESPACE", "ops")
    monkeypatch.setenv("SPLITSERVE_OPERATOR_POD_LABELS", '{"app": "op"}')
    monkeypatch.setenv("SPLITSERVE_PROMETHEUS_NAMESPACE_LABELS", '{"team": "mon"}')
    monkeypatch.setenv("SPLITSERVE_PROMETHEUS_POD_LABELS", '{"app": "prometheus"}')
    peers = settings.metrics_peers()
    children = by_kind_name(manifests.render_all("demo", "ns1", SPEC, peers=peers))
    decode = children[("NetworkPolicy", "demo-decode")]["spec"]["ingress"]
    http = decode[0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": {"app": "op"}}} in http
    assert {"namespaceSelector": {"matchLabels": {"team": "mon"}},
            "podSelector": {"matchLabels": {"app": "prometheus"}}} in http
    assert decode[1] == {"from": [{"podSelector": {"matchLabels": manifests.selector_labels(
        "demo", "prefill")}}], "ports": [{"protocol": "TCP", "port": 8300}]}
    monkeypatch.setenv("SPLITSERVE_PROMETHEUS_POD_LABELS", "app=prometheus")
    with pytest.raises(ValueError, match="SPLITSERVE_PROMETHEUS_POD_LABELS"):
        settings.metrics_peers()


def test_crd_has_the_router_api_key_secret() -> None:
    router = crd.spec_schema()["properties"]["router"]["properties"]
    ref = router["apiKeySecret"]
    assert ref["required"] == ["name"] and ref["properties"]["key"]["default"] == "api-key"


def test_chart_lets_the_operator_manage_secrets_and_network_policies() -> None:
    helpers = (REPO / "charts" / "splitserve" / "templates" / "_helpers.tpl").read_text()
    assert 'resources: ["secrets"]' in helpers and 'resources: ["networkpolicies"]' in helpers


def test_grafana_dashboard_queries_only_metrics_we_export() -> None:
    """Every metric a panel of the chart's dashboard reads is one the router, workers, KV
    transfer or operator export (names drift; a dashboard panel must not go blank silently)."""
    import json
    import re

    import splitserve.kvtransfer.metrics  # noqa: F401
    import splitserve.operator.metrics  # noqa: F401
    import splitserve.worker.metrics  # noqa: F401  (registers the workers' metrics)
    from prometheus_client import REGISTRY
    from splitserve.router.metrics import RouterMetrics

    exported = set()
    for registry in (REGISTRY, RouterMetrics().registry):
        for family in registry.collect():
            exported |= {s.name for s in family.samples} | {family.name}
            if family.type == "counter":  # a labelled counter has no samples until first use
                exported.add(f"{family.name}_total")
            if family.type == "histogram":
                exported.add(f"{family.name}_bucket")
    dashboard = json.loads((REPO / "charts" / "splitserve" / "dashboards" / "splitserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"splitserve_[a-z_]+", e)}
    assert used and not used - exported, sorted(used - exported)
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"TTFT", "TPOT (inter-token)", "SLO attainment", "KV cache use", "Queues",
            "KV transfer rate and failures", "Replicas per pool (planner)"} <= titles


MY_POLICY = {"name": "mine", "prefill": {"filters": ["healthy"], "scorers": {"prefill_queue": 1.0},
                                         "picker": "max_score"},
             "decode": {"filters": ["healthy", "kv_endpoint", "has_room"], "picker": "round_robin"}}


def _router_command(children: list[dict]) -> list[str]:
    router = next(c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"].endswith("-router"))
    return router["spec"]["template"]["spec"]["containers"][0]["command"]


def test_a_policy_of_your_own_travels_in_the_config_map_to_the_router() -> None:
    spec = {"model": {"name": "t", "path": "/m"}, "image": "x", "router": {"policyConfig": MY_POLICY}}
    children = manifests.render_all("demo", "ns", spec)
    config = next(c for c in children if c["kind"] == "ConfigMap")
    from splitserve.router.policy.spec import PolicySpec

    assert PolicySpec.from_dict(json.loads(config["data"][manifests.POLICY_FILE])).name == "mine"
    command = _router_command(children)
    assert "--policy" not in command
    at = command.index("--policy-config")
    assert command[at + 1] == f"{manifests.CONFIG_MOUNT}/{manifests.POLICY_FILE}"
    preset = manifests.render_all("demo", "ns", {**spec, "router": {"policy": "least_loaded"}})
    assert manifests.POLICY_FILE not in next(c for c in preset if c["kind"] == "ConfigMap")["data"]
    assert _router_command(preset)[_router_command(preset).index("--policy") + 1] == "least_loaded"


@pytest.mark.parametrize("policy, words", [
    ({**MY_POLICY, "decode": {"filters": ["healthy"], "picker": "fastest"}}, "unknown picker 'fastest'"),
    ({**MY_POLICY, "name": "goodput"}, "is a preset's"),
    ({**MY_POLICY, "prefill": {"filters": ["healthy"]}}, "prefill needs a picker"),
])
def test_an_invalid_policy_of_your_own_is_refused_naming_the_field(policy, words) -> None:
    spec = {"model": {"name": "t", "path": "/m"}, "image": "x", "router": {"policyConfig": policy}}
    with pytest.raises(manifests.SpecError, match="spec.router.policyConfig") as info:
        manifests.render_all("demo", "ns", spec)
    assert words in str(info.value)


def test_a_new_routing_policy_restarts_the_routers_not_the_workers() -> None:
    def templates(router: dict) -> dict[str, dict]:
        spec = {"model": {"name": "t", "path": "/m"}, "image": "x", "router": router}
        return {c["metadata"]["name"]: c["spec"]["template"]["metadata"]["labels"]
                for c in manifests.render_all("demo", "ns", spec) if c["kind"] == "Deployment"}

    before, after = templates({"policy": "goodput"}), templates({"policyConfig": MY_POLICY})
    for pool in ("demo-prefill", "demo-decode"):
        assert before[pool] == after[pool]  # no model reload for a scorer weight
    assert before["demo-router"][manifests.LABEL_ROUTER_GENERATION] != \
        after["demo-router"][manifests.LABEL_ROUTER_GENERATION]


def _templates(spec: dict, **render: object) -> dict[str, dict]:
    return {c["metadata"]["name"]: c["spec"]["template"]
            for c in manifests.render_all("demo", "ns", spec, **render) if c["kind"] == "Deployment"}


@pytest.mark.parametrize(("router", "flags", "unset"), [
    ({"limits": {"maxSequences": 8, "headerTimeoutSeconds": 2.5}},
     ["--max-sequences", "8", "--header-timeout", "2.5"], "--max-body-bytes"),
    ({"failover": {"streamStallTimeoutSeconds": 0.5, "maxAttempts": 3}, "limits": {"maxSequences": 8}},
     ["--max-sequences", "8", "--stream-stall-timeout", "0.5", "--max-attempts", "3"], "--poll-timeout"),
])
def test_router_options_reach_the_router_flags_and_nothing_else(router: dict, flags: list[str], unset: str) -> None:
    plain = {"model": {"name": "t", "path": "/m"}, "image": "x"}
    tuned = {**plain, "router": router}
    before, after = _templates(plain), _templates(tuned)
    command = after["demo-router"]["spec"]["containers"][0]["command"]
    at = command.index("--max-sequences")
    assert command[at:at + len(flags)] == flags
    assert unset not in command  # unset: the router's own default
    for pool in ("demo-prefill", "demo-decode"):
        assert before[pool] == after[pool]  # no model reload for a router option
    config = [c for c in manifests.render_all("demo", "ns", tuned) if c["kind"] == "ConfigMap"]
    assert config == [c for c in manifests.render_all("demo", "ns", plain) if c["kind"] == "ConfigMap"]


def test_operator_default_options_yield_to_the_spec_field_by_field() -> None:
    spec = {"model": {"name": "t", "path": "/m"}, "image": "x",
            "router": {"limits": {"maxSequences": 8}, "failover": {"pollTimeoutSeconds": 1}}}
    defaults = {"limits": {"maxSequences": 4, "bodyTimeoutSeconds": 30},
                "failover": {"pollTimeoutSeconds": 5, "streamIdleTimeoutSeconds": 20}}
    command = _templates(spec, router_defaults=defaults)["demo-router"]["spec"]["containers"][0]["command"]
    assert command[command.index("--max-sequences") + 1] == "8"
    assert command[command.index("--body-timeout") + 1] == "30"
    assert command[command.index("--poll-timeout") + 1] == "1"
    assert command[command.index("--stream-idle-timeout") + 1] == "20"


@pytest.mark.parametrize("router, words", [
    ({"limits": {"maxBodyBytes": 0}}, "spec.router.limits.maxBodyBytes must be an integer >= 1"),
    ({"limits": {"keepAliveTimeoutSeconds": -1}}, "spec.router.limits.keepAliveTimeoutSeconds must be a number"),
    ({"limits": {"maxBodies": 5}}, "spec.router.limits.maxBodies: unknown router limits field"),
    ({"failover": {"maxAttempts": 0}}, "spec.router.failover.maxAttempts must be an integer >= 1"),
    ({"failover": {"streamStallTimeoutSeconds": 0}},
     "spec.router.failover.streamStallTimeoutSeconds must be a number of seconds > 0"),
])
def test_a_bad_router_option_is_refused_naming_the_field(router: dict, words: str) -> None:
    spec = {"model": {"name": "t", "path": "/m"}, "image": "x", "router": router}
    with pytest.raises(manifests.SpecError) as info:
        manifests.render_all("demo", "ns", spec)
    assert words in str(info.value)


def test_operator_default_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's routerLimits and routerFailover, as its template writes them: nulls for unset,
    and helm's --set turns 2.5 into the string "2.5"; a bad one stops the operator naming it."""
    from splitserve.operator import settings

    var = "SPLITSERVE_ROUTER_LIMITS"
    monkeypatch.setenv(var, '{"maxBodyBytes": 1000, "headerTimeoutSeconds": "2.5", "maxSequences": null}')
    assert settings._router_options("limits", var) == {"maxBodyBytes": 1000, "headerTimeoutSeconds": 2.5}
    monkeypatch.setenv(var, "{}")
    assert settings._router_options("limits", var) == {}
    monkeypatch.delenv(var)
    assert settings._router_options("limits", var) == {}
    for bad, words in (('{"maxSequences": 0}', "SPLITSERVE_ROUTER_LIMITS.maxSequences must be"),
                       ('{"maxSequences": "lots"}', "maxSequences must be an integer >= 1, got 'lots'"),
                       ('{"maxAttempts": 2}', "maxAttempts: unknown router limits field"),
                       ("[1]", "must be a JSON object")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValueError, match=words):
            settings._router_options("limits", var)
    var = "SPLITSERVE_ROUTER_FAILOVER"
    monkeypatch.setenv(var, '{"streamStallTimeoutSeconds": "0.5", "maxAttempts": 3, "pollTimeoutSeconds": null}')
    assert settings._router_options("failover", var) == {"streamStallTimeoutSeconds": 0.5, "maxAttempts": 3}
    monkeypatch.setenv(var, '{"pollIntervalSeconds": "0"}')
    with pytest.raises(ValueError, match="SPLITSERVE_ROUTER_FAILOVER.pollIntervalSeconds must be a number"):
        settings._router_options("failover", var)
