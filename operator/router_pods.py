"""Which router pods the SLO loop scrapes: the ready endpoints of the router Service.

Scraping the Service itself would land on one random pod per scrape, so with more than one router
replica a window would mix pods (counters seem to go down, or read one pod's share). The loop
instead reads the Service's EndpointSlices (``discovery.k8s.io/v1``, label
``kubernetes.io/service-name``), which the endpoint-slice controller keeps to exactly the pods the
Service routes to: ready ones, with their address and the resolved number of the ``http`` port,
and each pod's name and uid (``targetRef``) to key its scrape history by, so a pod deleted and
recreated under the same name still starts a fresh baseline.

``SPLITSERVE_METRICS_URL`` (``settings.metrics_url``) keeps the old single-URL mode for local
use: one target, no API call. ``ready_endpoints`` is pure; ``targets`` does the one API call.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from splitserve.operator import kube, manifests, settings

PORT_NAME = "http"  # the router Service's port name (manifests.render_router)


@dataclass(frozen=True)
class Endpoint:
    """One ready router pod as an EndpointSlice lists it."""

    key: str  # pod uid (the address when the slice has no targetRef)
    pod: str  # pod name (the address when the slice has no targetRef)
    host: str
    port: int


@dataclass(frozen=True)
class Target:
    """One /metrics URL to scrape and the key its scrape history lives under."""

    key: str
    pod: str
    url: str


def ready_endpoints(slices: list[dict[str, Any]], port_name: str = PORT_NAME) -> list[Endpoint]:
    """The ready endpoints of ``slices`` serving ``port_name``, one per pod, sorted by pod.

    ``conditions.ready`` unset means unknown, which the API says to read as ready. A pod listed
    twice (an IPv4 and an IPv6 slice) counts once: the first address seen.
    """
    found: dict[str, Endpoint] = {}
    for s in slices:
        ports = [p for p in s.get("ports") or [] if p.get("name") == port_name and p.get("port")]
        if not ports:
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False or not ep.get("addresses"):
                continue
            host = ep["addresses"][0]
            ref = ep.get("targetRef") or {}
            key = ref.get("uid") or host
            found.setdefault(key, Endpoint(key, ref.get("name") or host, host, ports[0]["port"]))
    return sorted(found.values(), key=lambda e: (e.pod, e.key))


def url_host(address: str) -> str:
    """An address as a URL host: IPv6 literals in brackets."""
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:  # a hostname (slices of type FQDN)
        return address


def targets(name: str, namespace: str) -> list[Target]:
    """What to scrape for one InferenceService this tick: the configured single URL, else each
    ready router pod (``settings.pod_metrics_url``). May raise ApiException."""
    single = settings.metrics_url(name, namespace)
    if single is not None:
        return [Target(single, single, single)]
    slices = kube.list_endpoint_slices(manifests.child_name(name, "router"), namespace)
    return [
        Target(e.key, e.pod, settings.pod_metrics_url(name, namespace, e.pod, url_host(e.host),
                                                      e.port))
        for e in ready_endpoints(slices)
    ]  # fmt: skip
