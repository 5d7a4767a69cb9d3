"""Pure renderers: an ``InferenceService`` (name, namespace, spec) -> the child manifests.

Nothing here talks to a cluster, so unit tests call these directly. The operator adopts the
results (owner references) and server-side-applies them.

Children of ``<name>``:
  ``<name>-config``   ConfigMap with the serving config every pod mounts
  ``<name>-prefill``  Deployment + headless Service (HTTP 8100)
  ``<name>-decode``   Deployment + headless Service (HTTP 8200, KV 8300)
  ``<name>-router``   Deployment + Service (HTTP 8000): the endpoint clients use
  ``<name>-redis``    Deployment + Service, when ``spec.redis.managed`` (workers register there)
  ``<name>-internal`` Secret: the internal secret (router -> worker header, KV handshake, registry
                      MACs) and the managed Redis's password, generated once, mounted as files
  NetworkPolicies: only the router reaches the workers' HTTP ports, only prefill reaches decode's
  KV port, only the router and workers reach Redis; the operator and a configured Prometheus
  may also reach the HTTP ports (for /metrics); PodDisruptionBudgets for prefill, decode, router.

Secrets never go on a command line (``/proc/<pid>/cmdline`` is world-readable): the pods get
file paths and ``secretKeyRef`` variables. Workers listen on their pod IP, not 0.0.0.0.

Rollouts: prefill and decode pods carry the same ``splitserve.io/serving-generation`` label, a
hash of everything the two must agree on (image, model, KV backend, serving config). Changing any
of it changes both pod templates at once, and workers get the hash in ``SPLITSERVE_GENERATION`` so
the KV handshake can refuse to pair an old prefill pod with a new decode pod. Replica counts are
not part of it: resizing one pool touches only that pool's Deployment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splitserve.operator import crd
from splitserve.router.config import ROUTER_OPTIONS, option_args, options_from_keys
from splitserve.router.policy.presets import POLICIES
from splitserve.router.policy.spec import PolicySpec

Manifest = dict[str, Any]

PREFILL_PORT = 8100
DECODE_PORT = 8200
DECODE_KV_PORT = 8300
ROUTER_PORT = 8000
REDIS_PORT = 6379
MODEL_MOUNT = "/models"
CONFIG_MOUNT = "/etc/splitserve"
SECRET_MOUNT = "/etc/splitserve/secrets"
REDIS_CONF_MOUNT = "/etc/redis"
INTERNAL_SECRET_KEY = "internal-secret"
REDIS_PASSWORD_KEY = "redis-password"
REDIS_CONF_KEY = "redis.conf"
RUN_AS_USER = 10001  # the image's `splitserve` user (docker/Dockerfile)
REDIS_USER = 999  # the redis image's own user
DRAIN_SECONDS = 120  # how long a pod's preStop waits for its sequences to finish

MANAGED_BY = "splitserve-operator"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_GENERATION = "splitserve.io/serving-generation"
LABEL_ROUTER_GENERATION = "splitserve.io/router-generation"  # + the routing policy
DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    "prefill": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "16Gi"}},
    "decode": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "16Gi"}},
    "router": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
    "redis": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
}


class SpecError(ValueError):
    """The spec cannot be rendered (the CRD schema should have refused it); names the field."""


def child_name(name: str, component: str) -> str:
    return f"{name}-{component}"


def selector_labels(name: str, component: str) -> dict[str, str]:
    """Immutable selector of one component's pods (never includes the generation)."""
    return {
        "app.kubernetes.io/name": "splitserve",
        LABEL_INSTANCE: name,
        LABEL_COMPONENT: component,
    }


def common_labels(name: str, component: str) -> dict[str, str]:
    return {**selector_labels(name, component), "app.kubernetes.io/managed-by": MANAGED_BY}


def redis_url(name: str, spec: dict[str, Any]) -> str:
    redis = spec["redis"]
    if redis.get("managed", True):
        return f"redis://{child_name(name, 'redis')}:{REDIS_PORT}/0"
    if not redis.get("url"):
        raise SpecError("spec.redis.url is required when spec.redis.managed is false")
    return str(redis["url"])


def endpoint(name: str, namespace: str) -> str:
    """The router's in-cluster URL (OpenAI API under /v1)."""
    return f"http://{child_name(name, 'router')}.{namespace}.svc:{ROUTER_PORT}"


