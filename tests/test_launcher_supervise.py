"""The supervisor's rules (launcher/supervise.py) on a fake clock and fake processes: an exited
component is restarted with the same arguments after a doubling backoff, its return is logged,
and one that keeps exiting makes `up` give up loudly. The same with real processes is in
test_launcher_restart.py."""

from __future__ import annotations

import logging

import pytest
from splitserve.launcher.processes import Component
from splitserve.launcher.supervise import GaveUp, RestartPolicy, Supervisor


class FakeProcess:
    pid = 4242

    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class FakeGroup:
    def __init__(self, *names: str) -> None:
        self.components = [Component(n, [n, "--port", "1"], f"http://{n}/health", process=FakeProcess())
                            for n in names]
        self.restarted: list[str] = []

    def dead(self) -> list[Component]:
        return [c for c in self.components if c.process.poll() is not None]

    def restart(self, component: Component) -> None:
        self.restarted.append(component.name)
        component.process = FakeProcess()

    def kill(self, name: str, code: int = -9) -> None:
        next(c for c in self.components if c.name == name).process.returncode = code


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    group, clock, healthy = FakeGroup("decode-0", "decode-1", "router"), Clock(), set()
    supervisor = Supervisor(group, RestartPolicy(backoff_s=1, max_backoff_s=4, max_restarts=3, window_s=60),
                            clock=clock, is_healthy=lambda url: url in healthy)
    return group, clock, healthy, supervisor


def test_an_exited_worker_is_restarted_after_its_backoff_and_logged_back(setup, caplog):
    group, clock, healthy, supervisor = setup
    caplog.set_level(logging.INFO, logger="splitserve.up")
    group.kill("decode-0")
    supervisor.tick()
    assert "decode-0 exited with code -9; restarting (attempt 1) in 1.0s" in caplog.text
    assert group.restarted == []
    clock.now = 1.0
    supervisor.tick()
    assert group.restarted == ["decode-0"]
    supervisor.tick()
    assert "is back" not in caplog.text
    healthy.add("http://decode-0/health")
    clock.now = 5.0
    supervisor.tick()
    assert "decode-0 is back: ready 4.0s after its restart" in caplog.text


def test_backoff_doubles_with_each_restart_in_the_window(setup, caplog):
    group, clock, _, supervisor = setup
    caplog.set_level(logging.INFO, logger="splitserve.up")
    delays = []
    for _ in range(3):
        group.kill("router", code=1)
        supervisor.tick()
        due = supervisor._due["router"]
        delays.append(due - clock.now)
        clock.now = due
        supervisor.tick()
    assert delays == [1, 2, 4]
    assert "router exited with code 1; restarting (attempt 2)" in caplog.text
    assert group.restarted == ["router"] * 3


def test_too_many_restarts_in_the_window_gives_up_loudly(setup):
    group, clock, _, supervisor = setup
    for _ in range(3):
        group.kill("decode-1")
        supervisor.tick()
        clock.now += 5
        supervisor.tick()
    group.kill("decode-1")
    with pytest.raises(GaveUp, match="decode-1 exited with code -9 after 3 restarts in the last 60s; giving up"):
        supervisor.tick()


def test_restarts_older_than_the_window_do_not_count(setup):
    group, clock, _, supervisor = setup
    for _ in range(4):
        group.kill("decode-1")
        supervisor.tick()
        clock.now += 31  # never three restarts within 60 s
        supervisor.tick()
    assert group.restarted == ["decode-1"] * 4


def test_max_restarts_zero_stops_at_the_first_exit():
    group = FakeGroup("decode-0")
    supervisor = Supervisor(group, RestartPolicy(max_restarts=0), clock=Clock(), is_healthy=lambda _: True)
    group.kill("decode-0", code=3)
    with pytest.raises(GaveUp, match="code 3"):
        supervisor.tick()


def test_one_workers_exit_leaves_the_others_alone(setup):
    group, clock, _, supervisor = setup
    group.kill("decode-0")
    supervisor.tick()
    clock.now = 10
    supervisor.tick()
    assert group.restarted == ["decode-0"]
