"""`splitserve up` supervises, with real processes: a decode worker killed with SIGKILL is
restarted and rejoins the router's pool, requests keep succeeding meanwhile (through the decode
worker that is left), and the restarted worker serves again; a killed router comes back too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from splitserve.launcher.processes import python_command
from splitserve.launcher.up import free_port
from splitserve.trust import InternalSecret, auth_headers
from splitserve.trust.secret import ENV_VALUE

PROMPT = "the model serve token prompt decode"
BACK_S = 120
# up's workers answer /metrics only to holders of the internal secret: give up this one
SECRET = "restart-test-internal-secret-0123456789abcdef"


class Up:
    """A `splitserve up` process, its log, and the requests made through it."""

    def __init__(self, model: Path, tmp: Path, sigint_ignored: bool = False) -> None:
        self.port, self.log = free_port(), tmp / "up.log"
        self.base = f"http://127.0.0.1:{self.port}"

        def ignore_sigint() -> None:  # as a non-interactive shell starts a background job
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                python_command("-m", "splitserve.cli", "up", "--model", str(model), "--served-model-name", "demo",
                               "--prefill", "1", "--decode", "2", "--port", str(self.port),
                               "--log-dir", str(tmp / "logs"), "--worker-args", "--block-size 8 --num-kv-blocks 256"),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, ENV_VALUE: SECRET}, preexec_fn=ignore_sigint if sigint_ignored else None,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.text()))
            if found:
                return found[-1]
            if self.proc.poll() is not None:
                pytest.fail(f"up exited with {self.proc.returncode}\n{self.text()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} in up's log after {timeout:.0f}s\n{self.text()[-4000:]}")

    def pid(self, name: str) -> int:
        return int(self.wait_for(rf"(?:started|restarted) {name} \(pid (\d+)\)", 5).group(1))

    def worker_url(self, name: str) -> str:
        return "http://127.0.0.1:" + self.wait_for(rf"started {name} \(pid \d+\): \S+ .*?--port (\d+)", 5).group(1)

    def complete(self) -> str:
        r = httpx.post(f"{self.base}/v1/completions", timeout=60, json={
            "model": "demo", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


@pytest.fixture
def up(demo_model, tmp_path):
    deployment = Up(demo_model, tmp_path)
    try:
        deployment.wait_for("splitserve is up", 240)
        yield deployment
    finally:
        deployment.stop()


def _decode_requests(url: str) -> float:
    """Requests this decode worker process has served (its counter starts at 0 in a new process)."""
    text = httpx.get(f"{url}/metrics", timeout=5, headers=auth_headers(InternalSecret(SECRET))).text
    return sum(float(m.group(1)) for m in re.finditer(r'^splitserve_worker_requests_total\{[^}]*role="decode"[^}]*\} (\S+)',
                                                      text, re.M))


def test_a_killed_decode_worker_is_restarted_and_serves_again_while_requests_succeed(up):
    expected = up.complete()
    victim_url = up.worker_url("decode-0")
    os.kill(up.pid("decode-0"), signal.SIGKILL)
    served_meanwhile = 0
    deadline = time.monotonic() + BACK_S
    while "decode-0 is back" not in up.text():
        assert time.monotonic() < deadline, up.text()[-4000:]
        assert up.complete() == expected  # the router serves through decode-1
        served_meanwhile += 1
    assert served_meanwhile >= 3
    assert re.search(r"decode-0 exited with code -9; restarting \(attempt 1\)", up.text())
    for _ in range(8):  # round robin: the restarted worker gets its turn once the router sees it
        assert up.complete() == expected
        if _decode_requests(victim_url) > 0:
            break
        time.sleep(0.5)
    assert _decode_requests(victim_url) > 0, "the restarted decode-0 served nothing"


def test_a_killed_router_is_restarted(up):
    expected = up.complete()
    os.kill(up.pid("router"), signal.SIGKILL)
    up.wait_for(r"router exited with code -9; restarting \(attempt 1\)", 10)
    up.wait_for("router is back", BACK_S)
    assert up.complete() == expected


def test_sigint_to_the_group_stops_up_even_when_it_started_with_sigint_ignored(demo_model, tmp_path):
    """`splitserve up &` from a script starts with SIGINT ignored; a SIGINT to its process group
    (what `splitserve bench sweep` sends to stop a system) used to stop the workers, which up then
    restarted, and not up itself (the bench waited 60 s for it on the H200)."""
    deployment = Up(demo_model, tmp_path, sigint_ignored=True)
    try:
        deployment.wait_for("splitserve is up", 240)
        os.killpg(deployment.proc.pid, signal.SIGINT)
        assert deployment.proc.wait(30) == 0
        assert "stopping..." in deployment.text() and "restarting" not in deployment.text()
    finally:
        deployment.stop()
