"""On one GPU: the splitserve engine versus plain HF transformers, at the same rates.

    python -m splitserve.bench.engine_vs_hf --model MODEL_DIR --device cuda:0 --out OUT
    splitserve bench engine-vs-hf --model MODEL_DIR ...            (the same)

Starts, one after the other on the same device (never both at once), (a) the engine colocated:
``splitserve up --prefill 0 --decode 1 --worker-args "--chunked-prefill"`` (one worker doing
prefill and decode in the same batches, behind the router), and (b) ``bench/hf_server.py``: HF
``generate`` behind the same HTTP code, FIFO, one request at a time (``--hf-batch N``: static
batches). Each gets the same seeded requests at each rate of ``--rates`` through the bench's own
runner (open-loop, streamed, ``ignore_eos`` so both produce the drawn number of tokens); the
engine alone then runs ``--engine-rates`` too, higher rates that find its goodput, which HF
could not reach. Results: run files in ``OUT/engine`` and ``OUT/hf``, the two-system report in
``OUT/report/<workload>/`` (attainment vs rate with both systems on one plot, TTFT/TPOT CDFs at
the common rates, report.md), ``OUT/engine_vs_hf_<workload>.json`` (this comparison: per rate
attainment and p50/p99 TTFT/TPOT of each system, both goodputs and their ratio, whether both
produced the same numbers of tokens), and the table printed.

Each rate sends ``rate x --duration`` requests (at least ``--min-requests``, at most
``--max-requests``), so slow rates do not take minutes. Once a system meets the SLO for fewer
than ``--skip-below`` of its requests at some rate, its higher rates are skipped: goodput is the
first downward crossing of the target, so they cannot change it, and an overloaded FIFO server
would only spend minutes draining its queue. A request still unanswered after ``--timeout``
seconds is a miss.

Defaults (chat workload with lengths halved, rates 0.1/0.25/0.5 for both, 2/8/32/64 for the
engine only, 15 s of arrivals per rate) aim at about 6 minutes on one H200 with a
Llama-3-8B-shaped model: HF ``generate`` at batch 1 makes ~17-35 tokens/s there
(bench/RESULTS.md measured 16.8), so a ~100-token answer holds the GPU for 3-6 s and HF
saturates near 0.2-0.3 req/s, while an engine step takes ~5-7 ms up to batch 64. Under the chat
SLO (TTFT 250 ms) an HF request meets TTFT only if it does not queue, so HF's goodput may lie
below the lowest rate; the ratio is then a lower bound ("> x"). Judge the raw run files by other
targets with ``splitserve bench report``. Run files already in OUT are reported too: use a
fresh OUT for a fresh comparison.

A Llama-3-8B shape without writing 15 GiB of weights: make the demo model, give its config.json
the 8B dimensions (``bench/engine.py``'s ``LLAMA3_8B``) but keep its vocabulary size (the
tokenizer must decode every id the model can produce, see ``check_vocab``), and pass
``--random-weights --dtype bfloat16`` (both systems then draw their own random weights: timing
only). ``--make-8b-shape`` does all of this. Tokens are random, so some are partial UTF-8 bytes whose text the router holds back until
a later token completes it, in both systems alike.

CPU smoke test with the demo model (context 1,024):

    python -m splitserve.bench.engine_vs_hf --model /tmp/demo --device cpu --out /tmp/evh \\
        --rates 0.5 --engine-rates '' --min-requests 3 --duration 4 --max-input 64 \\
        --max-output 8 --length-scale 1 --ttft-ms 5000 --tpot-ms 1000 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from splitserve.bench.goodput import (
    System,
    add_length_and_slo_arguments,
    command_template,
    started,
)
from splitserve.bench.loadgen import LoadConfig
from splitserve.bench.report import SystemResult, build_report, goodput_text
from splitserve.bench.results import clean_json, find_runs, run_path
from splitserve.bench.runner import RunSpec, requests_at, run_sweep
from splitserve.bench.stats import SLO, Goodput
from splitserve.bench.workloads import LengthCaps, get_workload
from splitserve.launcher.processes import python_command

log = logging.getLogger("splitserve.bench.engine_vs_hf")

ENGINE, HF = "engine", "hf"
SCHEMA = "splitserve.bench.engine_vs_hf/1"


@dataclass(frozen=True)
class Plan:
    """What to run, validated: rates both systems get, rates only the engine gets."""

    common_rates: list[float]
    engine_rates: list[float]
    duration_s: float
    min_requests: int
    max_requests: int

    def __post_init__(self) -> None:
        rates = self.common_rates + self.engine_rates
        if not self.common_rates:
            raise ValueError("--rates: give at least one rate both systems run")
        if any(not r > 0 for r in rates):
            raise ValueError(f"rates must be > 0, got {rates}")
        if len(set(rates)) != len(rates):
            raise ValueError(f"a rate is given twice (--rates and --engine-rates): {rates}")
        if not self.duration_s > 0:
            raise ValueError(f"--duration must be > 0, got {self.duration_s}")
        if not 1 <= self.min_requests <= self.max_requests:
            raise ValueError("need 1 <= --min-requests <= --max-requests, got "
                             f"{self.min_requests} and {self.max_requests}")

    def num_requests(self, rate: float) -> int:
        """``rate x duration`` requests, clamped to [min, max]."""
        return requests_at(rate, self.duration_s, self.min_requests, self.max_requests)

    def rates_for(self, label: str) -> list[float]:
        """Sorted rates one system runs."""
        extra = self.engine_rates if label == ENGINE else []
        return sorted(self.common_rates + extra)


def parse_rate_list(text: str, flag: str) -> list[float]:
    """Comma-separated rates ('' = none); a bad item is an error naming the flag."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"{flag}: not a comma-separated list of numbers: {text!r}") from exc


