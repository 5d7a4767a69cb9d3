"""`splitserve up`'s plan (pure: nothing starts): how a device's memory is divided among the
workers placed on it."""

from __future__ import annotations

import pytest
from splitserve.launcher.up import UpConfig, memory_shares, plan


def _flag(component, option: str) -> str | None:
    args = component.args
    return args[args.index(option) + 1] if option in args else None


def _workers(num_prefill: int = 1, num_decode: int = 1, **kw):
    cfg = UpConfig(model="m", served_model_name="m", num_prefill=num_prefill, num_decode=num_decode,
                   worker_ports=tuple(range(9000, 9000 + num_prefill + num_decode)), **kw)
    return {c.name: c for c in plan(cfg) if c.name != "router"}


def test_two_workers_on_one_gpu_split_its_memory():
    workers = _workers(devices=("cuda:0", "cuda:0"))
    assert {n: _flag(c, "--gpu-memory-utilization") for n, c in workers.items()} == {
        "prefill-0": "0.425", "decode-0": "0.425"}
    assert all(_flag(c, "--device") == "cuda:0" for c in workers.values())


def test_one_worker_per_gpu_keeps_the_whole_fraction():
    workers = _workers(devices=("cuda:0", "cuda:1"))
    assert [_flag(c, "--gpu-memory-utilization") for c in workers.values()] == ["0.85", "0.85"]


def test_round_robin_placement_is_what_is_divided():
    """1 prefill + 3 decode over two GPUs: cuda:0 holds prefill-0 and decode-1, cuda:1 the others."""
    workers = _workers(num_prefill=1, num_decode=3, devices=("cuda:0", "cuda:1"), gpu_memory_utilization=0.9)
    assert {n: (_flag(c, "--device"), _flag(c, "--gpu-memory-utilization")) for n, c in workers.items()} == {
        "prefill-0": ("cuda:0", "0.45"), "decode-0": ("cuda:1", "0.45"),
        "decode-1": ("cuda:0", "0.45"), "decode-2": ("cuda:1", "0.45")}


def test_without_devices_every_worker_shares_the_default_gpu():
    workers = _workers(num_decode=3)
    assert [_flag(c, "--gpu-memory-utilization") for c in workers.values()] == ["0.2125"] * 4


def test_a_fraction_in_worker_args_is_each_workers_own():
    workers = _workers(devices=("cuda:0", "cuda:0"), worker_args=("--gpu-memory-utilization", "0.3"))
    for c in workers.values():
        assert c.args.count("--gpu-memory-utilization") == 1
        assert _flag(c, "--gpu-memory-utilization") == "0.3"


def test_cpu_workers_get_no_share():
    assert memory_shares(["cpu", "cpu", "cuda", "cuda:0"], 0.8) == [None, None, 0.4, 0.4]


def test_a_bad_fraction_is_refused():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        UpConfig(model="m", served_model_name="m", gpu_memory_utilization=1.5)


def test_router_options_given_to_up_reach_the_router_only():
    cfg = UpConfig(model="m", served_model_name="m", worker_ports=(9000, 9001),
                   router_options={"max_connections": 16, "body_timeout_s": 2.5, "stream_stall_timeout_s": 0.5})
    components = {c.name: c for c in plan(cfg)}
    assert _flag(components["router"], "--max-connections") == "16"
    assert _flag(components["router"], "--body-timeout") == "2.5"
    assert _flag(components["router"], "--stream-stall-timeout") == "0.5"
    assert _flag(components["router"], "--max-body-bytes") is None  # unset: the router's default
    assert all("--max-connections" not in c.args for n, c in components.items() if n != "router")
    with pytest.raises(ValueError, match="max_connections must be an integer >= 1"):
        UpConfig(model="m", served_model_name="m", router_options={"max_connections": 0})
    with pytest.raises(ValueError, match="poll_timeout_s must be a number of seconds > 0"):
        UpConfig(model="m", served_model_name="m", router_options={"poll_timeout_s": 0})


def test_up_command_line_passes_on_only_the_options_given():
    import argparse

    from splitserve.launcher import cli

    sub = argparse.ArgumentParser().add_subparsers()
    cli.register(sub)
    args = sub.choices["up"].parse_args(["--max-sequences", "4", "--keep-alive-timeout", "1.5",
                                         "--stream-stall-timeout", "0.5", "--max-attempts", "3"])
    assert cli.router_options(args) == {"max_sequences": 4, "keep_alive_timeout_s": 1.5,
                                        "stream_stall_timeout_s": 0.5, "max_attempts": 3}
    with pytest.raises(SystemExit, match="splitserve up: body_timeout_s must be a number of seconds > 0"):
        cli.router_options(sub.choices["up"].parse_args(["--body-timeout", "nan"]))
    with pytest.raises(SystemExit, match="splitserve up: poll_interval_s must be a number of seconds > 0"):
        cli.router_options(sub.choices["up"].parse_args(["--poll-interval", "0"]))
