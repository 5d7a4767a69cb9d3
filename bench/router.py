"""What the router costs: routing-decision throughput, and the latency it adds to a request and
the request rate it sustains with many concurrent streams against stub workers that answer
instantly (router/stub_worker.py), so that every millisecond measured is the router's (or the
client's) own.

Two measurements in one run, against a reference measured in the same run:

1. decisions: ``policy.pick`` for every policy on recorded load (4 prefill, 8 decode workers):
   decisions/s and p50/p99 per decision.
2. serving: ``--concurrency`` closed-loop clients (split over ``--clients`` processes) stream
   completions for ``--duration`` s, (a) directly against the stub workers, doing exactly the
   worker calls the router makes (decode /generate stream + prefill /prefill), and (b) through the
   router. Added latency = router minus direct, at p50 and p99, of time to first token and of
   end-to-end time. Everything (router, stubs, clients) shares this machine's cores.

    python -m splitserve.bench.router --concurrency 1000 --duration 15 [--policy goodput]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from splitserve.launcher.processes import wait_http_ok
from splitserve.launcher.up import free_port


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------- 1. decisions


def bench_decisions(n: int) -> list[dict[str, Any]]:
    from splitserve.router.config import SLO
    from splitserve.router.policy import LatencyModel, RouteRequest, build_policy
    from splitserve.router.workers import WorkerLoad, WorkerState

    rng = random.Random(0)

    def worker(i: int, role: str) -> WorkerState:
        w = WorkerState(url=f"http://{role}-{i}:8000", role=role, healthy=True, kv_endpoint=f"{role}-{i}:9000")
        w.set_load(WorkerLoad(waiting=rng.randint(0, 4), running=rng.randint(0, 40),
                              queued_prompt_tokens=rng.randint(0, 4000), free_blocks=rng.randint(100, 1000),
                              total_blocks=1000, block_size=16, max_model_len=8192))
        return w

    prefills = [worker(i, "prefill") for i in range(4)]
    decodes = [worker(i, "decode") for i in range(8)]
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(16, 1024))] for _ in range(64)]
    rows = []
    for name in ("round_robin", "least_loaded", "prefix_aware", "goodput"):
        policy = build_policy(name, LatencyModel())
        times = []
        for i in range(n):
            req = RouteRequest(prompts[i % len(prompts)], 128, SLO(ttft_ms=5000, tpot_ms=200))
            t0 = time.perf_counter()
            d = policy.pick(req, prefills, decodes)
            policy.on_routed(req, d)
            times.append(time.perf_counter() - t0)
            for w in prefills + decodes:  # a poll every 100 decisions resets the local counts
                if i % 100 == 0:
                    w.set_load(w.load)
        rows.append({"policy": name, "decisions_per_s": n / sum(times),
                     "p50_us": _pct(times, 0.5) * 1e6, "p99_us": _pct(times, 0.99) * 1e6})
    return rows


# ---------------------------------------------------------------- 2. serving


async def _client_loop(mode: str, target: dict[str, str], streams: int, duration: float, max_tokens: int) -> dict:
    import aiohttp

    ttft: list[float] = []
    e2e: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def via_router(i: int) -> tuple[float, float]:
            body = {"model": "demo", "prompt": "hello world", "max_tokens": max_tokens, "stream": True}
            t0 = time.perf_counter()
            first = None
            async with session.post(target["router"] + "/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                async for line in resp.content:
                    if line.startswith(b"data: {") and first is None:
                        first = time.perf_counter()
                    if line.startswith(b"data: [DONE]"):
                        break
            return first - t0, time.perf_counter() - t0

        async def direct(i: int) -> tuple[float, float]:
            rid = f"{os.getpid()}-{i}-{time.perf_counter_ns()}"
            sampling = {"max_tokens": max_tokens, "temperature": 0.0}
            body = {"request_id": rid, "token_ids": [1, 2, 3], "sampling": sampling, "recompute": False}
            t0 = time.perf_counter()
            first = None
            async with session.post(target["decode"] + "/generate", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                pre = asyncio.ensure_future(session.post(target["prefill"] + "/prefill", json={
                    "request_id": rid, "token_ids": [1, 2, 3], "sampling": sampling,
                    "decode_kv_endpoint": target["kv_endpoint"]}))
                async for line in resp.content:
                    if first is None:
                        first = time.perf_counter()
                    if b'"finish_reason": null' not in line and b'"finish_reason":null' not in line:
                        break
                (await pre).release()
            return first - t0, time.perf_counter() - t0

        call = via_router if mode == "router" else direct

        async def loop(k: int) -> None:
            nonlocal errors
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                try:
                    a, b = await call(k * 1_000_000 + i)
                    ttft.append(a)
                    e2e.append(b)
                except (aiohttp.ClientError, RuntimeError, asyncio.TimeoutError):
                    errors += 1

        await asyncio.gather(*(loop(k) for k in range(streams)))
    return {"ttft": ttft, "e2e": e2e, "errors": errors}


def _client_process(args: tuple) -> dict:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_client_loop(*args))


def run_load(mode: str, target: dict[str, str], concurrency: int, clients: int, duration: float, max_tokens: int) -> dict:
    per = [concurrency // clients + (1 if i < concurrency % clients else 0) for i in range(clients)]
    t0 = time.monotonic()
    with mp.get_context("spawn").Pool(clients) as pool:
        parts = pool.map(_client_process, [(mode, target, n, duration, max_tokens) for n in per])
    wall = time.monotonic() - t0
    ttft = [x for p in parts for x in p["ttft"]]
    e2e = [x for p in parts for x in p["e2e"]]
    return {"mode": mode, "requests": len(e2e), "errors": sum(p["errors"] for p in parts),
            "rps": len(e2e) / duration, "wall_s": wall,
            "ttft_p50_ms": _pct(ttft, 0.5) * 1e3, "ttft_p99_ms": _pct(ttft, 0.99) * 1e3,
            "e2e_p50_ms": _pct(e2e, 0.5) * 1e3, "e2e_p99_ms": _pct(e2e, 0.99) * 1e3}




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder for the router's tokenizer (default: a fresh demo model)")
    ap.add_argument("--policy", default="round_robin", help="router policy (default round_robin)")
    ap.add_argument("--concurrency", default="1,100,1000", help="concurrent streams, comma-separated levels (default 1,100,1000)")
    ap.add_argument("--clients", type=int, default=2, help="client processes sharing the streams (default 2)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per measurement (default 15)")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens per request (default 4)")
    ap.add_argument("--decisions", type=int, default=20000, help="policy.pick calls per policy (default 20000)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    results: dict[str, Any] = {"cores": os.cpu_count(), "args": vars(args)}
    results["decisions"] = bench_decisions(args.decisions)
    for row in results["decisions"]:
        print(f"decision {row['policy']:>13}: {row['decisions_per_s']:>9.0f}/s  p50 {row['p50_us']:.1f} us  p99 {row['p99_us']:.1f} us", flush=True)

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from splitserve.engine.demo_model import init_demo_model

        model = str(init_demo_model(Path(tmp.name) / "demo"))
    ports = {name: free_port() for name in ("prefill", "decode", "router")}
    procs = []
    try:
        for role in ("prefill", "decode"):
            procs.append(subprocess.Popen([sys.executable, "-m", "splitserve.router.stub_worker", "--role", role,
                                           "--port", str(ports[role]), "--tokens", "10", "11", "12", "13"]))
        procs.append(subprocess.Popen([sys.executable, "-m", "splitserve.cli", "--log-level", "WARNING", "router",
                                       "--model", model, "--port", str(ports["router"]), "--policy", args.policy,
                                       "--prefill", f"http://127.0.0.1:{ports['prefill']}",
                                       "--decode", f"http://127.0.0.1:{ports['decode']}"], stdout=subprocess.DEVNULL))
        target = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
        target["kv_endpoint"] = f"127.0.0.1:{ports['decode']}"
        for role in ("prefill", "decode", "router"):
            wait_http_ok(target[role] + "/health", timeout=60)
        run_load("router", target, 50, 1, 2.0, args.max_tokens)  # warm-up
        results["serving"] = []
        for conc in (int(c) for c in args.concurrency.split(",")):
            pair = []
            for mode in ("direct", "router"):
                row = run_load(mode, target, conc, min(args.clients, conc), args.duration, args.max_tokens)
                row["concurrency"] = conc
                pair.append(row)
                print(f"c={conc:>5} {mode:>6}: {row['rps']:.0f} req/s ({row['requests']} ok, {row['errors']} errors)  "
                      f"TTFT p50 {row['ttft_p50_ms']:.1f} ms p99 {row['ttft_p99_ms']:.1f} ms  "
                      f"e2e p50 {row['e2e_p50_ms']:.1f} ms p99 {row['e2e_p99_ms']:.1f} ms", flush=True)
            added = {k: pair[1][k] - pair[0][k] for k in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")}
            print(f"c={conc:>5} router adds: " + ", ".join(f"{k} {v:+.1f}" for k, v in added.items()), flush=True)
            results["serving"].append({"concurrency": conc, "direct": pair[0], "router": pair[1], "added_ms": added})
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        tmp.cleanup()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