def engine_command(args: argparse.Namespace, name: str) -> str:
    """``splitserve up`` colocated: zero prefill workers, one decode worker that prefills
    too, with chunked prefill (the engine's colocated mode)."""
    worker = ["--chunked-prefill", *shlex.split(args.engine_args)]
    if args.dtype:
        worker += ["--dtype", args.dtype]
    if args.random_weights:
        worker.append("--random-weights")
    parts = [*python_command("-m"), "splitserve.cli", "up", "--model", args.model,
             "--served-model-name", name, "--prefill", "0", "--decode", "1",
             f"--worker-args={shlex.join(worker)}"]  # '=': the value starts with '--'
    if args.device:
        parts += ["--devices", args.device]
    return command_template(parts)


def hf_command(args: argparse.Namespace, name: str) -> str:
    """The HF transformers server on the same model folder and device."""
    parts = [*python_command("-m"), "splitserve.bench.hf_server", "--model", args.model,
             "--served-model-name", name, "--batch", str(args.hf_batch),
             *shlex.split(args.hf_args)]
    if args.device:
        parts += ["--device", args.device]
    if args.dtype:
        parts += ["--dtype", args.dtype]
    if args.random_weights:
        parts.append("--random-weights")
    return command_template(parts)


def _slo(args: argparse.Namespace) -> SLO:
    ttft, tpot = get_workload(args.workload).slo_ms
    return SLO((ttft if args.ttft_ms is None else args.ttft_ms) / 1000,
               (tpot if args.tpot_ms is None else args.tpot_ms) / 1000, args.attainment)


