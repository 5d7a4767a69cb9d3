"""Which router pods the SLO loop scrapes: the ready pods the router Service selects.

Scraping the Service itself would land on one random pod per scrape, so with more than one router
replica a window would mix pods (counters seem to go down, or read one pod's share). The loop
instead lists the pods of the router's selector (the Service's own selector,
``manifests.selector_labels``): those Ready and not terminating, with their address, the number
of their container port named ``http``, and each pod's uid to key its scrape history by, so a pod
deleted and recreated under the same name still starts a fresh baseline. This is the ``pod``
role of Prometheus' Kubernetes discovery.

Why pods and not the Service's EndpointSlices: the API refuses loopback addresses in
EndpointSlices, so a cluster whose pod addresses lie in 127.0.0.0/8 (the test cluster, where every
address must be loopback) would have none, while the pods are the truth on every cluster.

``SPLITSERVE_METRICS_URL`` (``settings.metrics_url``) keeps the old single-URL mode for local
use: one target. Both are pure: the SLO tick lists the service's pods once
(``reconcile.pods_by_pool``) for the status, the scrape and the planner, and hands the router's
pods to ``targets``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from splitserve.operator import settings

PORT_NAME = "http"  # the router Service's port name (manifests.render_router)


@dataclass(frozen=True)
class Endpoint:
    """One ready router pod: its uid, name, address and http port."""

    key: str  # pod uid
    pod: str  # pod name
    host: str
    port: int


@dataclass(frozen=True)
class Target:
    """One /metrics URL to scrape and the key its scrape history lives under."""

    key: str
    pod: str
    url: str


def ready_endpoints(pods: list[dict[str, Any]], port_name: str = PORT_NAME) -> list[Endpoint]:
    """The pods of ``pods`` that serve: Ready, not terminating, with an address and a container
    port named ``port_name``; sorted by pod name."""
    found = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])  # fmt: skip
        if not ready or meta.get("deletionTimestamp") or not status.get("podIP"):
            continue
        ports = [p["containerPort"] for c in (pod.get("spec") or {}).get("containers") or []
                 for p in c.get("ports") or [] if p.get("name") == port_name]  # fmt: skip
        if ports:
            name = meta.get("name") or status["podIP"]
            found.append(Endpoint(meta.get("uid") or name, name, status["podIP"], ports[0]))
    return sorted(found, key=lambda e: (e.pod, e.key))


def url_host(address: str) -> str:
    """An address as a URL host: IPv6 literals in brackets."""
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:  # a hostname (slices of type FQDN)
        return address


def targets(name: str, namespace: str, pods: list[dict[str, Any]]) -> list[Target]:
    """What to scrape for one InferenceService this tick: the configured single URL, else each
    ready pod of ``pods``, its router's pods (``settings.pod_metrics_url``)."""
    single = settings.metrics_url(name, namespace)
    if single is not None:
        return [Target(single, single, single)]
    return [
        Target(e.key, e.pod, settings.pod_metrics_url(name, namespace, e.pod, url_host(e.host),
                                                      e.port))
        for e in ready_endpoints(pods)
    ]  # fmt: skip
