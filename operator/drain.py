"""``splitserve drain``: a pod's preStop hook; waits until the local worker is idle.

Kubernetes removes a terminating pod from its Service at once, so no new request arrives; this
waits (bounded by ``--timeout``) until the worker's ``GET /load`` reports no waiting or running
sequences, so a scale-down or rollout never cuts a generation off mid-stream. Only the standard
library is used: it runs in every pod on each termination and must start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def busy(load: dict) -> int:
    """Sequences still on the worker (``/load`` fields per the worker API contract)."""
    return int(load.get("waiting", 0)) + int(load.get("running", 0))


def wait_idle(url: str, timeout: float, interval: float = 1.0) -> bool:
    """True once the worker is idle or gone; False if still busy at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if busy(json.load(resp)) == 0:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            return True  # nothing listening any more: nothing left to drain
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, required=True, help="the worker's HTTP port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait at most")


def run(args: argparse.Namespace) -> int:
    ok = wait_idle(f"http://{args.host}:{args.port}/load", args.timeout)
    if not ok:
        print(f"drain: worker still busy after {args.timeout:.0f}s", file=sys.stderr)
    return 0  # never block termination beyond the budget
