"""The process-backed pods' pure parts (no cluster): how a pod spec becomes a host command line
and environment, which addresses a Service name resolves to, and a pod's resolver."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
from pod_processes import PODNET, cpu_threads, expand, map_paths
from service_net import dns_map, target_port


def load_podnet():  # noqa: ANN201 (a module)
    """tests/podnet/sitecustomize.py as a module of its own (it installs nothing here: no map)."""
    spec = importlib.util.spec_from_file_location("podnet_sitecustomize", PODNET / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pod(name: str, ip: str | None, ready: bool, labels: dict, terminating: bool = False) -> dict:
    meta = {"name": name, "namespace": "ns", "labels": labels}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    spec = {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8100}]}]}
    return {"metadata": meta, "status": status, "spec": spec}


def service(name: str, cluster_ip: str, selector: dict) -> dict:
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": cluster_ip, "selector": selector,
                     "ports": [{"port": 80, "targetPort": "http"}]}}  # fmt: skip


def test_expand_follows_kubernetes_rules() -> None:
    env = {"POD_IP": "127.244.200.7"}
    assert expand("--advertise-host=$(POD_IP)", env) == "--advertise-host=127.244.200.7"
    assert expand("$(UNKNOWN) $$(POD_IP)", env) == "$(UNKNOWN) $(POD_IP)"


def test_mount_paths_map_in_one_pass_at_path_boundaries() -> None:
    mounts = [("/models", Path("/tmp/a/models")), ("/tmp", Path("/tmp/p/tmp"))]
    assert map_paths("/models/tiny", mounts) == "/tmp/a/models/tiny"  # not /tmp/p/tmp/a/...
    assert map_paths("--model=/models", mounts) == "--model=/tmp/a/models"
    assert map_paths("/tmpfoo /srv/models", mounts) == "/tmpfoo /srv/models"


def test_cpu_threads_from_limit_else_request() -> None:
    assert cpu_threads({"resources": {"requests": {"cpu": "250m"}}}) == 1
    assert cpu_threads({"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "3"}}}) == 3
    assert cpu_threads({}) == 1


def test_dns_map_clusterip_or_ready_pods_of_a_headless_service() -> None:
    sel = {"app": "w"}
    pods = [pod("a", "127.244.200.1", True, sel), pod("b", "127.244.200.2", False, sel),
            pod("c", "127.244.200.3", True, sel, terminating=True),
            pod("d", "127.244.200.4", True, {"app": "other"})]  # fmt: skip
    names = dns_map([service("router", "127.96.0.9", sel), service("w", "None", sel)], pods)
    assert names == {"router.ns.svc.cluster.local": ["127.96.0.9"],
                     "w.ns.svc.cluster.local": ["127.244.200.1"]}  # fmt: skip
    assert target_port(pods[0], {"port": 80, "targetPort": "http"}) == 8100


def test_pod_resolver_search_list_localhost_and_unknown_services(tmp_path: Path) -> None:
    podnet = load_podnet()
    names = {"redis.ns.svc.cluster.local": ["127.96.0.5"], "w.ns.svc.cluster.local": []}
    (tmp_path / "dns.json").write_text(json.dumps(names))
    podnet._MAP, podnet._NAMESPACE, podnet._POD_IP = str(tmp_path / "dns.json"), "ns", "127.244.200.9"
    for host in ("redis", "redis.ns", "redis.ns.svc", "redis.ns.svc.cluster.local."):
        assert podnet.resolve(host) == ["127.96.0.5"], host
    assert podnet.resolve("localhost") == ["127.244.200.9"]
    assert podnet.resolve("example.com") is None  # not the cluster's: the real resolver
    with pytest.raises(socket.gaierror):
        podnet.resolve("nope.ns.svc")
    with pytest.raises(socket.gaierror):  # a headless Service with no ready pod
        podnet.getaddrinfo("w", 80)
    info = podnet.getaddrinfo("redis", 6379, type=socket.SOCK_STREAM)
    assert {i[4] for i in info} == {("127.96.0.5", 6379)}
