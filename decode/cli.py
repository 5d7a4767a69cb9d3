"""``splitserve decode``: run a decode worker."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from splitserve.engine.worker_options import register_worker

    p = register_worker(
        sub, "decode", default_port=8200,
        help="run a decode worker (receives KV from prefill workers and generates tokens)",
        description="Serve POST /generate (NDJSON token stream), GET /health, /load, /metrics, and "
        "a KV receiver on --kv-port that prefill workers send prompt caches to.",
    )
    p.add_argument("--kv-port", type=int, default=0, help="KV receiver port (default: any free port; /health reports it)")
    p.add_argument("--kv-timeout", type=float, default=30.0, help="seconds to wait for a prompt's KV before failing the request (default 30)")
