"""``splitserve prefill``: run a prefill worker."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from splitserve.engine.worker_options import register_worker

    register_worker(
        sub, "prefill", default_port=8100,
        help="run a prefill worker (computes prompts' KV and ships it to decode workers)",
        description="Serve POST /prefill, GET /health, /load, /metrics. The KV of each prompt goes "
        "to the decode worker named in the request, over --kv-backend.",
    )
