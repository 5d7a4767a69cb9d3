"""Chaos under load on real processes (bench/lab/chaos.py): for each ordinary fault, every request
either completed or got a clear error, no client hung, no stream was cut without a word, and
every worker's KV blocks came back to their idle count (issue 14)."""

from __future__ import annotations

import pytest
from splitserve.bench.lab.chaos import Load, run_fault, standard_faults
from splitserve.launcher.up import Deployment, UpConfig, free_port

WORKER_ARGS = ("--block-size", "8", "--num-kv-blocks", "512")
FAULTS = standard_faults(num_prefill=2)


def deployment(model: str, tmp_path, **kw) -> Deployment:
    cfg = UpConfig(model=model, served_model_name="chaos", num_prefill=2, num_decode=2,
                   port=free_port(), worker_args=WORKER_ARGS, log_dir=tmp_path / "logs", **kw)
    return Deployment(cfg)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name, fault, load", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_loses_nothing(demo_model, tmp_path, name, fault, load) -> None:
    with deployment(str(demo_model), tmp_path) as dep:
        res = run_fault(dep, "chaos", name, fault, load)
    print(res.row())
    assert res.outcomes["hung"] == 0 and res.outcomes["broken"] == 0, res.row()
    assert not any(res.leaked_blocks.values()), res.leaked_blocks
    stayed = res.sent - res.outcomes["left"]
    assert res.outcomes["completed"] >= stayed // 2, res.row()  # the pool that is left serves


@pytest.mark.timeout(240)
def test_redis_restarted_empty_loses_nothing(demo_model, tmp_path, redis_server) -> None:
    """Workers found through Redis: Redis stops and comes back empty under load; the router
    keeps the workers it knows, the workers announce themselves again."""

    def restart_redis(_dep: Deployment) -> None:
        redis_server.stop()
        redis_server.start()

    with deployment(str(demo_model), tmp_path, redis_url=redis_server.url) as dep:
        res = run_fault(dep, "chaos", "redis restarted empty", restart_redis, Load())
        after = run_fault(dep, "chaos", "after redis came back", None, Load(requests_per_client=2))
    for r in (res, after):
        print(r.row())
        assert r.outcomes["hung"] == 0 and r.outcomes["broken"] == 0, r.row()
        assert not any(r.leaked_blocks.values()), r.leaked_blocks
    assert after.outcomes["completed"] == after.sent, after.row()