def run_system(args: argparse.Namespace, plan: Plan, system: System, name: str,
               tokenizer: str | None) -> dict[str, Any]:
    """Start one system, run its rates in order (skipping the rest once it falls below
    ``--skip-below``), stop it. Returns {"rates": run, "skipped": [...]}."""
    slo = _slo(args)
    caps = LengthCaps(args.length_scale, args.max_input, args.max_output, args.max_context)
    rates = plan.rates_for(system.label)
    done: list[float] = []
    with started(system, args.model, name, Path(args.out) / "logs",
                 ready_timeout_s=args.ready_timeout) as base:
        for i, rate in enumerate(rates):
            if i and args.cooldown:
                time.sleep(args.cooldown)
            spec = RunSpec(
                load=LoadConfig(base, name, request_timeout_s=args.timeout),
                workload=args.workload, rates=[rate], num_requests=plan.num_requests(rate),
                seed=args.seed, caps=caps, tokenizer=tokenizer, slo=slo, out_dir=args.out,
                label=system.label, num_gpus=1, warmup=args.warmup if i == 0 else 0,
                progress=args.progress, plots=False,
            )
            run_sweep(spec)
            done.append(rate)
            both = _attainment(args.out, system.label, args.workload, rate)
            if both < args.skip_below and i + 1 < len(rates):
                log.warning("%s met the SLO for %.0f%% of requests at %g req/s (< %.0f%%): "
                            "skipping its rates %s", system.label, both * 100, rate,
                            args.skip_below * 100, rates[i + 1:])
                break
    return {"rates": done, "skipped": rates[len(done):]}


def _attainment(out: str, label: str, workload: str, rate: float) -> float:
    data = json.loads(run_path(out, label, workload, rate).read_text())
    return float(data["summary"]["attainment"]["both"])


def goodput_ratio(engine: Goodput, hf: Goodput, engine_min_rate: float,
                  hf_min_rate: float) -> dict[str, Any]:
    """engine goodput / HF goodput, with what kind of number it is.

    A goodput is exact when its sweep crossed the target ("interpolated"), a lower bound when
    every rate met it ("above_range": the highest rate), and below the lowest rate when that one
    already missed ("below_range"). ``bound`` says what the ratio is: "exact", "lower" (the
    true ratio is at least this), "upper" (at most this) or "unknown" (no finite bound).
    """
    e_lo = engine.rate if engine.status != "below_range" else 0.0
    e_hi = None if engine.status == "above_range" else (
        engine.rate if engine.status == "interpolated" else engine_min_rate)
    h_lo = hf.rate if hf.status != "below_range" else 0.0
    h_hi = None if hf.status == "above_range" else (
        hf.rate if hf.status == "interpolated" else hf_min_rate)
    if engine.status == hf.status == "interpolated":
        return {"value": engine.rate / hf.rate, "bound": "exact"}
    if e_lo > 0 and h_hi is not None:
        return {"value": e_lo / h_hi, "bound": "lower"}
    if e_hi is not None and h_lo > 0:
        return {"value": e_hi / h_lo, "bound": "upper"}
    return {"value": None, "bound": "unknown"}


def ratio_text(ratio: dict[str, Any]) -> str:
    """'12.3x', '> 12.3x', '< 12.3x' or '?'."""
    if ratio["value"] is None or ratio["bound"] == "unknown":
        return "?"
    prefix = {"exact": "", "lower": "> ", "upper": "< "}[ratio["bound"]]
    return f"{prefix}{ratio['value']:.1f}x"


def _cell(summary: dict[str, Any] | None, key: str) -> float | None:
    if summary is None:
        return None
    metric, q = key.split(".")
    value = summary[metric][q]
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def comparison_rows(results: dict[str, SystemResult]) -> list[dict[str, Any]]:
    """One row per rate any system ran: per system attainment, p50/p99 TTFT/TPOT (ms), output
    tokens/s, errors (None where a system did not run that rate)."""
    rates = sorted({r for res in results.values() for r in res.rates})
    rows = []
    for rate in rates:
        row: dict[str, Any] = {"rate": rate}
        for label, res in results.items():
            s = res.summaries[res.rates.index(rate)] if rate in res.rates else None
            row[label] = None if s is None else {
                "num_requests": s["num_requests"],
                "attainment": s["attainment"]["both"],
                "ttft_p50_ms": _cell(s, "ttft_ms.p50"), "ttft_p99_ms": _cell(s, "ttft_ms.p99"),
                "tpot_p50_ms": _cell(s, "tpot_ms.p50"), "tpot_p99_ms": _cell(s, "tpot_ms.p99"),
                "output_tokens_per_s": s["output_token_throughput"],
                "errors": s["num_errors"], "short_outputs": s["short_outputs"],
            }
        rows.append(row)
    return rows


