"""``splitserve drain``: a pod's preStop hook; waits until the local worker is idle.

Kubernetes removes a terminating pod from its Service at once, but routers that find workers
through Redis would still send it requests: so it first asks the worker to drain (``POST
/drain``: it leaves the registry and ``/load`` says ``draining``, which the router's filter
honours), then waits (bounded by ``--timeout``) until ``GET /load`` reports no waiting or running
sequences, so a scale-down or rollout never cuts a generation off mid-stream. Only the standard
library is used: it runs in every pod on each termination and must start fast.

It asks with the internal header (the pod's own secret, from its environment), since workers
answer ``/load`` to nobody else; and at the pod's address (``POD_IP``) when the worker listens
there rather than on every interface.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

from splitserve.trust import auth_headers, load_internal_secret


def busy(load: dict) -> int:
    """Sequences still on the worker (``/load`` fields per the worker API contract)."""
    return int(load.get("waiting", 0)) + int(load.get("running", 0))


def wait_idle(
    url: str, timeout: float, interval: float = 1.0, headers: dict[str, str] | None = None
) -> bool:
    """True once the worker is idle or gone; False if still busy at the deadline. A refusal
    (401: the pod's secret is not the worker's) is not "gone": it waits out the timeout."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers=headers or {})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if busy(json.load(resp)) == 0:
                    return True
        except urllib.error.HTTPError as exc:
            print(f"drain: the worker answered {exc.code}; waiting out the timeout", file=sys.stderr)
        except (urllib.error.URLError, OSError, ValueError):
            return True  # nothing listening any more: nothing left to drain
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, required=True, help="the worker's HTTP port")
    parser.add_argument("--host", default=os.environ.get("POD_IP") or "127.0.0.1",
                        help="the worker's address (default: env POD_IP, else 127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait at most")


def start_draining(url: str, headers: dict[str, str]) -> None:
    """``POST /drain``: the worker leaves the registry and routers send it nothing new (an
    older worker without the endpoint, or none listening: the wait below decides)."""
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5):
            pass
    except (urllib.error.URLError, OSError) as exc:
        print(f"drain: could not ask the worker to drain ({exc}); waiting for it to go idle",
              file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    host = f"[{args.host}]" if ":" in args.host else args.host
    headers = auth_headers(load_internal_secret())
    start_draining(f"http://{host}:{args.port}/drain", headers)
    ok = wait_idle(f"http://{host}:{args.port}/load", args.timeout, headers=headers)
    if not ok:
        print(f"drain: worker still busy after {args.timeout:.0f}s", file=sys.stderr)
    return 0  # never block termination beyond the budget
