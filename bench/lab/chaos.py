"""Chaos: ordinary faults under load, and what every client got.

A fault (a worker killed, stopped for a while or for good, clients that leave at every stage, Redis restarted empty) is
injected into a real local deployment (``splitserve up``'s processes) while client threads send
requests. Afterwards each request is exactly one of:

- ``completed``: 200 and a finished answer (``finish_reason`` length or stop);
- ``clear_error``: an HTTP error with an OpenAI error body, or a stream that ended with an error
  event: the client was told;
- ``left``: the client itself went away (the disconnect fault);
- ``broken``: anything else (a connection reset, a stream cut without a word);
- ``hung``: no answer within the deadline;

and, once the deployment is quiet, every worker's KV blocks must be back at their idle count
(``/load``: free == total). ``hung`` and leaked blocks must be 0; ``broken`` too.

Run: ``python -P -m splitserve.bench.lab.chaos --model DIR`` prints one table row per fault (the
figures in bench/RESULTS.md); tests/test_chaos.py runs a bounded version in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
from splitserve.launcher.up import Deployment

OUTCOMES = ("completed", "clear_error", "left", "broken", "hung")
Fault = Callable[[Deployment], None]


@dataclass
class Load:
    """The traffic sent while a fault happens."""

    clients: int = 6
    requests_per_client: int = 4
    max_tokens: int = 24
    deadline_s: float = 90.0  # a request with no answer by then is hung
    leave_after_s: tuple[float, float] | None = None  # clients leave after U(a, b) seconds
    seed: int = 0


@dataclass
class Result:
    fault: str
    outcomes: Counter = field(default_factory=Counter)
    leaked_blocks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ok(self) -> bool:
        return (self.outcomes["hung"] == 0 and self.outcomes["broken"] == 0
                and not any(self.leaked_blocks.values()))

    def row(self) -> dict:
        return {"fault": self.fault, "sent": self.sent, **{k: self.outcomes[k] for k in OUTCOMES},
                "leaked_blocks": sum(self.leaked_blocks.values()), "seconds": round(self.seconds, 1)}


def _prompt(rng: random.Random) -> str:
    words = "the model serve token prompt decode prefill cache block request latency".split()
    return " ".join(rng.choice(words) for _ in range(rng.choice((3, 40, 200))))


def _classify_stream(resp: httpx.Response) -> str:
    finished = False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return "completed" if finished else "broken"
        event = json.loads(data)
        if "error" in event:
            return "clear_error"
        if any(c.get("finish_reason") for c in event.get("choices", [])):
            finished = True
    return "broken"


def one_request(base_url: str, model: str, load: Load, rng: random.Random) -> str:
    """Send one request and say which outcome it had (see the module docstring)."""
    body = {"model": model, "prompt": _prompt(rng), "max_tokens": load.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": rng.random() < 0.5}
    leave = rng.uniform(*load.leave_after_s) if load.leave_after_s else None
    timeout = httpx.Timeout(leave if leave else load.deadline_s, connect=5.0)
    try:
        with httpx.Client(timeout=timeout) as client, client.stream(
            "POST", f"{base_url}/completions", json=body
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                return "clear_error" if "error" in resp.json() else "broken"
            if body["stream"]:
                return _classify_stream(resp)
            resp.read()
            choices = resp.json().get("choices") or [{}]
            return "completed" if choices[0].get("finish_reason") in ("length", "stop") else "broken"
    except httpx.TimeoutException:
        return "left" if leave else "hung"
    except (httpx.HTTPError, ValueError):
        return "broken"


def worker_urls(dep: Deployment) -> dict[str, str]:
    """Each worker's base URL, by component name."""
    return {c.name: c.health_url.rsplit("/", 1)[0]
            for c in dep.group.components if c.name != "router"}