def model_dir(spec: dict[str, Any]) -> str:
    model = spec["model"]
    if model.get("pvc"):
        sub = model["pvc"].get("subPath", "").strip("/")
        return f"{MODEL_MOUNT}/{sub}" if sub else MODEL_MOUNT
    if model.get("path"):
        return str(model["path"])
    raise SpecError("spec.model: exactly one of model.path or model.pvc is required")


def serving_config(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    """What every pod of the service should agree on, written to the ConfigMap."""
    return {
        "service": name,
        "namespace": namespace,
        "model": {"name": spec["model"]["name"], "dir": model_dir(spec)},
        "kvTransfer": {k: v for k, v in spec["kvTransfer"].items() if k in ("backend", "ucxTransports")},
        "slo": spec["slo"],
        "router": {"policy": spec["router"]["policy"],
                   **({"policyConfig": spec["router"]["policyConfig"]} if spec["router"].get("policyConfig") else {})},
        "redisUrl": redis_url(name, spec),
        "tensorParallel": {
            "prefill": spec["prefill"]["tensorParallel"],
            "decode": spec["decode"]["tensorParallel"],
        },
        "endpoints": {
            "prefill": f"{child_name(name, 'prefill')}.{namespace}.svc:{PREFILL_PORT}",
            "decode": f"{child_name(name, 'decode')}.{namespace}.svc:{DECODE_PORT}",
        },
    }


def _short_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def serving_generation(name: str, namespace: str, spec: dict[str, Any]) -> str:
    """Short hash of what prefill and decode must match on (not replica counts, not the
    router's policy: tuning a scorer weight must not reload every GPU worker's model)."""
    config = {k: v for k, v in serving_config(name, namespace, spec).items() if k != "router"}
    return _short_hash({"image": spec["image"], "config": config})


def router_generation(name: str, namespace: str, spec: dict[str, Any]) -> str:
    """The router pods' template hash: the workers' generation plus the routing policy, which
    the router reads from the config ConfigMap only at start (a change restarts the routers).
    The router's limits and failover options need no place here: they are flags, in the pod
    template itself."""
    return _short_hash({"serving": serving_generation(name, namespace, spec),
                        "router": serving_config(name, namespace, spec)["router"]})


def _security_context(user: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": user,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _http_probes(port_name: str) -> dict[str, Any]:
    """Startup allows a slow model load (10 min); after that readiness gates traffic and
    liveness restarts a wedged worker."""
    get = {"httpGet": {"path": "/health", "port": port_name}}
    return {
        "startupProbe": {**get, "periodSeconds": 5, "failureThreshold": 120, "timeoutSeconds": 3},
        "readinessProbe": {**get, "periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 3},
        "livenessProbe": {**get, "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5},
    }


def _drain_hook(port: int) -> dict[str, Any]:
    """preStop: wait until the worker has no running or waiting sequences (bounded), so a
    scale-down or rollout never cuts a request off; see ``splitserve drain``."""
    return {
        "preStop": {
            "exec": {
                "command": [
                    "splitserve",
                    "drain",
                    "--port",
                    str(port),
                    "--timeout",
                    str(DRAIN_SECONDS),
                ]
            }
        }
    }


def _env(name: str, spec: dict[str, Any], generation: str) -> list[dict[str, Any]]:
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SPLITSERVE_GENERATION", "value": generation},
        {"name": "SPLITSERVE_SERVICE", "value": name},
        {"name": "SPLITSERVE_CONFIG", "value": f"{CONFIG_MOUNT}/serving.json"},
        {"name": "SPLITSERVE_INTERNAL_SECRET_FILE", "value": f"{SECRET_MOUNT}/{INTERNAL_SECRET_KEY}"},
        {"name": "HOME", "value": "/tmp"},
    ]
    if spec["redis"].get("managed", True):
        env.append({"name": "SPLITSERVE_REDIS_PASSWORD_FILE",
                    "value": f"{SECRET_MOUNT}/{REDIS_PASSWORD_KEY}"})
    return env


def _volumes(name: str, spec: dict[str, Any]) -> tuple[list[Manifest], list[Manifest]]:
    items = [{"key": INTERNAL_SECRET_KEY, "path": INTERNAL_SECRET_KEY}]
    if spec["redis"].get("managed", True):
        items.append({"key": REDIS_PASSWORD_KEY, "path": REDIS_PASSWORD_KEY})
    secret = {"secretName": child_name(name, "internal"), "items": items, "defaultMode": 0o440}
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": child_name(name, "config")}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "internal", "secret": secret},
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "internal", "mountPath": SECRET_MOUNT, "readOnly": True},
    ]
    pvc = spec["model"].get("pvc")
    if pvc:
        claim = {"claimName": pvc["claimName"], "readOnly": True}
        volumes.append({"name": "model", "persistentVolumeClaim": claim})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    return volumes, mounts


def _resources(pool: dict[str, Any], component: str) -> dict[str, Any]:
    given = pool.get("resources")
    return given if given else DEFAULT_RESOURCES[component]


def _deployment(
    name: str,
    namespace: str,
    component: str,
    replicas: int,
    pod_spec: dict[str, Any],
    template_labels: dict[str, str],
    annotations: dict[str, str] | None = None,
) -> Manifest:
    meta_labels = common_labels(name, component)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": child_name(name, component),
            "namespace": namespace,
            "labels": meta_labels,
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name, component)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": {**meta_labels, **template_labels},
                    "annotations": annotations or {},
                },
                "spec": pod_spec,
            },
        },
    }


