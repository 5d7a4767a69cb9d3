"""``splitserve up``: serve a model locally with a router, prefill and decode workers."""

from __future__ import annotations

import argparse
import shlex

from splitserve.router.cli import add_option_arguments
from splitserve.router.config import ADMISSION_OPTIONS, FAILOVER_OPTIONS, LIMIT_OPTIONS, option_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="serve a model on this machine: router + prefill + decode workers (no cluster needed)",
        description=(
            "Start a router (OpenAI-compatible API), --prefill prefill workers and --decode decode "
            "workers as separate processes, wait until all are ready, print the endpoint, restart "
            "any of them that exits (with backoff; up gives up and stops everything when one "
            "exits more than --max-restarts times in --restart-window seconds), and stop them all "
            "on Ctrl-C. Without --model, SmolLM2-135M-Instruct is served (fetched into "
            "~/.cache/splitserve/models on first use; offline, a random-weight demo model)."
        ),
    )
    p.add_argument("--model", default=None, help="Hugging Face model folder or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the folder name)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1; 0 = colocated, decode workers prefill too)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="router address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="router port (default 8000)")
    p.add_argument("--policy", default="round_robin", help="routing policy (default round_robin)")
    p.add_argument("--devices", default="", help="comma-separated devices assigned round robin, prefill first (e.g. cuda:0,cuda:1)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="fraction of each GPU's memory for the workers placed on it, divided evenly "
                        "among them (default 0.85: two workers on cuda:0 get 0.425 each); a "
                        "--gpu-memory-utilization in --worker-args sets every worker's own instead")
    p.add_argument("--worker-args", default="", help="extra arguments for every worker, e.g. \"--dtype bfloat16\"")
    p.add_argument("--router-args", default="", help="extra arguments for the router")
    add_option_arguments(p.add_argument_group(
        "router limits", "what one client can make the router hold (`splitserve router`'s "
        "limits, passed on when given)"), LIMIT_OPTIONS, router_defaults=False)
    add_option_arguments(p.add_argument_group(
        "router worker faults", "how soon the router gives up a worker that stops answering "
        "(`splitserve router`'s worker-fault options, passed on when given)"), FAILOVER_OPTIONS,
        router_defaults=False)
    add_option_arguments(p.add_argument_group(
        "router admission", "how long and how many requests wait for a pair (`splitserve router`'s "
        "admission options, passed on when given)"), ADMISSION_OPTIONS, router_defaults=False)
    p.add_argument("--redis-url", default=None, help="use a Redis registry: workers announce themselves, the router discovers them")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="restarts of one process within --restart-window before up gives up (default 5; "
                        "0: stop everything when any process exits)")
    p.add_argument("--restart-window", type=float, default=300.0,
                   help="seconds over which --max-restarts counts (default 300)")
    p.add_argument("--log-dir", default=None, help="write each process's log here (default: this terminal)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import time
    from pathlib import Path

    from splitserve.launcher.supervise import GaveUp, RestartPolicy, Supervisor
    from splitserve.launcher.up import DEMO_MODEL_DIR, Deployment, UpConfig
    from splitserve.modelfiles.read import model_name

    log = logging.getLogger("splitserve.up")
    options = router_options(args)  # a bad one fails before a model is fetched or a process started
    model = args.model
    if model is None:
        from splitserve.engine.default_model import default_model

        model = default_model(DEMO_MODEL_DIR)
    cfg = UpConfig(
        model=model,
        served_model_name=args.served_model_name or model_name(model),
        num_prefill=args.prefill,
        num_decode=args.decode,
        host=args.host,
        port=args.port,
        policy=args.policy,
        devices=tuple(d for d in args.devices.split(",") if d),
        worker_args=tuple(shlex.split(args.worker_args)),
        router_args=tuple(shlex.split(args.router_args)),
        router_options=options,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        redis_url=args.redis_url,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    deployment = Deployment(cfg)
    supervisor = Supervisor(deployment.group, RestartPolicy(max_restarts=args.max_restarts,
                                                            window_s=args.restart_window))
    # stop the same way on SIGTERM as on Ctrl-C; and on SIGINT even where it came in ignored (a
    # non-interactive shell's background job, `splitserve up &`, starts with SIGINT ignored:
    # a SIGINT to the process group then stopped the workers but not up, which restarted them)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        deployment.start()
        print(f"splitserve is up: {deployment.base_url} (model {cfg.served_model_name!r}, "
              f"{cfg.num_prefill} prefill + {cfg.num_decode} decode workers)", flush=True)
        print(f"try: curl {deployment.base_url}/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{cfg.served_model_name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
              flush=True)
        print("press Ctrl-C to stop", flush=True)
        while True:
            supervisor.tick()
            time.sleep(0.5)
    except GaveUp as exc:
        log.error("%s; stopping everything", exc)
        return 1
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        return 0
    finally:
        deployment.stop()


def router_options(args: argparse.Namespace) -> dict[str, int | float]:
    """The router options (limits, worker faults) given on the command line (field -> value),
    checked."""
    given = {o.field: getattr(args, o.field) for o in (*LIMIT_OPTIONS, *FAILOVER_OPTIONS, *ADMISSION_OPTIONS)}
    given = {name: value for name, value in given.items() if value is not None}
    try:
        option_args(given)
    except ValueError as exc:
        raise SystemExit(f"splitserve up: {exc}") from exc
    return given


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
