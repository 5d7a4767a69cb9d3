"""Subcommands of the operator component: ``splitserve operator`` and ``splitserve drain``."""

from __future__ import annotations

import argparse
from typing import Any


def _operator(args: argparse.Namespace) -> int:
    from splitserve.operator import main

    return main.run(args)


def _drain(args: argparse.Namespace) -> int:
    from splitserve.operator import drain

    return drain.run(args)


def register(subparsers: Any) -> None:
    from splitserve.operator import drain, main

    op = subparsers.add_parser(
        "operator", help="run the Kubernetes operator (InferenceService -> pools + router)"
    )
    main.add_arguments(op)
    op.set_defaults(func=_operator)
    dr = subparsers.add_parser(
        "drain", help="preStop hook: wait until the local worker has no running sequences"
    )
    drain.add_arguments(dr)
    dr.set_defaults(func=_drain)