def _ucx_env(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """UCX's transports (nixl) where the spec names them; else UCX's own choice."""
    transports = spec["kvTransfer"].get("ucxTransports")
    return [{"name": "UCX_TLS", "value": transports}] if transports else []


def _worker_command(role: str, spec: dict[str, Any], url: str, generation: str) -> list[str]:
    """The worker's real CLI (``splitserve prefill|decode``); Kubernetes expands ``$(POD_IP)``."""
    backend = spec["kvTransfer"]["backend"]
    cmd = ["splitserve", role, "--model", model_dir(spec), "--host", "$(POD_IP)"]
    if role == "prefill":
        cmd += ["--port", str(PREFILL_PORT)]
    else:
        cmd += ["--port", str(DECODE_PORT), "--kv-port", str(DECODE_KV_PORT)]
    return cmd + [
        "--kv-backend", backend, "--redis-url", url,
        "--advertise-host", "$(POD_IP)", "--generation", generation,
        "--public-metrics",  # /metrics for Prometheus; the NetworkPolicy names who may ask
    ]  # fmt: skip


def _pod_spec(
    name: str,
    spec: dict[str, Any],
    component: str,
    container: dict[str, Any],
    pool: dict[str, Any],
) -> dict[str, Any]:
    volumes, mounts = _volumes(name, spec)
    container = {
        "name": component,
        "image": spec["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        "securityContext": _security_context(RUN_AS_USER),
        "resources": _resources(pool, component),
        "volumeMounts": mounts,
        **container,
    }
    pod: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "fsGroup": RUN_AS_USER},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": DRAIN_SECONDS + 30,
        "containers": [container],
        "volumes": volumes,
    }
    if pool.get("nodeSelector"):
        pod["nodeSelector"] = pool["nodeSelector"]
    if pool.get("tolerations"):
        pod["tolerations"] = pool["tolerations"]
    return pod


def render_worker(
    name: str, namespace: str, spec: dict[str, Any], role: str, replicas: int | None = None
) -> list[Manifest]:
    """The prefill or decode Deployment and its headless Service. ``replicas`` overrides
    ``spec.<role>.replicas`` (the planner's choice when autoscaling, see ``scaling.py``)."""
    if role not in ("prefill", "decode"):
        raise SpecError(f"unknown worker role {role!r}")
    pool = spec[role]
    generation = serving_generation(name, namespace, spec)
    port = PREFILL_PORT if role == "prefill" else DECODE_PORT
    ports = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    if role == "decode":
        ports.append({"name": "kv", "containerPort": DECODE_KV_PORT, "protocol": "TCP"})
    container = {
        "command": _worker_command(role, spec, redis_url(name, spec), generation),
        "ports": ports,
        "env": _env(name, spec, generation)
        + [{"name": "SPLITSERVE_TENSOR_PARALLEL", "value": str(pool["tensorParallel"])}]
        + _ucx_env(spec),
        "lifecycle": _drain_hook(port),
        **_http_probes("http"),
    }
    pod = _pod_spec(name, spec, role, container, pool)
    deployment = _deployment(
        name,
        namespace,
        role,
        pool["replicas"] if replicas is None else replicas,
        pod,
        {LABEL_GENERATION: generation},
        {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)},
    )
    service = _service(name, namespace, role, ports, headless=True)
    return [deployment, service]


