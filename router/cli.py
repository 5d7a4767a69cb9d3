"""``splitserve router``: the OpenAI-compatible gateway in front of the prefill and decode pools."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from splitserve.router.config import (
    ADMISSION_OPTIONS,
    FAILOVER_OPTIONS,
    LIMIT_OPTIONS,
    POLICIES,
    SLO,
    Limits,
    RouterConfig,
    RouterOption,
)
from splitserve.trust import add_secret_argument, read_secret

log = logging.getLogger("splitserve.router")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "router",
        help="run the OpenAI-compatible router in front of prefill and decode workers",
        description=(
            "Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics. Each "
            "request is tokenized here, sent to a (prefill, decode) worker pair chosen by --policy, "
            "and the decode worker's tokens are streamed back. Workers come from --prefill/--decode "
            "URLs and/or a Redis registry (--redis-url) where workers heartbeat. With no --prefill "
            "worker the decode workers compute prompts themselves."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (tokenizer.json, tokenizer_config.json, config.json) or GGUF file",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model name clients send (default: the folder's name)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)",
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--prefill",
        action="append",
        default=[],
        metavar="URL",
        help="prefill worker base URL, e.g. http://127.0.0.1:8101 (repeatable)",
    )
    p.add_argument(
        "--decode",
        action="append",
        default=[],
        metavar="URL",
        help="decode worker base URL (repeatable)",
    )
    p.add_argument(
        "--policy",
        default=None,
        choices=POLICIES,
        help="how to pick the worker pair, by preset (default round_robin)",
    )
    p.add_argument(
        "--policy-config",
        default=None,
        metavar="FILE",
        help="a policy as data instead of a preset: filters, weighted scorers and a picker per role "
        "(JSON or YAML; format in splitserve/router/policy/spec.py)",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="Redis registry, e.g. redis://127.0.0.1:6379/0 (workers heartbeat there)",
    )
    p.add_argument(
        "--redis-namespace",
        default="splitserve",
        help="key prefix in Redis, one per service (default splitserve)",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="file holding the key that /v1/* and /metrics require as 'Authorization: Bearer KEY' "
        "(default: env SPLITSERVE_API_KEY_FILE, else the value of SPLITSERVE_API_KEY; none = open)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="DEPRECATED: visible to every local user in the process list; use --api-key-file",
    )
    add_secret_argument(p)
    p.add_argument(
        "--redis-password-file",
        default=None,
        metavar="FILE",
        help="file holding the Redis password (default: env SPLITSERVE_REDIS_PASSWORD_FILE, "
        "else SPLITSERVE_REDIS_PASSWORD)",
    )
    p.add_argument(
        "--public-metrics",
        action="store_true",
        help="serve /metrics without the API key (a Prometheus that NetworkPolicies admit)",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="serve /docs and /openapi.json (behind the API key when there is one)",
    )
    p.add_argument("--tls-cert-file", default=None,
                   help="serve HTTPS with this PEM certificate (chain); needs --tls-key-file")
    p.add_argument("--tls-key-file", default=None, help="the certificate's PEM private key")
    p.add_argument(
        "--latency-model",
        default=None,
        metavar="FILE",
        help="latency model JSON from `splitserve profile` (goodput policy)",
    )
    p.add_argument(
        "--slo-ttft-ms",
        type=float,
        default=2000.0,
        help="time-to-first-token target in ms (default 2000; per request: header x-slo-ttft-ms)",
    )
    p.add_argument(
        "--slo-tpot-ms",
        type=float,
        default=100.0,
        help="time-per-output-token target in ms (default 100; per request: header x-slo-tpot-ms)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help=(
            "router processes sharing the port through SO_REUSEPORT (default 1); one per core "
            "the router may use. Each has its own worker polling, policy state and /metrics"
        ),
    )
    add_option_arguments(p.add_argument_group(
        "admission", "requests no pair can take now (targets out of reach, or every decode worker out of "
        "KV blocks for the prompt) wait, asking again at each poll round; counted in "
        "splitserve_router_queued_total{reason} and splitserve_router_shed_total{reason}",
    ), ADMISSION_OPTIONS)
    add_option_arguments(p.add_argument_group(
        "worker faults", "how soon a worker that stops answering is given up; sequences it was serving go "
        "on on another pair (resumed: splitserve_router_resumed_total{reason})",
    ), FAILOVER_OPTIONS)
    add_option_arguments(p.add_argument_group(
        "limits", "what one client can make the router hold; each refusal is counted in "
        "splitserve_router_refused_total{reason}. Connection limits are per router process",
    ), LIMIT_OPTIONS)
    p.set_defaults(func=_run)


def add_option_arguments(group: argparse._ActionsContainer, options: tuple[RouterOption, ...],
                         router_defaults: bool = True) -> None:
    """One flag per router option (``LIMIT_OPTIONS``, ``FAILOVER_OPTIONS``, ``ADMISSION_OPTIONS``), its value in
    ``args.<field>``. ``router_defaults=False`` (``splitserve up``): unset flags stay None, so
    only what the user gave is passed on to the router."""
    for option in options:
        metavar = "SECONDS" if option.type is float else option.field.rsplit("_", 1)[-1].upper()
        group.add_argument(option.flag, dest=option.field, type=option.type, metavar=metavar,
                           default=option.default if router_defaults else None,
                           help=f"{option.help} ({'' if router_defaults else 'router '}default {option.default_text})")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The RouterConfig that the command-line arguments describe (raises ValueError if invalid)."""
    return RouterConfig(
        served_model_name=args.served_model_name or Path(args.model).resolve().name,
        model_dir=str(args.model),
        prefill_urls=tuple(args.prefill),
        decode_urls=tuple(args.decode),
        **_policy_from_args(args),
        host=args.host,
        port=args.port,
        api_key=api_key_from_args(args),
        internal_secret_file=args.internal_secret_file,
        redis_password_file=args.redis_password_file,
        public_metrics=args.public_metrics,
        docs=args.docs,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        redis_url=args.redis_url,
        redis_namespace=args.redis_namespace,
        latency_model_path=args.latency_model,
        slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms),
        **{o.field: getattr(args, o.field) for o in (*FAILOVER_OPTIONS, *ADMISSION_OPTIONS)},
        limits=Limits(**{o.field: getattr(args, o.field) for o in LIMIT_OPTIONS}),
    )