def tokens_match(results: dict[str, SystemResult]) -> dict[str, bool]:
    """Per common rate: did both systems return the same number of tokens for every request
    (same seeded requests, ``ignore_eos``)? If not, the latencies compare different work."""
    out = {}
    eng, hf = results.get(ENGINE), results.get(HF)
    if eng is None or hf is None:
        return out
    for rate in sorted(set(eng.rates) & set(hf.rates)):
        a = eng.runs[eng.rates.index(rate)].records
        b = hf.runs[hf.rates.index(rate)].records
        out[f"{rate:g}"] = [r.output_tokens for r in a] == [r.output_tokens for r in b]
    return out


def print_comparison(rows: list[dict[str, Any]], results: dict[str, SystemResult],
                     ratio: dict[str, Any], slo: SLO) -> None:
    """The rate-by-rate table and the goodput line (rich)."""
    from rich.console import Console
    from rich.table import Table

    def fmt(x: float | None, digits: int = 1) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    labels = list(results)
    table = Table(title=f"engine vs HF transformers, SLO TTFT {slo.ttft_s * 1000:g} ms / TPOT "
                        f"{slo.tpot_s * 1000:g} ms; latencies in ms ('-': not run)")
    table.add_column("rate", justify="right")
    for label in labels:
        for col in ("attain%", "TTFT p50", "p99", "TPOT p50", "p99", "tok/s"):
            table.add_column(f"{label} {col}" if col == "attain%" else col, justify="right")
    for row in rows:
        cells = [f"{row['rate']:g}"]
        for label in labels:
            c = row.get(label)
            if c is None:
                cells += ["-"] * 6
                continue
            cells += [fmt(c["attainment"] * 100), fmt(c["ttft_p50_ms"]), fmt(c["ttft_p99_ms"]),
                      fmt(c["tpot_p50_ms"]), fmt(c["tpot_p99_ms"]),
                      fmt(c["output_tokens_per_s"], 0)]
        table.add_row(*cells)
    console = Console()
    console.width = max(console.width, 140)
    console.print(table)
    goodputs = ", ".join(f"{label} {goodput_text(res.goodput)}" for label, res in results.items())
    console.print(f"goodput (req/s at >= {slo.attainment * 100:g}% attainment): {goodputs}; "
                  f"engine / HF: {ratio_text(ratio)}", highlight=False)


