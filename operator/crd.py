"""The ``InferenceService`` CustomResourceDefinition, built in Python as the single source of truth.

Why in Python: the API server applies the schema's defaults to every stored object, and the
manifest renderers must see the same defaults when unit tests call them with a partial spec.
Keeping the schema here (and writing the chart's YAML from it, see ``main``) means one place
holds each default, enum and bound; ``apply_defaults`` walks the very schema the server uses.

``python -m splitserve.operator.crd > charts/splitserve/crds/inferenceservices.splitserve.io.yaml``
regenerates the chart's copy; a unit test checks the two never drift apart.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from splitserve.router.config import ROUTER_OPTIONS, RouterOption
from splitserve.router.policy.presets import POLICIES

GROUP = "splitserve.io"
VERSION = "v1alpha1"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["infsvc"]  # KServe owns "isvc"
CRD_NAME = f"{PLURAL}.{GROUP}"
KV_BACKENDS = ["auto", "tcp", "shm", "cuda_ipc", "nixl"]  # what splitserve.kvtransfer registers (a test keeps them equal)
ROUTER_POLICIES = list(POLICIES)  # the router's presets: one list of names

Schema = dict[str, Any]


def _int(minimum: int | None = None, default: int | None = None, desc: str = "") -> Schema:
    out: Schema = {"type": "integer", "format": "int32"}
    if minimum is not None:
        out["minimum"] = minimum
    if default is not None:
        out["default"] = default
    if desc:
        out["description"] = desc
    return out


def _str(desc: str = "", **extra: Any) -> Schema:
    return {"type": "string", "description": desc, **extra} if desc else {"type": "string", **extra}


def _free_object(desc: str) -> Schema:
    """An object passed through to a Kubernetes type (resources, tolerations) unvalidated here;
    the Deployment's own validation names any bad field when the operator applies it."""
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "description": desc}


QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _resources_schema(desc: str) -> Schema:
    """core/v1 ResourceRequirements (requests/limits of quantities), checked at admission so a
    typo such as ``cpu: lots`` is refused with its field named, not failed later in a child."""
    quantity = {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-int-or-string": True,
        "pattern": QUANTITY_PATTERN,
    }
    resource_map = {"type": "object", "additionalProperties": quantity}
    return {
        "type": "object",
        "description": desc,
        "properties": {"requests": resource_map, "limits": resource_map},
    }


def _option_schema(option: RouterOption) -> Schema:
    desc = f"{option.help[0].upper()}{option.help[1:]}. Unset: the router's default, {option.default_text}."
    if option.type is int:
        return {"type": "integer", "format": "int64", "minimum": option.minimum, "description": desc}
    if option.allow_zero:
        return {"type": "number", "minimum": 0, "description": desc}
    return {"type": "number", "minimum": 0, "exclusiveMinimum": True, "description": desc}


_SECTION_DOCS = {
    "limits": "What one client can make a router pod hold (`splitserve router`'s limits).",
    "failover": "How soon a router gives up a worker that stops answering, and how often a sequence"
    " is tried on another pair (`splitserve router`'s worker-fault options).",
    "admission": "How long, and how many, requests wait in a router for a pair that can take them"
    " (targets in reach, KV room on a decode worker) before 429 (`splitserve router`'s admission"
    " options).",
}


def router_options_schema(section: str) -> Schema:
    """``spec.router.<section>`` (``limits``, ``failover``, ``admission``): one field per router option of
    that section (router/config.py ``ROUTER_OPTIONS``, which the router's flags and the chart's
    ``router<Section>`` follow too), each typed and bounded so that the API server refuses a
    bad value naming its field."""
    return {
        "type": "object",
        "description": f"{_SECTION_DOCS[section]} A field left out takes the operator's default"
        f" (the chart's router{section.capitalize()}), else the router's. A change restarts the"
        " routers only.",
        "properties": {option.key: _option_schema(option) for option in ROUTER_OPTIONS[section]},
    }


