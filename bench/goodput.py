"""Goodput sweep: start each system, run every workload over the rates, stop it, report.

    splitserve bench sweep --model MODEL_DIR --out bench/out/goodput \\
        --system 'disagg=splitserve up --model {model} --served-model-name {name} --port {port}
                  --prefill 1 --decode 1 --devices cuda:0,cuda:1' --gpus disagg=2 \\
        --system 'colocated=<command starting 2 colocated workers behind one endpoint>' \\
        --gpus colocated=2 --workloads chat,summarisation --rates 1,2,4,8,16

Systems run one after another on the same machine (never two at once: they would share the
GPUs), each with the same seeded requests. A system is a shell-style command template with
``{model}``, ``{name}`` (served model name), ``{host}`` and ``{port}`` placeholders, started in
its own process group with its log in ``OUT/logs/<label>.log``, considered ready when
``GET {base}/health`` answers 200, and stopped (SIGINT, then SIGTERM, then SIGKILL, to its own
process group only) after its last workload. ``--endpoint LABEL=URL`` adds an already running
system instead. Results: ``OUT/<label>/<workload>_rate<R>.json`` and ``OUT/report/<workload>/``
(table, report.json, report.md, PNGs) over all systems. Run files already in OUT (an earlier,
interrupted sweep) are included in the report: use a fresh OUT for a fresh comparison. A system
that fails to start is logged and skipped; the exit code is then 1.

On the CPU with the demo model (context 1,024), scale the lengths down and keep rates tiny:

    splitserve bench sweep --model /tmp/demo --out /tmp/sweep --workloads chat \\
        --system 'disagg=splitserve up --model {model} --served-model-name {name} --port {port}' \\
        --rates 0.5,1 --num-requests 8 --max-input 256 --max-output 32 --max-context 1024 \\
        --ttft-ms 2000 --tpot-ms 500
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from splitserve.bench.loadgen import LoadConfig
from splitserve.bench.runner import RunSpec, run_sweep, slo_headers
from splitserve.bench.stats import SLO
from splitserve.bench.workloads import LengthCaps, get_workload
from splitserve.launcher.up import free_port

log = logging.getLogger("splitserve.bench.sweep")


@dataclass(frozen=True)
class System:
    """One system under test: a command to start (or None: ``url`` is already serving)."""

    label: str
    command: str | None = None
    url: str | None = None
    num_gpus: int | None = None


def command_template(parts: list[str]) -> str:
    """A command template for ``started``: every part quoted, braces escaped, then
    ``{host}``/``{port}`` placeholders (filled in when the system starts) appended."""
    quoted = " ".join(shlex.quote(p).replace("{", "{{").replace("}", "}}") for p in parts)
    return quoted + " --host {host} --port {port}"


def parse_pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    """``LABEL=VALUE`` strings (an item without '=' or with an empty label is an error)."""
    out = []
    for item in items:
        label, sep, value = item.partition("=")
        if not sep or not label.strip() or not value.strip():
            raise ValueError(f"{flag} must be LABEL=VALUE, got {item!r}")
        out.append((label.strip(), value.strip()))
    return out


def build_systems(system: list[str], endpoint: list[str], gpus: list[str]) -> list[System]:
    """Systems from --system/--endpoint/--gpus; duplicate labels are an error."""
    systems = [System(lbl, command=cmd) for lbl, cmd in parse_pairs(system, "--system")]
    systems += [System(lbl, url=url) for lbl, url in parse_pairs(endpoint, "--endpoint")]
    labels = [s.label for s in systems]
    if not systems:
        raise ValueError("give at least one --system or --endpoint")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate system labels: {labels}")
    counts = {lbl: int(n) for lbl, n in parse_pairs(gpus, "--gpus")}
    unknown = set(counts) - set(labels)
    if unknown:
        raise ValueError(f"--gpus for unknown systems: {sorted(unknown)}")
    return [replace(s, num_gpus=counts.get(s.label)) for s in systems]




@contextmanager
def started(system: System, model: str, name: str, log_dir: Path, host: str = "127.0.0.1",
            ready_timeout_s: float = 900.0) -> Iterator[str]:
    """Start ``system`` (unless it is an external endpoint), yield its base URL, stop it."""
    if system.command is None:
        yield system.url or ""
        return
    port = free_port(host)
    cmd = system.command.format(model=model, name=name, host=host, port=port)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{system.label}.log"
    log.info("starting %s: %s (log %s)", system.label, cmd, log_path)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(shlex.split(cmd), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://{host}:{port}"
        _wait_ready(proc, base, log_path, ready_timeout_s)
        yield base
    finally:
        _stop(proc, system.label)


def _wait_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float) -> None:
    """Poll ``/health`` until 200; the process dying or the timeout is an error."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"system exited with {proc.returncode} before ready:\n{tail}")
        try:
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base}/health not ready after {timeout_s:.0f} s (see {log_path})")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen, label: str) -> None:
    """Stop the process group we started: SIGINT (clean), then SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, 60.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)  # our own child's group (start_new_session=True)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop on %s", label, signal.Signals(sig).name)
    log.info("stopped %s (exit %s)", label, proc.returncode)


def workload_slo(workload: str, args: argparse.Namespace) -> SLO:
    """--ttft-ms/--tpot-ms where given, else the workload's default targets."""
    ttft, tpot = get_workload(workload).slo_ms
    return SLO((ttft if args.ttft_ms is None else args.ttft_ms) / 1000,
               (tpot if args.tpot_ms is None else args.tpot_ms) / 1000, args.attainment)


