"""Redis registry against a real ``redis-server`` process: heartbeats with a TTL, a worker that
stops heartbeating leaves within seconds, several routers share it, a Redis restart does not take
the router down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from services import RedisServer
from splitserve.discovery.registry import RedisRegistry, StaticRegistry, start_heartbeat
from splitserve.router.app import create_app
from splitserve.router.config import RouterConfig
from splitserve.testing.stub_worker import ServerThread, StubBehaviour, create_stub_app

pytestmark = pytest.mark.timeout(60)




def _until(predicate, timeout: float, what: str) -> float:  # noqa: ANN001
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def _urls(registry: RedisRegistry) -> set[tuple[str, str]]:
    return {(w.role, w.url) for w in asyncio.run(_workers(registry))}


async def _workers(registry: RedisRegistry):  # noqa: ANN202
    try:
        return await registry.workers()
    finally:
        await registry.aclose()


def test_heartbeat_registers_and_leaves(redis_server: RedisServer) -> None:
    new = lambda: RedisRegistry(redis_server.url)  # noqa: E731  (a fresh client per event loop)
    hb = start_heartbeat(redis_server.url, {"url": "http://w1:1/", "role": "decode", "kv_endpoint": "w1:2"}, interval=0.2)
    other = start_heartbeat(redis_server.url, {"url": "http://w2:1", "role": "prefill"}, interval=0.2)
    try:
        _until(lambda: _urls(new()) == {("decode", "http://w1:1"), ("prefill", "http://w2:1")}, 5, "registration")
        (w,) = [w for w in asyncio.run(_workers(new())) if w.role == "decode"]
        assert dict(w.extra)["kv_endpoint"] == "w1:2"
        # A clean stop removes the key at once.
        other.stop()
        assert _urls(new()) == {("decode", "http://w1:1")}
        # A crash (no more heartbeats, key left behind) expires within the TTL (1 s here).
        hb.stop(deregister=False)
        waited = _until(lambda: _urls(new()) == set(), 5, "expiry")
        assert waited < 3
    finally:
        hb.stop()
        other.stop()


def test_static_workers_are_always_included_and_namespaces_separate(redis_server: RedisServer) -> None:
    hb = start_heartbeat(redis_server.url, {"url": "http://a:1", "role": "decode"}, interval=0.2, namespace="svc-a")
    try:
        static = StaticRegistry(["http://p:1"], [])
        _until(lambda: _urls(RedisRegistry(redis_server.url, "svc-a", static)) == {("prefill", "http://p:1"), ("decode", "http://a:1")}, 5, "workers")
        assert _urls(RedisRegistry(redis_server.url, "svc-b")) == set()
    finally:
        hb.stop()
    with pytest.raises(ValueError, match="role"):
        start_heartbeat(redis_server.url, {"url": "http://x", "role": "boss"})


def test_registry_survives_redis_restart(redis_server: RedisServer) -> None:
    hb = start_heartbeat(redis_server.url, {"url": "http://w:1", "role": "decode"}, interval=0.2)

    async def scenario() -> None:
        registry = RedisRegistry(redis_server.url)
        try:
            for _ in range(100):
                if await registry.workers():
                    break
                await asyncio.sleep(0.05)
            assert registry.redis_ok and len(await registry.workers()) == 1
            redis_server.stop()
            t0 = time.monotonic()
            assert [w.url for w in await registry.workers()] == ["http://w:1"]  # last known set
            assert not registry.redis_ok and time.monotonic() - t0 < 3
            redis_server.start()  # empty: the heartbeat must re-create its key
            for _ in range(100):
                await asyncio.sleep(0.05)
                if await registry.workers() and registry.redis_ok:
                    break
            assert registry.redis_ok and [w.url for w in await registry.workers()] == ["http://w:1"]
        finally:
            await registry.aclose()

    try:
        asyncio.run(scenario())
    finally:
        hb.stop()


def test_routers_discover_workers_through_redis(redis_server: RedisServer, demo_model: Path) -> None:
    """Two routers, no static URLs: both serve through heartbeating stub workers; a decode worker
    that stops heartbeating leaves both; a Redis restart does not take them down."""
    pb, db = StubBehaviour("prefill"), StubBehaviour("decode")
    with ServerThread(create_stub_app(pb)) as p, ServerThread(create_stub_app(db)) as d:
        db.kv_endpoint = d.endpoint
        hbs = [start_heartbeat(redis_server.url, {"url": p.url, "role": "prefill"}, interval=0.2),
               start_heartbeat(redis_server.url, {"url": d.url, "role": "decode"}, interval=0.2)]
        cfg = RouterConfig(served_model_name="demo", model_dir=str(demo_model), redis_url=redis_server.url,
                           poll_interval_s=0.2)
        body = {"model": "demo", "prompt": "hello", "max_tokens": 3}
        try:
            with ServerThread(create_app(cfg)) as r1, ServerThread(create_app(cfg)) as r2:
                for r in (r1, r2):
                    _until(lambda r=r: httpx.get(r.url + "/health").status_code == 200, 5, "router health")
                    assert httpx.post(r.url + "/v1/completions", json=body).status_code == 200
                redis_server.stop()
                for r in (r1, r2):  # Redis down: routers keep the workers they knew
                    assert httpx.post(r.url + "/v1/completions", json=body, timeout=10).status_code == 200
                redis_server.start()
                time.sleep(0.5)
                assert httpx.post(r1.url + "/v1/completions", json=body).status_code == 200
                hbs[1].stop(deregister=False)  # the decode worker "crashes" (stops heartbeating)
                waited = _until(lambda: httpx.get(r2.url + "/health").status_code == 503, 5, "decode to leave")
                assert waited < 4
                resp = httpx.post(r2.url + "/v1/completions", json=body)
                assert resp.status_code == 503 and "decode" in resp.json()["error"]["message"]
        finally:
            for hb in hbs:
                hb.stop()
