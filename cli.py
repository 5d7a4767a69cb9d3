"""The ``splitserve`` command line.

Each component contributes its own subcommands from a small ``<component>/cli.py`` module that
defines ``register(subparsers)``; this file only discovers and wires them, so components never
edit a shared command table and ``splitserve --help`` stays cheap (heavy imports such as torch
happen inside the command functions, not at registration).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# Order is the order of ``splitserve --help``.
COMPONENTS = ("launcher", "engine", "worker", "prefill", "decode", "router", "operator", "bench", "sim")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve",
        description=(
            "LLM serving with prefill and decode on separate workers. "
            "Start here: `splitserve up` serves a demo model locally on an OpenAI-compatible API."
        ),
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING); default INFO"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for component in COMPONENTS:
        module_name = f"splitserve.{component}.cli"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(sub)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
