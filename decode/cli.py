"""``splitserve decode``: run a decode worker."""

from __future__ import annotations

import argparse
from typing import Any

from splitserve.worker.cli import register_worker
from splitserve.worker.options import WorkerOptions


def build_app(options: WorkerOptions) -> Any:
    """The decode worker's app (imports torch and loads the model: only when the command runs)."""
    from splitserve.decode.server import create_app

    return create_app(options)


def register(sub: argparse._SubParsersAction) -> None:
    p = register_worker(
        sub, "decode", default_port=8200,
        help="run a decode worker (receives KV from prefill workers and generates tokens)",
        description="Serve POST /generate (NDJSON token stream), GET /health, /load, /metrics, and "
        "a KV receiver on --kv-port that prefill workers send prompt caches to.",
        build_app=build_app,
    )
    p.add_argument("--kv-port", type=int, default=0, help="KV receiver port (default: any free port; /health reports it)")
    p.add_argument("--kv-timeout", type=float, default=30.0, help="seconds to wait for a prompt's KV before failing the request (default 30)")
