"""``splitserve prefill``: run a prefill worker."""

from __future__ import annotations

import argparse
from typing import Any

from splitserve.worker.cli import register_worker
from splitserve.worker.options import WorkerOptions


def build_app(options: WorkerOptions) -> Any:
    """The prefill worker's app (imports torch and loads the model: only when the command runs)."""
    from splitserve.prefill.server import create_app

    return create_app(options)


def register(sub: argparse._SubParsersAction) -> None:
    register_worker(
        sub, "prefill", default_port=8100,
        help="run a prefill worker (computes prompts' KV and ships it to decode workers)",
        description="Serve POST /prefill, GET /health, /load, /metrics. The KV of each prompt goes "
        "to the decode worker named in the request, over --kv-backend.",
        build_app=build_app,
    )
