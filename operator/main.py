"""Run the operator: ``splitserve operator`` or ``python -m splitserve.operator.main``.

kopf is started from code (``kopf.run``) after importing ``splitserve.operator.handlers`` as a
module, so no file path ever reaches kopf (see DESIGN.md, "The operator/ trap").
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch this namespace (repeatable)",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch every namespace (needs cluster-wide RBAC)",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="no peering with other operator replicas (run exactly one)",
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        default=None,
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    parser.add_argument("--verbose", action="store_true", help="kopf's verbose logging")


def run(args: argparse.Namespace) -> int:
    import kopf
    import splitserve.operator.handlers  # noqa: F401  (registers the handlers)
    from splitserve.operator import metrics

    if args.metrics_port is not None:
        metrics.serve(args.metrics_port)
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=args.standalone,
        clusterwide=bool(args.all_namespaces),
        namespaces=args.namespaces or (),
        liveness_endpoint=args.liveness,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve operator", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
