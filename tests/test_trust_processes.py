"""Internal authentication with real processes on loopback: ``splitserve up`` gives its children
a secret that is on no command line; workers answer nothing but /health without the router's
header; a registry entry forged in a real Redis never becomes a worker the router uses."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import redis
from splitserve.discovery.registry import RedisRegistry, signed_entry, start_heartbeat, worker_key
from splitserve.launcher.up import Deployment, UpConfig, free_port
from splitserve.trust import ENV_FILE, ENV_VALUE, InternalSecret, auth_headers

pytestmark = pytest.mark.timeout(180)

SECRET = InternalSecret("registry-test-secret-0123456789abcdef")


@pytest.fixture(scope="module")
def deployment(demo_model, tmp_path_factory):
    cfg = UpConfig(model=str(demo_model), served_model_name="demo", port=free_port(),
                   worker_args=("--block-size", "8", "--num-kv-blocks", "64"),
                   log_dir=tmp_path_factory.mktemp("logs"))
    with pytest.MonkeyPatch.context() as mp:  # this run must generate its own secret
        mp.delenv(ENV_FILE, raising=False)
        mp.delenv(ENV_VALUE, raising=False)
        with Deployment(cfg) as dep:
            yield dep


def the_secret(dep: Deployment) -> str:
    return Path(dep.group.env[ENV_FILE]).read_text().strip()


def worker_url(dep: Deployment, name: str) -> str:
    return dep.component(name).health_url.removesuffix("/health")


def test_up_passes_the_secret_by_file_never_on_a_command_line(deployment):
    secret = the_secret(deployment)
    assert len(secret) >= 32
    assert os.stat(deployment.group.env[ENV_FILE]).st_mode & 0o077 == 0  # this user's only
    for c in deployment.group.components:
        cmdline = Path(f"/proc/{c.process.pid}/cmdline").read_bytes()
        assert secret.encode() not in cmdline, c.name
        assert b"internal-secret" not in cmdline and b"api-key" not in cmdline, c.name


def test_requests_flow_router_to_prefill_to_decode_with_the_secret(deployment):
    r = httpx.post(f"{deployment.base_url}/completions", timeout=60, json={
        "model": "demo", "prompt": "hello world", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("name", ["prefill-0", "decode-0"])
def test_a_worker_refuses_everything_but_health_without_the_header(deployment, name):
    url = worker_url(deployment, name)
    body = {"request_id": "x", "token_ids": [1, 2, 3], "decode_kv_endpoint": "127.0.0.1:9"}
    path = "/prefill" if name.startswith("prefill") else "/generate"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    for headers in ({}, {"x-splitserve-internal-auth": "0" * 64}):
        assert httpx.post(f"{url}{path}", json=body, headers=headers, timeout=10).status_code == 401
        assert httpx.get(f"{url}/load", headers=headers, timeout=10).status_code == 401
        assert httpx.get(f"{url}/metrics", headers=headers, timeout=10).status_code == 401
    good = auth_headers(InternalSecret(the_secret(deployment)))
    assert httpx.get(f"{url}/load", headers=good, timeout=10).status_code == 200
    metrics = httpx.get(f"{url}/metrics", headers=good, timeout=10).text
    role = name.split("-")[0]
    assert f'splitserve_worker_requests_total{{outcome="unauthorized",role="{role}"}}' in metrics


def test_a_forged_registry_entry_is_ignored(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    genuine = start_heartbeat(redis_server.url, {"url": "http://real:1", "role": "decode",
                                                 "kv_endpoint": "real:2"}, interval=0.2, secret=SECRET)
    forged_key = worker_key("splitserve", "decode", "http://evil:1")
    client.set(forged_key, json.dumps({"url": "http://evil:1", "role": "decode", "kv_endpoint": "evil:2"}))
    wrong = InternalSecret("not-this-deployments-secret-000000000")
    other_key = worker_key("splitserve", "decode", "http://evil:3")
    client.set(other_key, json.dumps(signed_entry(wrong, other_key, {"url": "http://evil:3", "role": "decode"})))
    moved_key = worker_key("splitserve", "decode", "http://evil:4")  # a real entry, copied as is
    forged: list[str] = []
    try:
        asyncio.run(asyncio.sleep(0.5))
        client.set(moved_key, client.get(genuine.key))  # the MAC covers the key too

        async def scan_twice():
            registry = RedisRegistry(redis_server.url, secret=SECRET, on_forged=forged.append)
            try:
                return await registry.workers(), await registry.workers()
            finally:
                await registry.aclose()

        first, second = asyncio.run(scan_twice())
        assert [w.url for w in first] == ["http://real:1"] == [w.url for w in second]
        assert dict(first[0].extra)["kv_endpoint"] == "real:2" and "mac" not in dict(first[0].extra)
        assert sorted(set(forged)) == sorted({forged_key, other_key, moved_key})
        assert len(forged) == 6  # counted on every scan (logged once per key)
    finally:
        genuine.stop()
        client.close()
