"""``python -m splitserve.router ARGS`` = ``splitserve router ARGS``, importing only the router.

The ``splitserve`` command discovers every component's CLI module, and some of them import
libraries the router never uses (numpy, rich); a router-only machine or image (and
bench/lab/router.py) starts the router through here with the router's own dependencies alone.
"""

from __future__ import annotations

import argparse
import sys

from splitserve.cli import configure_logging
from splitserve.router.cli import register


def main(argv: list[str] | None = None) -> int:
    commands = argparse.ArgumentParser().add_subparsers()
    register(commands)
    parser = commands.choices["router"]  # the `splitserve router` parser, on its own
    parser.prog = "python -m splitserve.router"
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
