"""A terminating worker drains (issue 17's finding): ``splitserve drain`` (the pods' preStop)
first asks the worker to drain, so it leaves the Redis registry and routers send it nothing new
while what it runs finishes; then waits until it is idle."""

from __future__ import annotations

import subprocess
import time

import httpx
import redis
from splitserve.launcher.processes import python_command
from splitserve.launcher.up import Deployment, UpConfig, free_port
from splitserve.router.workers import WorkerLoad

WORKER_ARGS = ("--block-size", "8", "--num-kv-blocks", "256")


def test_load_reports_draining_and_the_filter_honours_it() -> None:
    from splitserve.router.policy.filters import Healthy
    from splitserve.router.workers import WorkerState

    assert WorkerLoad.from_json({"running": 2, "draining": True}).draining
    assert not WorkerLoad.from_json({"running": 2}).draining
    assert not WorkerLoad.from_json({"draining": "yes"}).draining  # only a real true
    up, going = WorkerState("http://a", "decode"), WorkerState("http://b", "decode")
    for w, draining in ((up, False), (going, True)):
        w.healthy = True
        w.set_load(WorkerLoad(draining=draining))
    assert Healthy().apply(None, [up, going]) == [up]


def served_ok(url: str, headers: dict[str, str]) -> float:
    """Requests the decode worker at ``url`` completed, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=headers).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "splitserve_worker_requests_total" and s.labels.get("outcome") == "ok")


def test_drained_worker_leaves_redis_and_gets_nothing_new(demo_model, redis_server, tmp_path) -> None:
    cfg = UpConfig(model=str(demo_model), served_model_name="demo", port=free_port(), num_decode=2,
                   worker_args=WORKER_ARGS, log_dir=tmp_path, redis_url=redis_server.url)
    with Deployment(cfg) as dep:
        headers = dep.internal_headers()
        decode0 = dep.component("decode-0").health_url.rsplit("/", 1)[0]
        port = decode0.rsplit(":", 1)[1]
        keys = redis.Redis(port=redis_server.port)
        assert any(decode0.encode() in k for k in keys.keys("splitserve:worker:decode:*"))
        env = {**dep.group.env}
        drained = subprocess.run(python_command("-m", "splitserve.cli", "drain", "--port", port,
                                                "--host", "127.0.0.1", "--timeout", "30"),
                                 env=env, capture_output=True, text=True, timeout=60)
        assert drained.returncode == 0, drained.stderr
        assert not any(decode0.encode() in k for k in keys.keys("splitserve:worker:decode:*"))
        assert httpx.get(f"{decode0}/load", headers=headers).json()["draining"] is True
        time.sleep(1.5)  # one router poll sees it
        before = served_ok(decode0, headers)
        for _ in range(6):
            r = httpx.post(f"{dep.base_url}/completions", timeout=60, json={
                "model": "demo", "prompt": "hello", "max_tokens": 4})
            assert r.status_code == 200, r.text
        assert served_ok(decode0, headers) == before  # all six went to decode-1
        decode1 = dep.component("decode-1").health_url.rsplit("/", 1)[0]
        assert httpx.get(f"{decode1}/load", headers=headers).json()["draining"] is False