def render_router(name: str, namespace: str, spec: dict[str, Any]) -> list[Manifest]:
    """The router Deployment and the Service clients call (the status endpoint)."""
    router = spec["router"]
    generation = serving_generation(name, namespace, spec)
    template_hash = router_generation(name, namespace, spec)
    command = [
        "splitserve", "router", "--model", model_dir(spec),
        "--served-model-name", spec["model"]["name"],
        "--host", "0.0.0.0", "--port", str(ROUTER_PORT),
        "--redis-url", redis_url(name, spec), *_policy_args(router), *router_option_args(spec),
        "--slo-ttft-ms", str(spec["slo"]["ttftMs"]), "--slo-tpot-ms", str(spec["slo"]["tpotMs"]),
        "--public-metrics",  # the operator's SLO loop scrapes it without the API key
    ]  # fmt: skip
    ports = [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}]
    env = _env(name, spec, generation)
    key_ref = router.get("apiKeySecret")
    if key_ref:  # a variable from the Secret: never on the command line
        env.append({"name": "SPLITSERVE_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": key_ref["name"], "key": key_ref.get("key", "api-key")}}})
    container = {
        "command": command,
        "ports": ports,
        "env": env,
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},  # let endpoints drop the pod first
        **_http_probes("http"),
    }
    pod = _pod_spec(name, spec, "router", container, router)
    deployment = _deployment(
        name, namespace, "router", router["replicas"], pod,
        {LABEL_GENERATION: generation, LABEL_ROUTER_GENERATION: template_hash},
        {"prometheus.io/scrape": "true", "prometheus.io/port": str(ROUTER_PORT)},
    )  # fmt: skip
    service = _service(name, namespace, "router", ports, service_type=router["serviceType"])
    return [deployment, service]