def _pool_schema(role: str, port_doc: str) -> Schema:
    """One worker pool (prefill or decode): size, bounds for the planner, placement."""
    return {
        "type": "object",
        "description": f"The {role} worker pool ({port_doc}).",
        "default": {},
        "properties": {
            "replicas": _int(0, 1, f"Desired {role} workers (the planner moves it when enabled)."),
            "minReplicas": _int(0, None, "Lower bound for the planner."),
            "maxReplicas": _int(0, None, "Upper bound for the planner."),
            "tensorParallel": _int(1, 1, "GPUs per worker (tensor parallel degree)."),
            "resources": _resources_schema("Container resources (requests, limits)."),
            "nodeSelector": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Node labels the pool's pods must match.",
            },
            "tolerations": {
                "type": "array",
                "items": _free_object("core/v1 Toleration"),
                "description": "Tolerations for the pool's pods (e.g. GPU node taints).",
            },
        },
        "x-kubernetes-validations": [
            {
                "rule": "!has(self.minReplicas) || !has(self.maxReplicas)"
                " || self.minReplicas <= self.maxReplicas",
                "message": "minReplicas must be <= maxReplicas",
                "fieldPath": ".minReplicas",
                "reason": "FieldValueInvalid",
            },
            {
                "rule": "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
                "message": "replicas must be <= maxReplicas",
                "fieldPath": ".replicas",
                "reason": "FieldValueInvalid",
            },
            {
                "rule": "!has(self.minReplicas) || self.replicas >= self.minReplicas",
                "message": "replicas must be >= minReplicas",
                "fieldPath": ".replicas",
                "reason": "FieldValueInvalid",
            },
        ],
    }


