"""Open-loop load generator for any OpenAI-compatible ``/v1/completions`` endpoint.

Open loop: each request is sent at its scheduled time whether or not earlier ones finished, as
real users do; a closed loop (send when one finishes) would hide queueing, the very thing an
SLO measures. One scheduler coroutine sleeps until each arrival and spawns the request as its
own task; the HTTP client has no connection cap, so the client never queues requests itself.

Per request we stream the SSE response and record: send time, time to the first token event,
every gap between token events, end-to-end latency, output tokens, finish reason or error.
A "token event" is a ``data:`` chunk carrying a choice; the final usage-only chunk (sent when
``stream_options.include_usage`` is honoured) gives the exact ``completion_tokens``.

To get an exact output length, ``max_tokens`` is the drawn length and, by default, the body
carries ``"ignore_eos": true`` (vLLM/SGLang extension; splitserve's SamplingParams has it). A
server that ignores the field may stop early; the summary counts such ``short_outputs``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from splitserve.bench.records import RequestRecord
from splitserve.bench.workloads import Request

# httpx logs every request at INFO: thousands of lines per run would bury the progress bar.
logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass(frozen=True)
class LoadConfig:
    """How to talk to the server. ``extra_body`` is merged into every request body last;
    ``headers`` go on every request (e.g. splitserve's per-request SLO headers)."""

    base_url: str
    model: str
    ignore_eos: bool = True
    include_usage: bool = True
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def completions_url(self) -> str:
        """``.../v1/completions``, whether or not the base URL already ends in ``/v1``."""
        base = self.base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return base + "/completions"

    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body for one request."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": self.temperature,
            "stream": True,
        }
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body


@dataclass
class RunResult:
    """Records of one run plus its wall-clock span (first send to last completion)."""

    records: list[RequestRecord]
    run_seconds: float
    max_send_lag_s: float  # worst lateness of a send against its schedule (client overload)


ProgressFn = Callable[[RequestRecord], None]


async def run_load(
    requests: Sequence[Request],
    config: LoadConfig,
    on_done: ProgressFn | None = None,
    client: httpx.AsyncClient | None = None,
) -> RunResult:
    """Send ``requests`` at their ``arrival_s`` offsets and measure each; returns when all are
    done (each bounded by ``config.request_timeout_s``)."""
    own = client is None
    if client is None:
        headers = dict(config.headers)
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.request_timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            headers=headers,
            trust_env=False,  # never measure through a proxy picked up from the environment
        )
    try:
        return await _run(requests, config, client, on_done)
    finally:
        if own:
            await client.aclose()


async def _run(
    requests: Sequence[Request],
    config: LoadConfig,
    client: httpx.AsyncClient,
    on_done: ProgressFn | None,
) -> RunResult:
    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    lag = 0.0
    for req in sorted(requests, key=lambda r: r.arrival_s):
        delay = start + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, time.perf_counter() - start - req.arrival_s)
        tasks.append(asyncio.create_task(_one(client, config, req, start, on_done)))
    records = list(await asyncio.gather(*tasks))
    records.sort(key=lambda r: r.index)
    sent = [r.sent_s for r in records if r.sent_s is not None]
    ends = [r.sent_s + r.e2e_s for r in records if r.sent_s is not None and r.e2e_s is not None]
    span = (max(ends) - min(sent)) if ends and sent else 0.0
    return RunResult(records, span, lag)


async def _one(
    client: httpx.AsyncClient,
    config: LoadConfig,
    req: Request,
    start: float,
    on_done: ProgressFn | None,
) -> RequestRecord:
    record = RequestRecord(
        index=req.index, scheduled_s=req.arrival_s, prompt_tokens=req.prompt_tokens,
        max_tokens=req.max_tokens,
    )
    sent = time.perf_counter()
    record.sent_s = sent - start
    try:
        # httpx's timeout bounds each read; wait_for bounds the whole request
        await asyncio.wait_for(_stream(client, config, req, sent, record),
                               config.request_timeout_s)
    except TimeoutError:  # first: on 3.11+ it is the builtin, an OSError subclass
        record.error = f"timeout after {config.request_timeout_s:g} s"
    except (httpx.HTTPError, OSError, ValueError) as exc:  # recorded, counted as an SLO miss
        record.error = f"{type(exc).__name__}: {exc}"[:500]
    except (KeyError, TypeError, AttributeError) as exc:  # a chunk not shaped like OpenAI's
        record.error = f"malformed stream chunk: {type(exc).__name__}: {exc}"[:500]
    if record.error is None and record.ttft_s is None:
        record.error = "no token received"
    if on_done is not None:
        on_done(record)
    return record


async def _stream(
    client: httpx.AsyncClient,
    config: LoadConfig,
    req: Request,
    sent: float,
    record: RequestRecord,
) -> None:
    """Fill ``record`` from the SSE stream of one request."""
    last: float | None = None
    events = 0
    usage_tokens: int | None = None
    async with client.stream("POST", config.completions_url, json=config.body(req)) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            record.error = f"HTTP {resp.status_code}: {body[:300]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(payload)  # ValueError on garbage -> recorded as the error
            if "error" in chunk:
                record.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                break
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    record.prompt_tokens = int(usage["prompt_tokens"])
            choices = chunk.get("choices") or []
            if not choices:
                continue
            if last is None:
                record.ttft_s = now - sent
            else:
                record.itl_s.append(now - last)
            last = now
            events += 1
            reason = choices[0].get("finish_reason")
            if reason is not None:
                record.finish_reason = reason
    end = time.perf_counter()
    record.e2e_s = (last if last is not None else end) - sent
    record.output_tokens = usage_tokens if usage_tokens is not None else events


def run_load_sync(
    requests: Sequence[Request], config: LoadConfig, progress: bool = True,
    description: str = "requests",
) -> RunResult:
    """``run_load`` in a fresh event loop, with a rich progress bar unless ``progress`` is off."""
    if not progress:
        return asyncio.run(run_load(requests, config))
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task(description, total=len(requests), errors=0)
        errors = 0

        def done(rec: RequestRecord) -> None:
            nonlocal errors
            errors += rec.error is not None
            bar.update(task, advance=1, errors=errors)

        return asyncio.run(run_load(requests, config, on_done=done))