def render_redis(name: str, namespace: str, spec: dict[str, Any]) -> list[Manifest]:
    """A single managed Redis (the worker registry: keys with TTLs, no persistence needed)."""
    if not spec["redis"].get("managed", True):
        return []
    ports = [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}]
    tcp = {"tcpSocket": {"port": "redis"}}
    container = {
        "name": "redis",
        "image": spec["redis"]["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        # requirepass comes from the config file in the Secret, not from the arguments
        "command": ["redis-server", f"{REDIS_CONF_MOUNT}/{REDIS_CONF_KEY}"],
        "args": ["--save", "", "--appendonly", "no", "--port", str(REDIS_PORT)],
        "ports": ports,
        "securityContext": _security_context(REDIS_USER),
        "resources": DEFAULT_RESOURCES["redis"],
        "readinessProbe": {**tcp, "periodSeconds": 5},
        "livenessProbe": {**tcp, "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": [{"name": "data", "mountPath": "/data"},
                         {"name": "conf", "mountPath": REDIS_CONF_MOUNT, "readOnly": True}],
    }
    pod = {
        "securityContext": {"runAsNonRoot": True, "fsGroup": REDIS_USER},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [{"name": "data", "emptyDir": {}}, {"name": "conf", "secret": {
            "secretName": child_name(name, "internal"), "defaultMode": 0o440,
            "items": [{"key": REDIS_CONF_KEY, "path": REDIS_CONF_KEY}]}}],
    }
    deployment = _deployment(name, namespace, "redis", 1, pod, {})
    deployment["spec"]["strategy"] = {"type": "Recreate"}
    return [deployment, _service(name, namespace, "redis", ports)]


def render_config(name: str, namespace: str, spec: dict[str, Any]) -> Manifest:
    config = serving_config(name, namespace, spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(name, "config"),
            "namespace": namespace,
            "labels": common_labels(name, "config"),
        },
        "data": {"serving.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
                 **_policy_file(spec)},
    }


POLICY_FILE = "policy.json"  # in the config ConfigMap, when spec.router.policyConfig is set


def _policy_file(spec: dict[str, Any]) -> dict[str, str]:
    given = spec["router"].get("policyConfig")
    return {POLICY_FILE: json.dumps(given, indent=2, sort_keys=True) + "\n"} if given else {}


def check_policy_config(spec: dict[str, Any]) -> None:
    """An invalid spec.router.policyConfig is the user's to fix: SpecError naming the field and
    the reason (the router would refuse it at start-up, in a crash loop, otherwise)."""
    given = spec["router"].get("policyConfig")
    if not given:
        return
    try:
        policy = PolicySpec.from_dict(given)
    except ValueError as exc:
        raise SpecError(f"spec.router.policyConfig: {exc}") from exc
    if policy.name in POLICIES:
        raise SpecError(f"spec.router.policyConfig: name {policy.name!r} is a preset's; name your own")


def router_option_args(spec: dict[str, Any]) -> list[str]:
    """The router's flags for ``spec.router.limits`` and ``spec.router.failover``; SpecError
    naming the field of a bad one (the schema refuses it first; this covers specs that never
    went through the API server)."""
    values: dict[str, int | float] = {}
    try:
        for section in ROUTER_OPTIONS:
            values |= options_from_keys(section, spec["router"].get(section) or {}, f"spec.router.{section}")
        return option_args(values)
    except ValueError as exc:
        raise SpecError(str(exc)) from exc


def with_router_defaults(spec: dict[str, Any], defaults: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """``spec`` whose ``router.limits`` and ``router.failover`` fall back, field by field, on
    ``defaults`` (section -> key -> value: the operator's, from the chart's ``routerLimits``
    and ``routerFailover``, ``settings.ROUTER_DEFAULTS``)."""
    router = dict(spec["router"])
    for section, given in (defaults or {}).items():
        if given:
            router[section] = {**given, **(router.get(section) or {})}
    return {**spec, "router": router}


def _policy_args(router: dict[str, Any]) -> list[str]:
    if router.get("policyConfig"):
        return ["--policy-config", f"{CONFIG_MOUNT}/{POLICY_FILE}"]
    return ["--policy", router["policy"]]


def render_pdb(name: str, namespace: str, component: str) -> Manifest:
    """At most one pod of a pool voluntarily evicted at a time (drains are slow)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": child_name(name, component),
            "namespace": namespace,
            "labels": common_labels(name, component),
        },
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(name, component)},
        },
    }


def _service(
    name: str,
    namespace: str,
    component: str,
    ports: list[Manifest],
    headless: bool = False,
    service_type: str = "ClusterIP",
) -> Manifest:
    spec: dict[str, Any] = {
        "selector": selector_labels(name, component),
        "ports": [
            {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"],
             "protocol": "TCP"}
            for p in ports
        ],
    }  # fmt: skip
    if headless:
        spec["clusterIP"] = "None"
    else:
        spec["type"] = service_type
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_name(name, component),
            "namespace": namespace,
            "labels": common_labels(name, component),
        },
        "spec": spec,
    }


def secret_values(existing: Manifest | None) -> dict[str, str]:
    """The internal Secret's values: those already stored (so a reconcile never rotates them
    under running pods), a fresh random one for each that is missing."""
    data = (existing or {}).get("data") or {}
    values = {k: base64.b64decode(v).decode() for k, v in data.items()
              if k in (INTERNAL_SECRET_KEY, REDIS_PASSWORD_KEY)}
    for key in (INTERNAL_SECRET_KEY, REDIS_PASSWORD_KEY):
        values.setdefault(key, secrets.token_urlsafe(32))
    return values


def render_internal_secret(name: str, namespace: str, values: Mapping[str, str]) -> Manifest:
    """The Secret every pod of the service mounts (values from :func:`secret_values`)."""
    password = values[REDIS_PASSWORD_KEY]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": child_name(name, "internal"), "namespace": namespace,
                     "labels": common_labels(name, "internal")},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in {  # data, not stringData:
            INTERNAL_SECRET_KEY: values[INTERNAL_SECRET_KEY],  # re-applying it is then a no-op
            REDIS_PASSWORD_KEY: password,
            REDIS_CONF_KEY: f"requirepass {password}\n",
        }.items()},
    }


@dataclass(frozen=True)
class MetricsPeers:
    """Who else may reach the pods' HTTP ports for /metrics: the operator (its namespace and
    pod labels) and a Prometheus (namespace labels and pod labels; empty = any)."""

    operator_namespace: str | None = None
    operator_labels: Mapping[str, str] | None = None
    prometheus_namespace_labels: Mapping[str, str] | None = None
    prometheus_pod_labels: Mapping[str, str] | None = None

    def peers(self) -> list[Manifest]:
        out = []
        if self.operator_namespace and self.operator_labels:
            out.append({"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": self.operator_namespace}},
                "podSelector": {"matchLabels": dict(self.operator_labels)}})
        if self.prometheus_namespace_labels is not None or self.prometheus_pod_labels is not None:
            out.append({"namespaceSelector": {"matchLabels": dict(self.prometheus_namespace_labels or {})},
                        "podSelector": {"matchLabels": dict(self.prometheus_pod_labels or {})}})
        return out


def _pods(name: str, *components: str) -> list[Manifest]:
    return [{"podSelector": {"matchLabels": selector_labels(name, c)}} for c in components]


def _policy(name: str, namespace: str, component: str, rules: list[Manifest]) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": child_name(name, component), "namespace": namespace,
                     "labels": common_labels(name, component)},
        "spec": {"podSelector": {"matchLabels": selector_labels(name, component)},
                 "policyTypes": ["Ingress"], "ingress": rules},
    }


def _rule(peers: list[Manifest], port: int) -> Manifest:
    return {"from": peers, "ports": [{"protocol": "TCP", "port": port}]}


def render_network_policies(
    name: str, namespace: str, spec: dict[str, Any], peers: MetricsPeers | None = None
) -> list[Manifest]:
    """Ingress allow-lists: the paths DESIGN.md's trust boundaries name, nothing else. The
    router's port stays open to clients (it checks the API key)."""
    metrics = (peers or MetricsPeers()).peers()
    out = [
        _policy(name, namespace, "prefill", [_rule(_pods(name, "router") + metrics, PREFILL_PORT)]),
        _policy(name, namespace, "decode", [
            _rule(_pods(name, "router") + metrics, DECODE_PORT),
            _rule(_pods(name, "prefill"), DECODE_KV_PORT),
        ]),
        _policy(name, namespace, "router", [{"ports": [{"protocol": "TCP", "port": ROUTER_PORT}]}]),
    ]
    if spec["redis"].get("managed", True):
        out.append(_policy(name, namespace, "redis", [
            _rule(_pods(name, "router", "prefill", "decode"), REDIS_PORT)]))
    return out