def spec_schema() -> Schema:
    """OpenAPI v3 schema of ``.spec`` (fields per DESIGN.md "InferenceService")."""
    model = {
        "type": "object",
        "description": "The model to serve: a path inside the image/node, or a PVC holding it.",
        "required": ["name"],
        "properties": {
            "name": _str("Served model name (the OpenAI `model` field).", minLength=1),
            "path": _str("Model directory (HF format) as seen inside the container.", minLength=1),
            "pvc": {
                "type": "object",
                "description": "A PersistentVolumeClaim holding the model, mounted read-only.",
                "required": ["claimName"],
                "properties": {
                    "claimName": _str("PVC name.", minLength=1),
                    "subPath": _str("Model directory inside the volume.", default=""),
                },
            },
        },
        "x-kubernetes-validations": [
            {
                "rule": "has(self.path) != has(self.pvc)",
                "message": "exactly one of model.path or model.pvc is required",
                "reason": "FieldValueRequired",
            }
        ],
    }
    redis = {
        "type": "object",
        "description": "The worker registry: a Redis the operator runs (managed) or an existing URL.",
        # the default must satisfy the CEL rule on its own (nested defaults are not applied
        # when the API server validates a default)
        "default": {"managed": True},
        "properties": {
            "managed": {"type": "boolean", "default": True},
            "url": _str("redis:// URL of an existing Redis (set managed: false).", minLength=1),
            "image": _str("Image of the managed Redis.", default="redis:7-alpine"),
        },
        "x-kubernetes-validations": [
            {
                "rule": "self.managed != has(self.url)",
                "message": "set either managed: true or a url (with managed: false)",
                "fieldPath": ".url",
                "reason": "FieldValueInvalid",
            }
        ],
    }
    return {
        "type": "object",
        "required": ["model", "image"],
        "properties": {
            "model": model,
            "image": _str(
                "Image with the `splitserve` entrypoint (docker/Dockerfile).", minLength=1
            ),
            "imagePullPolicy": _str(
                "", enum=["Always", "IfNotPresent", "Never"], default="IfNotPresent"
            ),
            "prefill": _pool_schema("prefill", "HTTP 8100"),
            "decode": _pool_schema("decode", "HTTP 8200, KV 8300"),
            "router": {
                "type": "object",
                "default": {},
                "description": "The OpenAI-compatible router (HTTP 8000).",
                "properties": {
                    "replicas": _int(0, 1, "Router replicas."),
                    "policy": _str("Routing policy: a preset (ignored when policyConfig is set).",
                                   enum=ROUTER_POLICIES, default="goodput"),
                    "policyConfig": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                        "description": "A routing policy of your own instead of a preset: its name,"
                        " the filters, weighted scorers and picker per role (or pair scorers), as"
                        " `splitserve router --policy-config` reads it (router/policy/spec.py);"
                        " checked by the operator, an invalid one is refused naming the field.",
                    },
                    **{section: router_options_schema(section) for section in ROUTER_OPTIONS},
                    "serviceType": _str(
                        "", enum=["ClusterIP", "NodePort", "LoadBalancer"], default="ClusterIP"
                    ),
                    "resources": _resources_schema("Container resources of the router."),
                    "apiKeySecret": {
                        "type": "object",
                        "description": "A Secret holding the API key clients must send"
                        " (Authorization: Bearer KEY) for /v1/*; unset: the API is open.",
                        "required": ["name"],
                        "properties": {
                            "name": _str("Secret name (same namespace).", minLength=1),
                            "key": _str("Key inside the Secret.", default="api-key", minLength=1),
                        },
                    },
                },
            },
            "slo": {
                "type": "object",
                "default": {},
                "description": "Latency targets; the router and planner aim at them.",
                "properties": {
                    "ttftMs": _int(1, 1000, "Time-to-first-token target, milliseconds."),
                    "tpotMs": _int(1, 100, "Time-per-output-token target, milliseconds."),
                    "attainment": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": 1,
                        "default": 0.9,
                        "description": "Fraction of requests that must meet both targets.",
                    },
                },
            },
            "autoscaling": {
                "type": "object",
                "default": {},
                "description": "The planner: one SLO loop that sizes both pools.",
                "properties": {
                    "enabled": {"type": "boolean", "default": False},
                    "windowSeconds": _int(1, 60, "Metrics window the planner averages over."),
                    "scaleUpCooldownSeconds": _int(0, 60),
                    "scaleDownCooldownSeconds": _int(0, 300),
                    "prefillTokensPerSecond": _int(
                        1, None, "Prompt tokens one prefill replica prefills per second within"
                        " the TTFT target. Unset: from the operator's profiled latency model"
                        " (SPLITSERVE_LATENCY_MODEL), else a default.",
                    ),
                    "decodeSequencesPerReplica": _int(
                        1, None, "Sequences one decode replica runs within the TPOT target."
                        " Unset: from the profiled latency model, else a default.",
                    ),
                    "headroom": {
                        "type": "number",
                        "minimum": 0.05,
                        "maximum": 1,
                        "default": 0.8,
                        "description": "Plan replicas to run at this fraction of their capacity.",
                    },
                },
            },
            "kvTransfer": {
                "type": "object",
                "default": {},
                "description": "How KV moves from prefill to decode workers.",
                "properties": {
                    "backend": _str(
                        "auto: each prefill/decode pair negotiates the fastest backend both "
                        "support (cuda_ipc, nixl, shm, tcp); a named one is used where both "
                        "ends support it, else tcp with a warning in the worker logs.",
                        enum=KV_BACKENDS, default="auto"),
                    "ucxTransports": _str(
                        "UCX_TLS for the worker pods (nixl's transports), e.g. rc,cuda_ipc,"
                        "cuda_copy or tcp; unset: UCX chooses.",
                        pattern=r"^\^?[a-z0-9_]+(,[a-z0-9_]+)*$"),
                },
            },
            "redis": redis,
        },
    }


