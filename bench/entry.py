"""The two ways a bench script is started, written once: as ``splitserve bench NAME`` and as
``python -m splitserve.bench.MODULE``. Each such module defines ``add_arguments(parser)`` and
a run function taking the parsed namespace."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from types import ModuleType

Run = Callable[[argparse.Namespace], int]


def add_subcommand(
    bsub: argparse._SubParsersAction, name: str, help: str, module: ModuleType, run: Run
) -> argparse.ArgumentParser:
    """``splitserve bench NAME``: the module's docstring as its description."""
    parser = bsub.add_parser(
        name, help=help, description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def standalone_main(module: ModuleType, run: Run, argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench.MODULE ...``: same options, INFO logs with timestamps."""
    spec = getattr(module, "__spec__", None)  # under ``-m`` the name is "__main__"
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.name if spec else module.__name__}", description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)
