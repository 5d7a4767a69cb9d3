"""``splitserve bench``: run load against an endpoint, compare systems, list workloads.

    splitserve bench run --base-url URL --model NAME --workload chat --rates 1,2,4 --label disagg
    splitserve bench report bench/out/disagg bench/out/colocated --out bench/out/report
    splitserve bench workloads
    splitserve bench sweep --model DIR --system 'disagg=splitserve up ... --port {port}' ...
    splitserve bench engine-vs-hf --model DIR --device cuda:0      (one GPU: engine vs HF)
    splitserve bench hf-server --model DIR --port 8001             (the HF baseline server)
"""

from __future__ import annotations

import argparse
import json
import logging
import time

log = logging.getLogger("splitserve.bench")

DEFAULT_OUT = "bench/out"


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible endpoint: SLO attainment, goodput, plots",
        description=(
            "Open-loop load generation with named workloads (same requests for every system "
            "for a given --seed), SLO attainment and goodput, JSON results and PNG plots. "
            "Typical use: `bench run` once per system (same --workload/--rates/--seed, "
            "different --label), then `bench report` over their folders."
        ),
    )
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    _add_run(bsub)
    _add_report(bsub)
    _add_workloads(bsub)
    _add_sweep(bsub)
    _add_engine_vs_hf(bsub)
    _add_hf_server(bsub)
    _add_split_vs_colocated(bsub)


def _add_run(bsub: argparse._SubParsersAction) -> None:
    from splitserve.bench.workloads import WORKLOADS

    defaults = ", ".join(f"{n} {w.slo_ms[0]:g}/{w.slo_ms[1]:g}" for n, w in WORKLOADS.items())
    run = bsub.add_parser(
        "run",
        help="send a workload at one or more rates and record every request",
        description=(
            "Send --num-requests requests of --workload at each rate (open loop: each request "
            "leaves at its scheduled time whatever the server is doing), stream each response "
            "and record TTFT, every inter-token gap and end-to-end latency. Writes "
            "OUT/LABEL/<workload>_rate<R>.json per rate (raw records + summary) and a report "
            "of this label's runs (table, report.json, PNGs) in OUT/LABEL."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    srv = run.add_argument_group("server")
    srv.add_argument("--base-url", required=True,
                     help="server root, e.g. http://127.0.0.1:8000 (/v1 optional)")
    srv.add_argument("--model", required=True, help="model name sent in each request")
    srv.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    srv.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="do not send \"ignore_eos\": true (for servers that reject it; outputs "
                          "may then end early, counted as short_outputs)")
    srv.add_argument("--no-usage", dest="include_usage", action="store_false",
                     help="do not ask for stream_options.include_usage (output tokens are then "
                          "counted from SSE chunks)")
    srv.add_argument("--extra-body", default="{}", help="JSON object merged into each body")
    srv.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                     help="extra HTTP header on every request (repeatable)")
    srv.add_argument("--slo-headers", action="store_true",
                     help="send the SLO as x-slo-ttft-ms / x-slo-tpot-ms headers (splitserve's "
                          "router reads them; give every compared system the same flag)")
    srv.add_argument("--temperature", type=float, default=0.0)
    srv.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")

    load = run.add_argument_group("load")
    load.add_argument("--workload", default="chat", choices=sorted(WORKLOADS))
    rate = load.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, help="offered rate, requests/s")
    rate.add_argument("--rates", help="comma-separated rates for a sweep, e.g. 1,2,4,8")
    load.add_argument("--num-requests", type=int, default=200, help="requests per rate")
    load.add_argument("--seed", type=int, default=0,
                      help="fixes lengths, prompts and arrival pattern: use the same for every "
                           "system compared")
    load.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    load.add_argument("--cv", type=float, default=2.0,
                      help="coefficient of variation of inter-arrival gaps (gamma only; "
                           ">1 is bursty)")
    load.add_argument("--tokenizer", default=None,
                      help="tokenizer.json or model folder, for token-exact prompt lengths "
                           "(default: approximate with 0.75 words per token)")
    load.add_argument("--warmup", type=int, default=0,
                      help="short requests sent one by one before measuring (not recorded)")
    load.add_argument("--cooldown", type=float, default=0.0, help="pause between rates, s")
    load.add_argument("--no-progress", dest="progress", action="store_false")

    caps = run.add_argument_group("scale-down (e.g. the CPU demo model, context 1024)")
    caps.add_argument("--length-scale", type=float, default=1.0,
                      help="multiply drawn lengths (keeps the distribution's shape)")
    caps.add_argument("--max-input", type=int, default=None, help="clip prompt tokens")
    caps.add_argument("--max-output", type=int, default=None, help="clip output tokens")
    caps.add_argument("--max-context", type=int, default=None,
                      help="clip prompt so prompt + output fits the model's context")

    slo = run.add_argument_group("SLO", f"defaults per workload, TTFT/TPOT ms: {defaults}")
    slo.add_argument("--ttft-ms", type=float, default=None, help="TTFT target, ms")
    slo.add_argument("--tpot-ms", type=float, default=None, help="TPOT target, ms")
    slo.add_argument("--attainment", type=float, default=0.9,
                     help="fraction of requests that must meet both")

    out = run.add_argument_group("output")
    out.add_argument("--out", default=DEFAULT_OUT, help="results folder")
    out.add_argument("--label", default="system", help="this system's name in tables/plots")
    out.add_argument("--gpus", type=int, default=None,
                     help="GPUs the system uses (reports goodput per GPU)")
    out.add_argument("--no-plots", dest="plots", action="store_false",
                     help="skip this label's PNGs (bench report draws them anyway)")
    run.set_defaults(func=_run)