def _spec(args: argparse.Namespace, system: System, base: str, name: str, workload: str,
          rates: list[float], caps: LengthCaps, tokenizer: str | None) -> RunSpec:
    """One system's sweep of one workload, from the sweep's arguments."""
    slo = workload_slo(workload, args)
    headers = slo_headers(slo.ttft_s * 1000, slo.tpot_s * 1000) if args.slo_headers else {}
    return RunSpec(
        load=LoadConfig(base, name, ignore_eos=not args.no_ignore_eos,
                        request_timeout_s=args.timeout, headers=headers),
        workload=workload, rates=rates, num_requests=args.num_requests, seed=args.seed,
        cv=1.0 if args.arrival == "poisson" else args.cv, caps=caps, tokenizer=tokenizer,
        slo=slo, out_dir=str(args.out), label=system.label, num_gpus=system.num_gpus,
        warmup=args.warmup, cooldown_s=args.cooldown, progress=args.progress, plots=False,
        duration_s=args.duration, max_requests=max(args.max_requests, args.num_requests),
    )


def sweep(args: argparse.Namespace) -> int:
    """The sweep described in the module docstring; returns a process exit code."""
    from splitserve.bench.cli import parse_rates
    from splitserve.bench.report import build_report, print_table

    systems = build_systems(args.system, args.endpoint, args.gpus)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        get_workload(w)
    rates = parse_rates(args)
    name = args.served_model_name or Path(args.model).name
    tokenizer = args.tokenizer
    if tokenizer is None and (Path(args.model) / "tokenizer.json").is_file():
        tokenizer = args.model
    out = Path(args.out)
    caps = LengthCaps(args.length_scale, args.max_input, args.max_output, args.max_context)
    failed = []
    for system in systems:
        try:
            with started(system, args.model, name, out / "logs",
                         ready_timeout_s=args.ready_timeout) as base:
                for w in workloads:
                    run_sweep(_spec(args, system, base, name, w, rates, caps, tokenizer))
        except RuntimeError as exc:  # a system that does not start: report it, go on
            log.error("system %s failed: %s", system.label, exc)
            failed.append(system.label)
    for w in workloads:
        files = sorted(out.glob(f"*/{w}_rate*.json"))
        if not files:
            log.error("no results for workload %s", w)
            continue
        slo = workload_slo(w, args)
        results, slo, _ = build_report(files, out / "report" / w, slo.ttft_s * 1000,
                                       slo.tpot_s * 1000, slo.attainment)
        print_table(results, slo)
    if failed:
        log.error("systems that failed: %s (logs in %s)", ", ".join(failed), out / "logs")
        return 1
    return 0


def add_length_and_slo_arguments(p: argparse.ArgumentParser, length_scale: float = 1.0,
                                  scale_help: str | None = None) -> None:
    """The options every goodput bench shares: the seed, how drawn lengths are scaled and
    capped, and the SLO (defaults per workload)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length-scale", type=float, default=length_scale, help=scale_help)
    p.add_argument("--max-input", type=int, default=None)
    p.add_argument("--max-output", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--ttft-ms", type=float, default=None, help="default: the workload's")
    p.add_argument("--tpot-ms", type=float, default=None, help="default: the workload's")


def add_request_count_arguments(p: argparse.ArgumentParser, *, num_requests: int,
                                duration: float | None, max_requests: int = 1000) -> None:
    """How many requests each rate sends (``runner.requests_at``): --num-requests, or with
    --duration the arrivals of that many seconds, at least --num-requests, at most
    --max-requests."""
    p.add_argument("--num-requests", type=int, default=num_requests,
                   help=f"requests per rate; with --duration, the least per rate (default {num_requests})")
    p.add_argument("--duration", type=float, default=duration,
                   help="seconds of arrivals per rate: rate x duration requests, at least "
                        "--num-requests, at most --max-requests (default: "
                        + ("--num-requests at every rate)" if duration is None else f"{duration:g})"))
    p.add_argument("--max-requests", type=int, default=max_requests,
                   help=f"most requests per rate with --duration (default {max_requests})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's command-line options (``splitserve bench sweep``)."""
    p.add_argument("--model", required=True, help="model folder, substituted for {model}")
    p.add_argument("--served-model-name", default=None,
                   help="model name in requests and {name} (default: the folder's name)")
    p.add_argument("--system", action="append", default=[], metavar="LABEL=COMMAND",
                   help="a system to start: command template with {model} {name} {host} {port}")
    p.add_argument("--endpoint", action="append", default=[], metavar="LABEL=URL",
                   help="an already running system to include")
    p.add_argument("--gpus", action="append", default=[], metavar="LABEL=N",
                   help="GPUs a system uses (per-GPU goodput)")
    p.add_argument("--workloads", default="chat,summarisation",
                   help="comma-separated workload names (see `splitserve bench workloads`)")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float)
    rate.add_argument("--rates", help="comma-separated rates, e.g. 1,2,4,8")
    add_request_count_arguments(p, num_requests=200, duration=None)
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    p.add_argument("--cv", type=float, default=2.0)
    p.add_argument("--tokenizer", default=None, help="default: the model folder's tokenizer")
    add_length_and_slo_arguments(p)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--slo-headers", action="store_true",
                   help="send x-slo-ttft-ms / x-slo-tpot-ms with every request")
    p.add_argument("--no-ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per system/workload")
    p.add_argument("--cooldown", type=float, default=2.0, help="pause between rates, s")
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for a system's /health")
    p.add_argument("--out", default="bench/out/goodput")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def main(argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench.goodput ...`` (same as ``splitserve bench sweep``)"""
    import sys

    from splitserve.bench.entry import standalone_main

    return standalone_main(sys.modules[__name__], sweep, argv)

if __name__ == "__main__":
    raise SystemExit(main())
