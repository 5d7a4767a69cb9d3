"""Real servers the tests start: a redis-server on a free loopback port (never a fake)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from splitserve.launcher.up import free_port


class RedisServer:
    """A real redis-server on a free port, in a temp dir, restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (Debian: apt-get install -y redis-server)")
        self.exe, self.workdir, self.port = exe, workdir, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None


def rerun_under_triton_interpreter(test_file: str, timeout: float) -> None:
    """Run a kernel test module again in a fresh Python with Triton's interpreter on (the
    variable must be set before triton is first imported, so not in this process) and fail with
    its output if any of its tests fail."""
    import os
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", SPLITSERVE_KERNELS="triton")
    env.pop("SPLITSERVE_TEST_DEVICE", None)
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def stub_router(demo_model: Path, *args: str, scheme: str = "http", verify: object = True):
    """A real ``splitserve router`` process (safe-path mode) over a stub prefill and a stub
    decode worker in threads; a context manager yielding (base URL, the router's Popen).
    ``args`` go to the router; ``scheme``/``verify`` say how to reach its /health."""
    import contextlib

    import httpx
    from splitserve.launcher.processes import python_command
    from splitserve.launcher.up import free_port
    from splitserve.testing.stub_worker import ServerThread, StubBehaviour, create_stub_app

    @contextlib.contextmanager
    def running():
        decode = StubBehaviour("decode")
        with ServerThread(create_stub_app(StubBehaviour("prefill"))) as p, \
                ServerThread(create_stub_app(decode)) as d:
            decode.kv_endpoint = d.endpoint
            port = free_port()
            proc = subprocess.Popen(python_command(
                "-m", "splitserve.router", "--model", str(demo_model), "--served-model-name", "demo",
                "--port", str(port), "--prefill", p.url, "--decode", d.url, "--log-level", "WARNING",
                *args))
            url = f"{scheme}://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if httpx.get(url + "/health", verify=verify, timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"router at {url} did not become healthy")
                    time.sleep(0.1)
                yield url, proc
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    return running()