def compare(args: argparse.Namespace, plan: Plan, commands: dict[str, str],
            skipped: dict[str, list[float]]) -> tuple[Path, dict[str, Any]]:
    """Report over both systems' run files of this workload; write the comparison JSON."""
    slo = _slo(args)
    out = Path(args.out)
    files = [r.path for label in (ENGINE, HF) if (out / label).is_dir()
             for r in find_runs([out / label]) if r.workload == args.workload]
    report_dir = out / "report" / args.workload
    evaluated, _, written = build_report(files, report_dir, slo.ttft_s * 1000, slo.tpot_s * 1000,
                                         slo.attainment, plots=args.plots)
    results = {r.label: r for r in evaluated if r.label in (ENGINE, HF)}
    ratio = {"value": None, "bound": "unknown"}
    if ENGINE in results and HF in results:
        ratio = goodput_ratio(results[ENGINE].goodput, results[HF].goodput,
                              min(results[ENGINE].rates), min(results[HF].rates))
    rows = comparison_rows(results)
    doc = {
        "schema": SCHEMA,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "model": args.model, "device": args.device, "dtype": args.dtype,
        "random_weights": args.random_weights, "hf_batch": args.hf_batch,
        "workload": args.workload, "seed": args.seed,
        "caps": {"scale": args.length_scale, "max_input": args.max_input,
                 "max_output": args.max_output, "max_context": args.max_context},
        "slo": {"ttft_ms": slo.ttft_s * 1000, "tpot_ms": slo.tpot_s * 1000,
                "attainment": slo.attainment},
        "plan": {"common_rates": plan.common_rates, "engine_rates": plan.engine_rates,
                 "duration_s": plan.duration_s, "min_requests": plan.min_requests,
                 "max_requests": plan.max_requests, "skip_below": args.skip_below},
        "systems": {
            label: {"command": commands.get(label), "skipped_rates": skipped.get(label, []),
                    "goodput": {"rate": res.goodput.rate, "status": res.goodput.status,
                                "text": goodput_text(res.goodput)},
                    "rates": res.rates}
            for label, res in results.items()
        },
        "goodput_ratio": {**ratio, "text": ratio_text(ratio)},
        "output_tokens_match": tokens_match(results),
        "rows": rows,
        "report_dir": str(report_dir),
        "files": [str(p) for p in written],
    }
    path = out / f"engine_vs_hf_{args.workload}.json"
    path.write_text(json.dumps(clean_json(doc), indent=1))
    print_comparison(rows, results, ratio, slo)
    mismatched = [r for r, ok in doc["output_tokens_match"].items() if not ok]
    if mismatched:
        log.warning("output token counts differ between the systems at rates %s", mismatched)
    return path, doc


def make_8b_shape(model_dir: str) -> Path:
    """The demo model (tokenizer, chat template) with ``bench/engine.py``'s Llama-3-8B config
    but the demo's vocabulary size, and no weights file: both systems then run with
    ``--random-weights`` (nothing to write or read: 15 GiB saved twice)."""
    from splitserve.bench.engine import LLAMA3_8B
    from splitserve.engine.demo_model import init_demo_model

    out = init_demo_model(model_dir)
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    vocab = cfg["vocab_size"]
    cfg.update(LLAMA3_8B, vocab_size=vocab, pad_token_id=cfg.get("pad_token_id"))
    cfg.pop("splitserve_demo", None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "model.safetensors").unlink()
    return out


def check_vocab(model_dir: str) -> None:
    """Refuse a model whose vocabulary is much larger than its tokenizer's (e.g. a random-weight
    config with Llama-3's 128,256 rows over the demo's ~700-token tokenizer): ids the tokenizer
    cannot decode stream as empty text (the router still sends one SSE event per step, so the
    timings hold, but the outputs say nothing and the tokenizer-based prompt lengths no longer
    match the model). Padding rows (a few percent) are fine."""
    from splitserve.router.tokenizer import RouterTokenizer

    path = Path(model_dir) / "config.json"
    vocab = json.loads(path.read_text()).get("vocab_size")
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json (the router needs it)")
    known = RouterTokenizer(model_dir).vocab_size
    if isinstance(vocab, int) and vocab > 1.1 * known:
        raise ValueError(f"{path}: vocab_size {vocab} but tokenizer.json has {known} tokens: "
                         "most generated ids would decode to nothing, so streamed timings "
                         "would be wrong; keep the tokenizer's vocabulary size")


