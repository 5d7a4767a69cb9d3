"""Services for process-backed pods (tests only): cluster DNS names and ClusterIPs that work.

kube-proxy and cluster DNS do not exist in the test cluster, and the machine must not be changed
(no iptables, no /etc/hosts). So, from what the API server says:

- a JSON map ``<svc>.<ns>.svc.cluster.local -> [addresses]`` (a ClusterIP Service: its ClusterIP;
  a headless one: its ready pods' IPs), which ``tests/podnet/sitecustomize.py`` reads inside
  every process-backed pod;
- one small TCP proxy per ClusterIP Service port, listening on the ClusterIP itself (a 127.96.0.x
  address: Linux answers on all of 127.0.0.0/8 with no set-up) and forwarding each connection
  to one of the Service's ready, non-terminating pods, round robin, at the pod's target port.
  The tests' own clients (the openai client, curl) use the ClusterIP directly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("service_net")
DOMAIN = "svc.cluster.local"


def pod_ready(pod: dict[str, Any]) -> bool:
    """Ready, addressed and not terminating: what a Service's endpoints would hold."""
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])  # fmt: skip
    return ready and bool(status.get("podIP")) and not pod["metadata"].get("deletionTimestamp")


def selects(service: dict[str, Any], pod: dict[str, Any]) -> bool:
    selector = service["spec"].get("selector") or {}
    labels = pod["metadata"].get("labels") or {}
    return (
        bool(selector)
        and service["metadata"]["namespace"] == pod["metadata"]["namespace"]
        and all(labels.get(k) == v for k, v in selector.items())
    )


def target_port(pod: dict[str, Any], port: dict[str, Any]) -> int | None:
    """A Service port's targetPort on one pod (a number, or a container port's name)."""
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    for container in pod["spec"]["containers"]:
        for p in container.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def dns_map(services: list[dict[str, Any]], pods: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Every Service's cluster names and the addresses they resolve to."""
    names: dict[str, list[str]] = {}
    for svc in services:
        meta, spec = svc["metadata"], svc["spec"]
        ip = spec.get("clusterIP")
        if ip and ip != "None":
            addresses = [ip]
        else:
            addresses = sorted(p["status"]["podIP"] for p in pods
                               if pod_ready(p) and selects(svc, p))  # fmt: skip
        names[f"{meta['name']}.{meta['namespace']}.{DOMAIN}"] = addresses
    return names


@dataclass
class Backend:
    """Where one ClusterIP Service port currently leads: its ready pods' (ip, port)."""

    addresses: list[tuple[str, int]]


class PortProxy:
    """One listening socket at ``ip:port``; each accepted connection is piped to a backend."""

    def __init__(self, ip: str, port: int) -> None:
        self.backend = Backend([])
        self._turn = itertools.count()
        self.sock = socket.create_server((ip, port), reuse_port=False)
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"proxy {ip}:{port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        addresses = list(self.backend.addresses)
        if not addresses:
            client.close()  # no ready pod: refused, as kube-proxy would reject it
            return
        address = addresses[next(self._turn) % len(addresses)]
        try:
            upstream = socket.create_connection(address, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        client.settimeout(None)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until ``src`` ends, then half-close ``dst`` (the other direction may go on)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass  # either side reset: the connection is over, the other pipe sees it too
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            src.close()


class ServiceNet:
    """The DNS map file and the ClusterIP proxies, brought up to date by ``sync``."""

    def __init__(self, map_path: Path) -> None:
        self.map_path = map_path
        self.proxies: dict[tuple[str, int], PortProxy] = {}
        self._written: dict[str, list[str]] | None = None
        self.sync([], [])

    def sync(self, services: list[dict[str, Any]], pods: list[dict[str, Any]]) -> None:
        names = dns_map(services, pods)
        if names != self._written:
            tmp = self.map_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(names, indent=1))
            os.replace(tmp, self.map_path)  # readers never see half a file
            self._written = names
        wanted: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for svc in services:
            ip = svc["spec"].get("clusterIP")
            if not ip or ip == "None" or not svc["spec"].get("selector"):
                continue
            ready = [p for p in pods if pod_ready(p) and selects(svc, p)]
            for port in svc["spec"].get("ports") or []:
                wanted[(ip, int(port["port"]))] = [
                    (p["status"]["podIP"], t) for p in ready if (t := target_port(p, port))
                ]
        for key in set(self.proxies) - set(wanted):
            self.proxies.pop(key).close()
        for key, addresses in wanted.items():
            if key not in self.proxies and not addresses:
                continue  # never served yet: connections are refused, as with kube-proxy
            if key not in self.proxies:
                try:
                    self.proxies[key] = PortProxy(*key)
                except OSError as exc:
                    log.warning("cannot listen on %s:%d for a Service: %s", *key, exc)
                    continue
            self.proxies[key].backend = Backend(addresses)

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()
