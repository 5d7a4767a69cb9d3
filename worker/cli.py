"""The commands that run an engine with a worker's options: ``splitserve prefill`` and
``splitserve decode`` (each role registers itself through ``register_worker``, naming the
function that builds its app) and ``splitserve profile`` (this module's ``register``).

Torch-free at import: ``splitserve --help`` registers every subcommand, and should not pay for
loading torch to print a usage message; the role's server module loads when its command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

from splitserve.worker.options import WorkerOptions, add_worker_args, options_from_args

AppBuilder = Callable[[WorkerOptions], Any]  # options -> the role's ASGI app (loads the model)


def register_worker(
    sub: argparse._SubParsersAction, role: str, default_port: int, help: str, description: str,
    build_app: AppBuilder,
) -> argparse.ArgumentParser:
    """The ``splitserve <role>`` subcommand: the shared worker options, and a run function that
    serves ``build_app(options)``. Returns the parser so a role can add its own options."""
    parser = sub.add_parser(role, help=help, description=description)
    add_worker_args(parser, default_port=default_port)
    parser.set_defaults(func=partial(_run_worker, role, build_app))
    return parser


def _run_worker(role: str, build_app: AppBuilder, args: argparse.Namespace) -> int:
    from splitserve.worker.shell import serve

    options = options_from_args(args, role)
    serve(build_app(options), options)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser(
        "profile",
        help="measure prefill/decode/transfer latency on this hardware (for the goodput policy)",
        description=(
            "Time the real engine: prefill vs batched prompt tokens, decode step vs batch size and "
            "context, mixed chunked-prefill steps, KV transfer vs tokens (loopback, over --kv-backend; "
            "auto: cuda_ipc on a GPU, as a split on one host uses, else tcp). Writes the latency-model "
            "JSON that `splitserve router --latency-model`, `splitserve sim` and the planner read."
        ),
    )
    add_worker_args(prof, default_port=0)
    prof.add_argument("--out", default="latency-model.json", help="output JSON (default latency-model.json)")
    prof.add_argument("--no-transfer", action="store_true", help="skip the KV transfer measurement")
    prof.set_defaults(func=_profile)


def _profile(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from splitserve.engine.profile import profile

    console = Console(stderr=True)
    options = options_from_args(args, "profile")
    with console.status("profiling...") as status:
        doc = profile(options.engine, progress=lambda line: (status.update(line), console.log(line)),
                      with_transfer=not args.no_transfer, kv_backend=options.kv_backend)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} ({len(doc['prefill']['points'])} prefill, {len(doc['decode']['points'])} decode, "
          f"{len(doc.get('mixed', {}).get('points', []))} mixed-step points)")
    return 0