def _add_report(bsub: argparse._SubParsersAction) -> None:
    rep = bsub.add_parser(
        "report",
        help="compare systems from their run folders: table, report.json/md, PNG plots",
        description=(
            "Read every run file under the given folders, judge all by one SLO (given here, "
            "else the one they were run with), compute goodput per system and workload, print "
            "a table and write report.json, report.md, attainment_<workload>.png and "
            "cdf_<workload>_rate<R>.png (for rates every system ran) into --out."
        ),
    )
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="run folders or files")
    rep.add_argument("--out", default=None, help="report folder (default: the first DIR)")
    rep.add_argument("--ttft-ms", type=float, default=None)
    rep.add_argument("--tpot-ms", type=float, default=None)
    rep.add_argument("--attainment", type=float, default=None)
    rep.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    rep.set_defaults(func=_report)


def _add_workloads(bsub: argparse._SubParsersAction) -> None:
    wl = bsub.add_parser(
        "workloads",
        help="list the named workloads: published targets vs what the sampler draws",
    )
    wl.add_argument("--num", type=int, default=20000, help="samples per workload")
    wl.add_argument("--seed", type=int, default=0)
    wl.set_defaults(func=_workloads)


def _add_sweep(bsub: argparse._SubParsersAction) -> None:
    from splitserve.bench import goodput
    from splitserve.bench.entry import add_subcommand

    add_subcommand(bsub, "sweep", "start each system in turn, run workloads over rates, report goodput",
                   goodput, goodput.sweep)


def _add_engine_vs_hf(bsub: argparse._SubParsersAction) -> None:
    from splitserve.bench import engine_vs_hf
    from splitserve.bench.entry import add_subcommand

    add_subcommand(bsub, "engine-vs-hf",
                   "one GPU: the engine (colocated) versus HF transformers at the same rates",
                   engine_vs_hf, engine_vs_hf.run_from_args)


def _add_split_vs_colocated(bsub: argparse._SubParsersAction) -> None:
    from splitserve.bench import split_vs_colocated
    from splitserve.bench.entry import add_subcommand

    add_subcommand(bsub, "split-vs-colocated",
                   "two devices: 1 prefill + 1 decode worker against 2 colocated workers",
                   split_vs_colocated, split_vs_colocated.run)


def _add_hf_server(bsub: argparse._SubParsersAction) -> None:
    from splitserve.bench import hf_server
    from splitserve.bench.entry import add_subcommand

    add_subcommand(bsub, "hf-server",
                   "serve a model with plain HF transformers generate (the baseline), OpenAI API",
                   hf_server, hf_server.run_from_args)


def parse_rates(args: argparse.Namespace) -> list[float]:
    """Rates from --rate or --rates, sorted, each > 0 (an error names the bad value)."""
    if args.rate is not None:
        rates = [args.rate]
    else:
        try:
            rates = [float(x) for x in args.rates.split(",") if x.strip()]
        except ValueError as exc:
            raise SystemExit(f"--rates: not a comma-separated list of numbers: {args.rates!r}") \
                from exc
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"rates must be > 0, got {rates}")
    if len(set(rates)) != len(rates):
        raise SystemExit(f"duplicate rates: {rates}")
    return sorted(rates)


def parse_headers(items: list[str]) -> dict[str, str]:
    """``NAME:VALUE`` strings to a dict (an item without ':' is an error naming it)."""
    headers = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"--header must be NAME:VALUE, got {item!r}")
        headers[name.strip()] = value.strip()
    return headers


def _run(args: argparse.Namespace) -> int:
    from splitserve.bench.runner import RunSpec, run_sweep

    try:
        extra = json.loads(args.extra_body)
    except ValueError as exc:
        raise SystemExit(f"--extra-body is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise SystemExit("--extra-body must be a JSON object")
    spec = RunSpec.from_args(args, parse_rates(args), extra, parse_headers(args.header))
    results = run_sweep(spec)
    from splitserve.bench.report import print_table

    print_table(*results)
    return 0


def _report(args: argparse.Namespace) -> int:
    from splitserve.bench.report import build_report, print_table

    out = args.out or args.dirs[0]
    results, slo, written = build_report(args.dirs, out, args.ttft_ms, args.tpot_ms,
                                         args.attainment, args.plots)
    print_table(results, slo)
    log.info("wrote %d files into %s", len(written), out)
    return 0


def _workloads(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table
    from splitserve.bench.workloads import WORKLOADS, sample_lengths

    t0 = time.perf_counter()
    table = Table(title=f"workloads: published target vs sampled (n={args.num}, seed "
                        f"{args.seed}); mean / median / p90 tokens")
    for col in ("name", "input target", "input sampled", "output target", "output sampled",
                "SLO ms (TTFT/TPOT)"):
        table.add_column(col)
    for name, w in WORKLOADS.items():
        inp, out = sample_lengths(w, args.num, args.seed)

        def tgt(d) -> str:
            return f"{_n(d.target_mean)} / {d.median:.0f} / {_n(d.target_p90)}"

        def got(x: np.ndarray) -> str:
            return f"{x.mean():.0f} / {np.median(x):.0f} / {np.percentile(x, 90):.0f}"

        table.add_row(name, tgt(w.input), got(inp), tgt(w.output), got(out),
                      f"{w.slo_ms[0]:g}/{w.slo_ms[1]:g}")
    console = Console()
    console.print(table)
    for name, w in WORKLOADS.items():
        console.print(f"[bold]{name}[/bold]: {w.description}. {w.source}", highlight=False)
    log.debug("sampled in %.2fs", time.perf_counter() - t0)
    return 0


def _n(x: float | None) -> str:
    return "?" if x is None else f"{x:.0f}"
