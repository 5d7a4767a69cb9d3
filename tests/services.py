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
