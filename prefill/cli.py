"""``splitserve prefill``: run a prefill worker."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from splitserve.engine.worker_options import add_worker_args

    p = sub.add_parser(
        "prefill",
        help="run a prefill worker (computes prompts' KV and ships it to decode workers)",
        description="Serve POST /prefill, GET /health, /load, /metrics. The KV of each prompt goes "
        "to the decode worker named in the request, over --kv-backend.",
    )
    add_worker_args(p, default_port=8100)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from splitserve.engine.worker import options_from_args, serve
    from splitserve.prefill.server import create_app

    options = options_from_args(args, "prefill")
    serve(create_app(options), options)
    return 0
