"""The few Kubernetes API calls the operator makes, over the official Python client.

Children are written with server-side apply (one field manager, forced): applying the same
manifest twice is a no-op on the server (the resourceVersion does not move), which is what makes
reconciliation idempotent and a restarted operator harmless. Only the kinds the renderers produce
are known here, so each path is fixed and no discovery round-trip is needed.
"""

from __future__ import annotations

import logging
import threading
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
}


@dataclass(frozen=True)
class ApplyResult:
    """What one server-side apply did: ``created``, ``updated`` or ``unchanged``."""

    kind: str
    name: str
    action: str


_client: kubernetes.client.ApiClient | None = None
_client_lock = threading.Lock()


def api_client() -> kubernetes.client.ApiClient:
    """One shared client, configured in-cluster or from KUBECONFIG (whichever is there)."""
    global _client
    with _client_lock:  # kopf runs sync handlers in a thread pool
        if _client is None:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            _client = kubernetes.client.ApiClient()
        return _client


def _path(kind: str, namespace: str, name: str | None = None) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind {kind!r} is not one the operator manages")
    prefix, plural = _KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def _call(method: str, path: str, **kwargs: Any) -> Any:
    client = api_client()
    data = client.call_api(
        path, method, response_type="object", auth_settings=["BearerToken"],
        _return_http_data_only=True, _preload_content=True, **kwargs,
    )  # fmt: skip
    return data


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
        body=manifest,
        query_params=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        header_params={
            "Content-Type": "application/apply-patch+yaml",
            "Accept": "application/json",
        },
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
    data = _call("GET", _path(kind, namespace), query_params=[("labelSelector", selector)])
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
        header_params={"Content-Type": "application/merge-patch+json"},
    )
