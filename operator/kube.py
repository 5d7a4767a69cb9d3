"""The few Kubernetes API calls the operator makes, over the official Python client.

Children are written with server-side apply (one field manager, forced): applying the same
manifest twice is a no-op on the server (the resourceVersion does not move), which is what makes
reconciliation idempotent and a restarted operator harmless. Only the kinds the renderers produce
are known here, so each path is fixed and no discovery round-trip is needed.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from splitserve.operator import crd, manifests

FIELD_MANAGER = "splitserve-operator"
log = logging.getLogger(__name__)

# kind -> (API prefix, plural)
_KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "Secret": ("/api/v1", "secrets"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
}


@dataclass(frozen=True)
class ApplyResult:
    """What one server-side apply did: ``created``, ``updated`` or ``unchanged``."""

    kind: str
    name: str
    action: str


_client: tuple[Any, Any] | None = None
_client_lock = threading.Lock()


def _connection() -> tuple[Any, Any]:
    """(Configuration, urllib3 pool) from in-cluster config or KUBECONFIG, made once.

    Only the client's configuration loading and its TLS-configured urllib3 pool are used: the
    generated request helpers changed signatures across client releases, these two did not.
    """
    global _client
    with _client_lock:  # kopf runs sync handlers in a thread pool
        if _client is None:
            cfg = kubernetes.client.Configuration()
            try:
                kubernetes.config.load_incluster_config(client_configuration=cfg)
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(client_configuration=cfg)
            pool = kubernetes.client.rest.RESTClientObject(cfg).pool_manager
            _client = (cfg, pool)
        return _client


def _path(kind: str, namespace: str, name: str | None = None) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind {kind!r} is not one the operator manages")
    prefix, plural = _KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def _call(
    method: str,
    path: str,
    query: list[tuple[str, str]] | None = None,
    body: dict[str, Any] | None = None,
    content_type: str = "application/json",
) -> Any:
    """One API request; raises ApiException (with ``status``) on a non-2xx answer."""
    cfg, pool = _connection()
    url = cfg.host + path + ("?" + urllib.parse.urlencode(query) if query else "")
    headers = {"Accept": "application/json"}
    for auth in cfg.auth_settings().values():  # bearer token (refreshed in-cluster)
        if auth.get("in") == "header" and auth.get("value"):
            headers[auth["key"]] = auth["value"]
    data = None
    if body is not None:
        headers["Content-Type"] = content_type
        data = json.dumps(body).encode()
    resp = pool.request(method, url, body=data, headers=headers, timeout=30.0)
    if not 200 <= resp.status < 300:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = resp.data.decode(errors="replace")
        raise exc
    return json.loads(resp.data) if resp.data else {}


def get(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _call("GET", _path(kind, namespace, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def apply(manifest: dict[str, Any]) -> ApplyResult:
    """Server-side apply ``manifest``; compares resourceVersions to say what changed."""
    kind = manifest["kind"]
    meta = manifest["metadata"]
    before = get(kind, meta["namespace"], meta["name"])
    after = _call(
        "PATCH",
        _path(kind, meta["namespace"], meta["name"]),
        query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        body=manifest,  # JSON is YAML: the apply content type takes it as is
        content_type="application/apply-patch+yaml",
    )
    if before is None:
        action = "created"
    elif before["metadata"]["resourceVersion"] != after["metadata"]["resourceVersion"]:
        action = "updated"
    else:
        action = "unchanged"
    return ApplyResult(kind, meta["name"], action)


def list_owned(kind: str, namespace: str, instance: str) -> list[dict[str, Any]]:
    """Objects of ``kind`` labelled as children of the InferenceService ``instance``."""
    selector = (
        f"{manifests.LABEL_INSTANCE}={instance},app.kubernetes.io/managed-by={manifests.MANAGED_BY}"
    )
    data = _call("GET", _path(kind, namespace), query=[("labelSelector", selector)])
    return list(data.get("items", []))


def list_pods(labels: dict[str, str], namespace: str) -> list[dict[str, Any]]:
    """The pods in ``namespace`` that carry every label of ``labels`` (RBAC: list pods)."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    data = _call("GET", f"/api/v1/namespaces/{namespace}/pods", query=[("labelSelector", selector)])
    return list(data.get("items", []))


def list_pod_events(namespace: str, reason: str) -> list[dict[str, Any]]:
    """The Events about pods in ``namespace`` with ``reason`` (RBAC: list events)."""
    query = [("fieldSelector", f"involvedObject.kind=Pod,reason={reason}")]
    data = _call("GET", f"/api/v1/namespaces/{namespace}/events", query=query)
    return list(data.get("items", []))


def delete(kind: str, namespace: str, name: str) -> None:
    try:
        _call("DELETE", _path(kind, namespace, name))
    except ApiException as exc:
        if exc.status != 404:
            raise


def _isvc_path(namespace: str, name: str) -> str:
    return f"/apis/{crd.GROUP}/{crd.VERSION}/namespaces/{namespace}/{crd.PLURAL}/{name}"


def get_inference_service(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _call("GET", _isvc_path(namespace, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Merge-patch the InferenceService's status subresource (no-op patches do not bump it)."""
    _call(
        "PATCH",
        _isvc_path(namespace, name) + "/status",
        body={"status": status},
        content_type="application/merge-patch+json",
    )