def render_all(
    name: str,
    namespace: str,
    spec: dict[str, Any],
    replicas: dict[str, int] | None = None,
    secret: Mapping[str, str] | None = None,
    peers: MetricsPeers | None = None,
    router_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Manifest]:
    """Every child of one InferenceService, in apply order (config and registry first).

    ``spec`` may be partial (as in a unit test): schema defaults are filled in first, exactly as
    the API server would have stored them. ``replicas`` (pool -> count) overrides the spec's
    worker replicas: the autoscaler's choice (``scaling.effective_replicas``). ``secret``: the
    internal Secret's values (:func:`secret_values`; the operator reads or makes them), without
    which the Secret is left out, so that rendering stays a pure function. ``peers``: who may
    scrape /metrics besides the router. ``router_defaults``: the operator's defaults for
    ``spec.router.limits`` and ``.failover`` (:func:`with_router_defaults`).
    """
    replicas = replicas or {}
    if not name:
        raise SpecError("metadata.name is required")
    full = with_router_defaults(crd.defaulted_spec(spec), router_defaults)
    for field in ("model", "image"):
        if not full.get(field):
            raise SpecError(f"spec.{field} is required")
    if not full["model"].get("name"):
        raise SpecError("spec.model.name is required")
    check_policy_config(full)
    router_option_args(full)
    out: list[Manifest] = [render_config(name, namespace, full)]
    if secret is not None:
        out.append(render_internal_secret(name, namespace, secret))
    out += render_network_policies(name, namespace, full, peers)
    out += render_redis(name, namespace, full)
    out += render_worker(name, namespace, full, "prefill", replicas.get("prefill"))
    out += render_worker(name, namespace, full, "decode", replicas.get("decode"))
    out += render_router(name, namespace, full)
    out += [render_pdb(name, namespace, c) for c in ("prefill", "decode", "router")]
    return out