def status_schema() -> Schema:
    """Documented status fields; unknown fields are kept (kopf stores its progress here)."""
    pool = {
        "type": "object",
        "properties": {
            "replicas": _int(),
            "readyReplicas": _int(),
            "updatedReplicas": _int(),
            "ready": _str("ready/desired, for the printer column"),
        },
    }
    planner_pool = {
        "type": "object",
        "properties": {
            "replicas": _int(0),
            "lastChangeTime": {"type": "number", "description": "Unix seconds."},
            "history": {
                "type": "array",
                "description": "(time, wanted) per tick over the stabilisation window.",
                "items": {"type": "array", "items": {"type": "number"}},
            },
            "demand": {
                "type": "array",
                "description": "(time, demand) per tick over the scale-up window.",
                "items": {"type": "array", "items": {"type": "number"}},
            },
            "margin": {"type": "number", "description": "The feedback margin on the need."},
            "forecast": {
                "type": "object",
                "description": "Holt's damped trend of the demand.",
                "properties": {k: {"type": "number"} for k in ("level", "trend", "time")}
                | {"rising": _int(0)},
            },
            "observedSince": {
                "type": "number",
                "description": "Unix seconds of the first measured tick (a whole window is "
                "observed before any scale-down).",
            },
        },
    }
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": _str(),
            "status": _str(enum=["True", "False", "Unknown"]),
            "reason": _str(),
            "message": _str(),
            "lastTransitionTime": _str(format="date-time"),
            "observedGeneration": {"type": "integer", "format": "int64"},
        },
    }
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "observedGeneration": {"type": "integer", "format": "int64"},
            "servingGeneration": _str("Hash of what prefill and decode must agree on."),
            "endpoint": _str("The router's in-cluster URL."),
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "prefill": pool,
            "decode": pool,
            "router": pool,
            "problems": {
                "type": "array",
                "description": "Why pods of a pool do not serve, in the scheduler's or kubelet's"
                " words (operator/pod_problems.py), most severe first.",
                "items": {
                    "type": "object",
                    "properties": {
                        "pool": _str("prefill, decode, router or redis."),
                        "reason": _str("PodsUnschedulable, ImagePullFailing, CrashLooping,"
                                       " ContainerFailing or ReadinessFailing."),
                        "pods": _str("pods with this reason / the pool's pods"),
                        "message": _str(),
                    },
                },
            },
            "ttftMs": {"type": "number", "description": "p90 TTFT over the last window, ms."},
            "tpotMs": {"type": "number", "description": "p90 TPOT over the last window, ms."},
            "attainment": {
                "type": "number",
                "description": "Fraction of the window's finished requests meeting both targets.",
            },
            "observed": {
                "type": "object",
                "description": "The router's metrics over the last window (operator/observe.py).",
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "autoscaling": {
                "type": "object",
                "description": "The planner's replicas per pool and its memory between ticks;"
                " with autoscaling enabled these, not spec.*.replicas, size the Deployments.",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"prefill": planner_pool, "decode": planner_pool},
            },
            "lastScaling": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }


PRINTER_COLUMNS = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.ready"},
    {"name": "Decode", "type": "string", "jsonPath": ".status.decode.ready"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 0},
    {"name": "TTFT", "type": "number", "jsonPath": ".status.ttftMs", "description": "ms"},
    {"name": "TPOT", "type": "number", "jsonPath": ".status.tpotMs", "description": "ms"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict[str, Any]:
    """The CRD object. No scale subresource: there are two independently sized pools, and
    /scale can only point at one replicas field, so ``kubectl scale`` would be misleading."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "splitserve"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["splitserve"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Prefill/decode-disaggregated LLM serving.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a ``default``
    gets a deep copy of it, then defaults apply recursively inside objects and array items."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(sub, out[key])
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def defaulted_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with every schema default filled in (what the API server would store)."""
    return apply_defaults(spec_schema(), spec)


def render_yaml() -> str:
    header = "# Generated by `python -m splitserve.operator.crd`; edit operator/crd.py instead.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)


def main() -> int:
    sys.stdout.write(render_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