def _policy_from_args(args: argparse.Namespace) -> dict:
    """``policy`` (and ``policy_config``) for RouterConfig: a preset, or a configuration file."""
    if args.policy_config is None:
        return {"policy": args.policy or "round_robin"}
    if args.policy is not None:
        raise ValueError("--policy (a preset) and --policy-config (a policy of your own) exclude each other")
    from splitserve.router.policy.spec import PolicySpec

    spec = PolicySpec.load(args.policy_config)
    return {"policy": spec.name, "policy_config": spec}


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """The API key from --api-key-file, SPLITSERVE_API_KEY_FILE or SPLITSERVE_API_KEY; the
    deprecated --api-key still works, with a warning (its value is in /proc/<pid>/cmdline)."""
    key = read_secret(args.api_key_file, file_env="SPLITSERVE_API_KEY_FILE",
                      value_env="SPLITSERVE_API_KEY", what="API key")
    if args.api_key:
        log.warning("--api-key is deprecated: any local user can read it in the process list; "
                    "use --api-key-file or SPLITSERVE_API_KEY")
        if key is None:
            return args.api_key
        if key != args.api_key:
            raise ValueError("--api-key disagrees with --api-key-file/SPLITSERVE_API_KEY: give one")
    return key


def _run(args: argparse.Namespace) -> int:
    from splitserve.router.processes import serve, serve_processes

    if args.workers < 1:
        raise SystemExit(f"splitserve router: --workers must be >= 1, got {args.workers}")
    try:
        config = config_from_args(args)
        if args.workers == 1:
            from splitserve.router.app import create_app

            app = create_app(config)  # here, so a bad model folder fails before listening
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"splitserve router: {exc}") from exc
    print(
        f"splitserve router: http://{config.host}:{config.port}/v1 (model {config.served_model_name!r}, "
        f"{args.workers} process{'es' if args.workers > 1 else ''})",
        flush=True,
    )
    if args.workers == 1:
        serve(app, config.host, config.port)
        return 0
    return serve_processes(config, args.workers)
