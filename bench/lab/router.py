"""What the router costs: routing-decision throughput, and the latency it adds to a request, the
request rate it sustains and the CPU time it spends per request with many concurrent streams
against stub workers that answer instantly (testing/stub_worker.py), so that every millisecond
measured is the router's (or the client's) own.

Two measurements in one run:

1. decisions: ``policy.pick`` for every policy on recorded load (4 prefill, 8 decode workers):
   decisions/s and p50/p99 per decision.
2. serving: ``--concurrency`` closed-loop streams (split over ``--clients`` processes) stream
   completions for ``--duration`` s, (a) directly against the stub workers, doing exactly the
   worker calls the router makes (decode /generate stream + prefill /prefill), and (b) through the
   router. Added latency = router minus direct, at p50 and p99, of time to first token and of
   end-to-end time. The router's CPU time (all its processes, from /proc) over the requests it
   served gives its CPU microseconds per request, a number that does not depend on how many cores
   the clients and stubs left it.

Fair measurement: ``--router-cpus 0,1`` pins the router (``--router-workers`` processes, default
one per pinned core) to those cores and the stubs, clients and this process to the others
(``--load-cpus`` to choose them), so the router gets exactly those cores and nothing else runs on
them. Without it everything shares every core, and on a small machine the clients and stubs cap
the rate long before the router does.

Closed loop (the default) measures the most requests/s; its latencies are then mostly queueing
(1,000 streams over N req/s wait ~1000/N s). The latency the router adds is measured paced:
``--rate 2000`` offers 2,000 req/s spread over the streams, and as long as the router keeps up
the latencies are service times, router minus direct.

Here (a loaded 2-core machine):

    python -m splitserve.bench.lab.router --concurrency 1000 --duration 15 [--policy goodput]

On a 16-core machine that has python3.12 (and maybe torch) but none of the router's libraries:
build the wheelhouse where there is network (``bash scripts/wheelhouse.sh``: folder
``.wheelhouse``, gitignored, for ``--python-version 3.12`` by default), carry it over, then in the
repository root:

    python3 -m venv --system-site-packages /tmp/rv && . /tmp/rv/bin/activate
    pip install --no-index --find-links .wheelhouse -r .wheelhouse/requirements.txt
    pip install --no-index --find-links .wheelhouse --no-deps -e .
    python3 -m splitserve.bench.lab.router --router-cpus first:2 --concurrency 1,100,1000 \
        --duration 15 --out /tmp/router_closed.json
    python3 -m splitserve.bench.lab.router --router-cpus first:2 --concurrency 1000 --rate 2000 \
        --duration 15 --decisions 0 --out /tmp/router_paced.json

(``--system-site-packages`` keeps the machine's torch and numpy visible: the bench makes its demo
model with torch; without torch pass ``--model DIR``, any model folder, the router only reads its
tokenizer and config. ``--router-cpus 0,1`` names cores explicitly. Without ``venv``: ``pip
install --no-index --find-links .wheelhouse --target /tmp/rl -r .wheelhouse/requirements.txt``,
``mkdir -p /tmp/ss && ln -sfn "$PWD" /tmp/ss/splitserve`` and ``PYTHONPATH=/tmp/ss:/tmp/rl``.)
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitserve.launcher.processes import python_command, wait_http_ok
from splitserve.launcher.up import free_port
from splitserve.protocol import GenerateRequest, PrefillRequest, SamplingParams


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def parse_cpus(spec: str) -> set[int]:
    """``"0,1"`` or ``"0-3,8"`` -> a set of CPU ids (ValueError on anything else)."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError as exc:
            raise ValueError(f"bad CPU list {spec!r}: use e.g. 0,1 or 0-3,8") from exc
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r} in {spec!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {spec!r}")
    return cpus


def plan_cpus(router_spec: str | None, load_spec: str | None) -> tuple[set[int] | None, set[int] | None]:
    """(router cores, load cores): both None when nothing is pinned. ``router_spec`` is a CPU
    list or ``first:N`` (the first N cores allowed to this process, for containers whose cores
    are not numbered from 0). The load (stubs, clients,
    this process) gets every allowed core the router does not, unless told otherwise; an overlap
    or a core this process may not use is an error, not a silently unfair run."""
    if router_spec is None:
        if load_spec is not None:
            raise ValueError("--load-cpus needs --router-cpus")
        return None, None
    allowed = os.sched_getaffinity(0)
    if router_spec.startswith("first:"):  # the first N cores this process may use, whatever their ids
        n = int(router_spec.removeprefix("first:"))
        if not 0 < n < len(allowed):
            raise ValueError(f"--router-cpus first:N needs 0 < N < {len(allowed)} (cores allowed here)")
        router = set(sorted(allowed)[:n])
    else:
        router = parse_cpus(router_spec)
    load = parse_cpus(load_spec) if load_spec else allowed - router
    for name, cpus in (("--router-cpus", router), ("--load-cpus", load)):
        if not cpus <= allowed:
            raise ValueError(f"{name} {sorted(cpus - allowed)} not available (allowed: {sorted(allowed)})")
    if router & load:
        raise ValueError(f"router and load CPUs overlap: {sorted(router & load)}")
    if not load:
        raise ValueError("no CPU left for the stubs and clients; give the router fewer")
    return router, load


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    """A Popen preexec_fn that pins the child (and so everything it forks) to ``cpus``."""
    if cpus is None:
        return None
    frozen = set(cpus)
    return lambda: os.sched_setaffinity(0, frozen)


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    """Child pids: /proc/PID/task/*/children where the kernel has it, else a scan of /proc."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        pass
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (from /proc; Linux only).
    The router's worker processes live as long as the run, so nothing they spent is missed."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = _stat(p)
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        todo += _children(p)
    return total


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


async def _client_loop(mode: str, target: dict[str, Any], streams: int, first_stream: int,
                       duration: float, max_tokens: int, interval: float = 0.0) -> dict:
    """``streams`` streams, each sending its next request when the last one ended (closed loop)
    or, with ``interval`` > 0, at its next slot ``interval`` s after the previous one (paced:
    the latencies are then the service's, not the queue's, as long as it keeps up)."""
    import aiohttp

    ttft: list[float] = []
    e2e: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + duration
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def via_router(k: int, i: int) -> tuple[float, float]:
            body = {"model": "demo", "prompt": "hello world", "max_tokens": max_tokens, "stream": True}
            t0 = time.perf_counter()
            first = None
            async with session.post(target["router"] + "/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                done = False
                async for line in resp.content:  # to the end, so the connection is reused
                    if line.startswith(b"data: {") and first is None:
                        first = time.perf_counter()
                    done = done or line.startswith(b"data: [DONE]")
            if first is None or not done:
                raise RuntimeError("stream ended without a chunk and [DONE]")
            return first - t0, time.perf_counter() - t0

        async def direct(k: int, i: int) -> tuple[float, float]:
            pair = target["pairs"][k % len(target["pairs"])]  # stream k sticks to one stub pair
            rid = f"{os.getpid()}-{k}-{i}-{time.perf_counter_ns()}"
            sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            body = GenerateRequest(rid, [1, 2, 3], sampling).to_json()
            t0 = time.perf_counter()
            first = None
            async with session.post(pair["decode"] + "/generate", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                prefill = PrefillRequest(rid, [1, 2, 3], sampling, pair["kv_endpoint"])
                pre = asyncio.ensure_future(session.post(pair["prefill"] + "/prefill", json=prefill.to_json()))
                async for _line in resp.content:  # to the end, so the connection is reused
                    if first is None:
                        first = time.perf_counter()
                async with await pre as presp:
                    await presp.read()
            if first is None:
                raise RuntimeError("empty stream")
            return first - t0, time.perf_counter() - t0

        call = via_router if mode == "router" else direct

        async def loop(k: int) -> None:
            i = 0
            slot = time.monotonic() + random.random() * interval  # streams out of phase
            while time.monotonic() < stop_at:
                if interval:
                    now = time.monotonic()
                    if slot > now:
                        await asyncio.sleep(slot - now)
                    slot = max(slot + interval, time.monotonic())  # behind: no catch-up burst
                    if slot - interval >= stop_at:
                        break
                i += 1
                try:
                    a, b = await call(k, i)
                    ttft.append(a)
                    e2e.append(b)
                except (TimeoutError, aiohttp.ClientError, RuntimeError) as exc:
                    key = f"{type(exc).__name__}: {exc}"[:120]
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(loop(first_stream + k) for k in range(streams)))
    return {"ttft": ttft, "e2e": e2e, "errors": errors}


def _client_init(cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _client_process(args: tuple) -> dict:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_client_loop(*args))


def run_load(mode: str, target: dict[str, Any], concurrency: int, clients: int, duration: float,
             max_tokens: int, load_cpus: set[int] | None = None, router_pid: int | None = None,
             rate: float = 0.0) -> dict:
    """One measurement (closed loop, or paced at ``rate`` requests/s in all); with
    ``router_pid``, also the router's CPU time over it."""
    interval = concurrency / rate if rate > 0 else 0.0
    per = [concurrency // clients + (1 if i < concurrency % clients else 0) for i in range(clients)]
    starts = [sum(per[:i]) for i in range(clients)]
    with mp.get_context("spawn").Pool(clients, initializer=_client_init, initargs=(load_cpus,)) as pool:
        pool.map(abs, range(clients))  # the workers are up (imports done) before the clock starts
        cpu0 = process_tree_cpu_s(router_pid) if router_pid else 0.0
        t0 = time.monotonic()
        parts = pool.map(_client_process, [(mode, target, n, s, duration, max_tokens, interval)
                                           for n, s in zip(per, starts, strict=True)])
        wall = time.monotonic() - t0
        cpu = process_tree_cpu_s(router_pid) - cpu0 if router_pid else None
    ttft = [x for p in parts for x in p["ttft"]]
    e2e = [x for p in parts for x in p["e2e"]]
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    row = {"mode": mode, "concurrency": concurrency, "offered_rps": rate or None, "requests": len(e2e),
           "errors": sum(errors.values()), "error_kinds": errors,
           "rps": len(e2e) / duration, "wall_s": wall,  # requests started within `duration`
           "ttft_p50_ms": _pct(ttft, 0.5) * 1e3, "ttft_p99_ms": _pct(ttft, 0.99) * 1e3,
           "e2e_p50_ms": _pct(e2e, 0.5) * 1e3, "e2e_p99_ms": _pct(e2e, 0.99) * 1e3}
    if cpu is not None:
        row["router_cpu_s"] = cpu
        row["router_cpu_us_per_request"] = cpu / max(1, len(e2e)) * 1e6
        row["router_cores_busy"] = cpu / wall
    return row


def _print_row(row: dict[str, Any]) -> None:
    extra = ""
    if "router_cpu_us_per_request" in row:
        extra = (f"  router CPU {row['router_cpu_us_per_request']:.0f} us/req "
                 f"({row['router_cores_busy']:.2f} cores busy)")
    offered = f" of {row['offered_rps']:.0f} offered" if row.get("offered_rps") else ""
    print(f"c={row['concurrency']:>5} {row['mode']:>6}: {row['rps']:.0f} req/s{offered} "
          f"({row['requests']} ok, {row['errors']} errors)  "
          f"TTFT p50 {row['ttft_p50_ms']:.1f} ms p99 {row['ttft_p99_ms']:.1f} ms  "
          f"e2e p50 {row['e2e_p50_ms']:.1f} ms p99 {row['e2e_p99_ms']:.1f} ms{extra}", flush=True)
    for kind, n in row["error_kinds"].items():
        print(f"        {n} x {kind}", flush=True)


def _demo_model(folder: Path) -> str:
    try:
        from splitserve.engine.demo_model import init_demo_model

        return str(init_demo_model(folder))
    except ImportError as exc:
        raise SystemExit(f"making the demo model needs torch ({exc}); pass --model DIR "
                         "(any model folder: the router only reads its tokenizer and config)") from exc


def _default_counts(load_cpus: set[int] | None) -> tuple[int, int]:
    """(stub pairs, client processes) that keep the load side from being the bottleneck: about
    one core per stub process (the stubs are FastAPI apps, the decode stub answers two requests
    per routed one) and the rest for clients."""
    n = len(load_cpus) if load_cpus is not None else (os.cpu_count() or 2)
    pairs = max(1, n // 4)
    return pairs, max(2, n - 2 * pairs - 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder for the router's tokenizer (default: a fresh demo model)")
    ap.add_argument("--policy", default="round_robin", help="router policy (default round_robin)")
    ap.add_argument("--concurrency", default="1,100,1000", help="concurrent streams, comma-separated levels (default 1,100,1000)")
    ap.add_argument("--clients", type=int, default=None, help="client processes sharing the streams (default: from the load cores)")
    ap.add_argument("--stubs", type=int, default=None, help="stub (prefill, decode) pairs, one process each (default: from the load cores)")
    ap.add_argument("--router-cpus", default=None,
                    help="pin the router to these cores, e.g. 0,1 or first:2 (default: no pinning)")
    ap.add_argument("--load-cpus", default=None, help="cores for stubs and clients (default: all but --router-cpus)")
    ap.add_argument("--router-workers", type=int, default=None,
                    help="router processes (default: one per --router-cpus core, else 1)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="offered requests/s over all streams (paced; default 0 = closed loop, as fast as answered)")
    ap.add_argument("--modes", default="direct,router", help="which of direct,router to run (default both)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per measurement (default 15)")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens per request (default 4)")
    ap.add_argument("--decisions", type=int, default=20000, help="policy.pick calls per policy (0 = skip; default 20000)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        router_cpus, load_cpus = plan_cpus(args.router_cpus, args.load_cpus)
    except ValueError as exc:
        ap.error(str(exc))
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"direct", "router"}:
        ap.error(f"--modes must name direct and/or router, got {args.modes!r}")
    pairs_default, clients_default = _default_counts(load_cpus)
    n_pairs = args.stubs or pairs_default
    n_clients = args.clients or clients_default
    router_workers = args.router_workers or (len(router_cpus) if router_cpus else 1)
    if load_cpus is not None:
        os.sched_setaffinity(0, load_cpus)  # this process (and the decisions bench) too

    results: dict[str, Any] = {"cores": os.cpu_count(), "args": vars(args), "stub_pairs": n_pairs,
                               "clients": n_clients, "router_workers": router_workers,
                               "router_cpus": sorted(router_cpus) if router_cpus else None,
                               "load_cpus": sorted(load_cpus) if load_cpus else None}
    print(f"router: {router_workers} process(es) on cores {results['router_cpus'] or 'any'}; "
          f"{n_pairs} stub pair(s) and {n_clients} client process(es) on cores "
          f"{results['load_cpus'] or 'any'}", flush=True)
    results["decisions"] = bench_decisions(args.decisions) if args.decisions > 0 else []
    for row in results["decisions"]:
        print(f"decision {row['policy']:>13}: {row['decisions_per_s']:>9.0f}/s  p50 {row['p50_us']:.1f} us  p99 {row['p99_us']:.1f} us", flush=True)

    tmp = tempfile.TemporaryDirectory()
    model = args.model or _demo_model(Path(tmp.name) / "demo")
    procs: list[subprocess.Popen] = []
    try:
        target: dict[str, Any] = {"pairs": []}
        for _ in range(n_pairs):
            pair = {}
            for role in ("prefill", "decode"):
                port = free_port()
                # --kv-wait 60: an overloaded load side shows as latency, not as "KV never arrived"
                procs.append(subprocess.Popen([*python_command("-m"), "splitserve.testing.stub_worker", "--role", role,
                                               "--port", str(port), "--tokens", "10", "11", "12", "13",
                                               "--kv-wait", "60"],
                                              preexec_fn=_pin(load_cpus)))
                pair[role] = f"http://127.0.0.1:{port}"
            pair["kv_endpoint"] = pair["decode"].removeprefix("http://")
            target["pairs"].append(pair)
        router_port = free_port()
        target["router"] = f"http://127.0.0.1:{router_port}"
        cmd = [*python_command("-m"), "splitserve.router", "--log-level", "WARNING",
               "--model", model, "--served-model-name", "demo",  # the name the clients send
               "--port", str(router_port), "--policy", args.policy]
        if router_workers > 1:
            cmd += ["--workers", str(router_workers)]
        for pair in target["pairs"]:
            cmd += ["--prefill", pair["prefill"], "--decode", pair["decode"]]
        router = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, preexec_fn=_pin(router_cpus))
        procs.append(router)
        for url in [p[r] for p in target["pairs"] for r in ("prefill", "decode")] + [target["router"]]:
            wait_http_ok(url + "/health", timeout=60)
        run_load("router", target, 50, 1, 2.0, args.max_tokens, load_cpus)  # warm-up
        results["serving"] = []
        for conc in (int(c) for c in args.concurrency.split(",")):
            rows = {}
            for mode in modes:
                row = run_load(mode, target, conc, min(n_clients, conc), args.duration, args.max_tokens,
                               load_cpus, router.pid if mode == "router" else None, args.rate)
                rows[mode] = row
                _print_row(row)
            entry: dict[str, Any] = {"concurrency": conc, **rows}
            if len(rows) == 2:
                keys = ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")
                entry["added_ms"] = {k: rows["router"][k] - rows["direct"][k] for k in keys}
                print(f"c={conc:>5} router adds: " + ", ".join(f"{k} {v:+.1f}" for k, v in entry["added_ms"].items()), flush=True)
            results["serving"].append(entry)
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