def worker_load(url: str, headers: dict[str, str]) -> dict | None:
    try:
        r = httpx.get(f"{url}/load", timeout=2, headers=headers)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def leaked_blocks(dep: Deployment, settle_s: float = 30.0) -> dict[str, int]:
    """Blocks each worker still holds once it is quiet (0 for all = nothing leaked). A worker
    that does not answer (killed and not back) holds nothing of anyone's."""
    deadline, headers = time.monotonic() + settle_s, dep.internal_headers()
    while True:
        held = {}
        for name, url in worker_urls(dep).items():
            got = worker_load(url, headers)
            if got is not None:
                held[name] = got["total_blocks"] - got["free_blocks"]
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def run_fault(dep: Deployment, model: str, name: str, fault: Fault | None, load: Load) -> Result:
    """Send ``load``, inject ``fault`` once the first requests are in flight, classify every
    request, then measure what each worker still holds."""
    result, start = Result(name), time.monotonic()
    rngs = [random.Random(load.seed * 1000 + i) for i in range(load.clients)]

    def client(i: int) -> list[str]:
        return [one_request(dep.base_url, model, load, rngs[i])
                for _ in range(load.requests_per_client)]

    with ThreadPoolExecutor(load.clients) as pool:
        futures = [pool.submit(client, i) for i in range(load.clients)]
        if fault is not None:
            time.sleep(0.3)
            fault(dep)
        for f in futures:
            result.outcomes.update(f.result())
    result.leaked_blocks = leaked_blocks(dep)
    result.seconds = time.monotonic() - start
    return result


# ---------------------------------------------------------------- faults ------------------------
def kill(component: str) -> Fault:
    def fault(dep: Deployment) -> None:
        os.kill(dep.component(component).process.pid, signal.SIGKILL)
    return fault


def pause(component: str, seconds: float) -> Fault:
    """SIGSTOP, then SIGCONT after ``seconds`` (a worker that hangs, then comes back)."""
    def fault(dep: Deployment) -> None:
        pid = dep.component(component).process.pid
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(seconds, os.kill, (pid, signal.SIGCONT)).start()
    return fault


def stop_for_good(component: str, busy_within_s: float = 10.0) -> Fault:
    """SIGSTOP, once the worker is running sequences (so streams are cut mid-answer), and never
    SIGCONT: a worker wedged with its connections open. The router must give up its streams
    long before its 60 s idle timeout; the deployment's stop kills the worker."""
    def fault(dep: Deployment) -> None:
        url, headers = worker_urls(dep)[component], dep.internal_headers()
        deadline = time.monotonic() + busy_within_s
        while time.monotonic() < deadline and not (worker_load(url, headers) or {}).get("running"):
            time.sleep(0.02)
        os.kill(dep.component(component).process.pid, signal.SIGSTOP)
    return fault


def standard_faults(num_prefill: int) -> list[tuple[str, Fault | None, Load]]:
    """The faults the suite runs, each with its load."""
    faults: list[tuple[str, Fault | None, Load]] = [
        ("none (baseline)", None, Load()),
        ("clients leave at every stage", None,
         Load(clients=8, max_tokens=64, leave_after_s=(0.0, 0.25))),
        ("decode-0 SIGSTOP 3 s", pause("decode-0", 3.0), Load()),
        ("decode-0 kill -9", kill("decode-0"), Load()),
        # a request that waited out the stream idle timeout (60 s) would count as hung
        ("decode-0 SIGSTOP for good", stop_for_good("decode-0"), Load(max_tokens=64, deadline_s=20.0)),
    ]
    if num_prefill:
        faults += [("prefill-0 SIGSTOP 3 s", pause("prefill-0", 3.0), Load()),
                   ("prefill-0 kill -9", kill("prefill-0"), Load())]
    return faults


def main(argv: list[str] | None = None) -> int:
    from splitserve.launcher.up import UpConfig, free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (e.g. `splitserve model init`)")
    ap.add_argument("--prefill", type=int, default=2, help="prefill workers (default 2)")
    ap.add_argument("--decode", type=int, default=2, help="decode workers (default 2)")
    ap.add_argument("--json", help="write the table as JSON here")
    args = ap.parse_args(argv)
    rows = []
    for name, fault, load in standard_faults(args.prefill):
        cfg = UpConfig(model=args.model, served_model_name="chaos", num_prefill=args.prefill,
                       num_decode=args.decode, port=free_port(),
                       worker_args=("--block-size", "8", "--num-kv-blocks", "512"))
        with Deployment(cfg) as dep:
            res = run_fault(dep, "chaos", name, fault, load)
        rows.append(res.row())
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["hung"] == 0 and r["broken"] == 0 and r["leaked_blocks"] == 0
                    for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