def run(args: argparse.Namespace) -> int:
    """The comparison described in the module docstring; returns a process exit code."""
    plan = Plan(parse_rate_list(args.rates, "--rates"),
                parse_rate_list(args.engine_rates, "--engine-rates"),
                args.duration, args.min_requests, args.max_requests)
    get_workload(args.workload)
    if not 0 <= args.skip_below <= 1:
        raise ValueError(f"--skip-below must be in [0, 1], got {args.skip_below}")
    if args.make_8b_shape:
        make_8b_shape(args.model)
        args.random_weights, args.dtype = True, args.dtype or "bfloat16"
        log.info("wrote a Llama-3-8B-shaped config (demo vocabulary) to %s", args.model)
    check_vocab(args.model)
    name = args.served_model_name or Path(args.model).name
    tokenizer = args.model
    commands = {ENGINE: engine_command(args, name), HF: hf_command(args, name)}
    order = [HF, ENGINE] if args.hf_first else [ENGINE, HF]
    skipped: dict[str, list[float]] = {}
    failed = []
    for label in order:
        if label in args.skip_system:
            continue
        try:
            skipped[label] = run_system(args, plan, System(label, command=commands[label],
                                                           num_gpus=1), name, tokenizer)["skipped"]
        except RuntimeError as exc:  # did not start: report it, run the other one
            log.error("%s failed: %s", label, exc)
            failed.append(label)
    path, _ = compare(args, plan, commands, skipped)
    log.info("wrote %s and the report in %s", path, Path(args.out) / "report" / args.workload)
    if failed:
        log.error("systems that failed: %s (logs in %s)", ", ".join(failed),
                  Path(args.out) / "logs")
        return 1
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The comparison's options (``splitserve bench engine-vs-hf``)."""
    p.add_argument("--model", required=True, help="model folder both systems load")
    p.add_argument("--served-model-name", default=None, help="default: the folder's name")
    p.add_argument("--device", default=None,
                   help="one device for both, e.g. cuda:0 or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: the checkpoint's")
    p.add_argument("--random-weights", action="store_true",
                   help="both systems use random weights of config.json's shape (timing only)")
    p.add_argument("--make-8b-shape", action="store_true",
                   help="first write a Llama-3-8B-shaped config (demo tokenizer and vocabulary, "
                        "no weights) to --model; implies --random-weights, bf16 by default")
    p.add_argument("--engine-args", default="",
                   help="extra worker arguments for the engine (--chunked-prefill is always on)")
    p.add_argument("--hf-args", default="", help="extra arguments for bench/hf_server.py")
    p.add_argument("--hf-batch", type=int, default=1,
                   help="HF static batch size (1: one request at a time, the plain baseline)")
    p.add_argument("--workload", default="chat", help="see `splitserve bench workloads`")
    p.add_argument("--rates", default="0.1,0.25,0.5", help="rates both systems run, req/s")
    p.add_argument("--engine-rates", default="2,8,32,64",
                   help="rates only the engine runs (to find its goodput); '' for none")
    p.add_argument("--duration", type=float, default=15.0,
                   help="seconds of arrivals per rate (requests = rate x duration, clamped)")
    p.add_argument("--min-requests", type=int, default=5)
    p.add_argument("--max-requests", type=int, default=1000)
    p.add_argument("--skip-below", type=float, default=0.3,
                   help="skip a system's higher rates once its attainment falls below this")
    add_length_and_slo_arguments(p, 0.5, "multiply drawn lengths (default 0.5 keeps HF's runs short)")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="per-request timeout, s (a timed-out request is a miss)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per system")
    p.add_argument("--cooldown", type=float, default=1.0, help="pause between rates, s")
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for a system's /health")
    p.add_argument("--hf-first", action="store_true", help="run HF before the engine")
    p.add_argument("--skip-system", action="append", default=[], choices=[ENGINE, HF],
                   help="do not run this system (its earlier run files in OUT are reported)")
    p.add_argument("--out", default="bench/out/engine_vs_hf")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``splitserve bench engine-vs-hf``: bad options exit with a message."""
    try:
        return run(args)
    except ValueError as exc:
        raise SystemExit(f"engine-vs-hf: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench.engine_vs_hf ...``"""

    from splitserve.bench.entry import standalone_main

    return standalone_main(sys.modules[__name__], run_from_args, argv)

if __name__ == "__main__":
    raise SystemExit(main())
