"""A pod's network view, for processes that tests/pod_processes.py runs as pods (tests only).

Python imports ``sitecustomize`` at start-up from its path; the harness puts this folder first
on the PYTHONPATH of every process it runs as a pod, and of nothing else, so nothing on the
machine changes. It gives the process what a pod's network namespace and cluster DNS would:

- ``<svc>.<ns>.svc.cluster.local`` (and ``<svc>.<ns>.svc``, ``<svc>.<ns>``, and ``<svc>`` in
  the pod's own namespace, as resolv.conf's search list does) resolve from a JSON map the
  harness keeps current (``SPLITSERVE_PODNET_MAP``): a ClusterIP Service's address, or a headless
  Service's ready pod addresses. An unknown ``.svc`` name fails like NXDOMAIN.
- ``localhost`` is the pod itself (``SPLITSERVE_PODNET_POD_IP``): a pod's loopback reaches its
  own containers, e.g. a preStop hook calling its worker.
- uvloop is hidden, so servers run on asyncio's loop: uvloop resolves names in libuv, past
  Python's resolver that this module replaces.
"""

from __future__ import annotations

import json
import os
import socket
import sys

_MAP = os.environ.get("SPLITSERVE_PODNET_MAP", "")
_NAMESPACE = os.environ.get("SPLITSERVE_PODNET_NAMESPACE", "default")
_POD_IP = os.environ.get("SPLITSERVE_PODNET_POD_IP", "")
_DOMAIN = "svc.cluster.local"
_real_getaddrinfo = socket.getaddrinfo


def _names() -> dict[str, list[str]]:
    try:
        with open(_MAP) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _candidates(host: str) -> list[str]:
    """The fully qualified names a pod's resolver would try for ``host`` (ndots:5 search)."""
    host = host.rstrip(".").lower()
    if host.endswith("." + _DOMAIN):
        return [host]
    if host.endswith(".svc"):
        return [host + ".cluster.local"]
    dots = host.count(".")
    if dots == 0:
        return [f"{host}.{_NAMESPACE}.{_DOMAIN}"]
    if dots == 1:
        return [f"{host}.{_DOMAIN}"]
    return []


def resolve(host: str) -> list[str] | None:
    """The cluster addresses of ``host``; None for a name the cluster does not own."""
    if _POD_IP and host in ("localhost", "127.0.0.1"):
        return [_POD_IP]
    candidates = _candidates(host)
    if not candidates:
        return None
    names = _names()
    for name in candidates:
        if name in names:
            return names[name]
    if host.rstrip(".").lower().endswith((".svc", "." + _DOMAIN)):
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: no such Service")
    return None  # a short name outside the cluster: the machine's resolver decides


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 (socket's names)
    """socket.getaddrinfo, with cluster names resolved first."""
    name = host.decode() if isinstance(host, bytes) else host
    ips = resolve(name) if isinstance(name, str) else None
    if ips is None:
        return _real_getaddrinfo(host, port, family, type, proto, flags)
    if not ips:
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: Service has no ready pods")
    return [info for ip in ips for info in _real_getaddrinfo(ip, port, family, type, proto, flags)]


if _MAP:
    socket.getaddrinfo = getaddrinfo
    sys.modules.setdefault("uvloop", None)  # import uvloop -> ImportError: asyncio's loop
