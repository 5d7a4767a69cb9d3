"""A plain Hugging Face transformers server: the baseline the engine is compared with on one GPU.

    python -m splitserve.bench.hf_server --model MODEL_DIR --port 8001 [--batch 1] [--device cuda]

What a reviewer would call "serving with HF transformers", without any of our engine's machinery:
the model loaded with ``AutoModelForCausalLM.from_pretrained`` (default attention, sdpa), and each
request answered by ``model.generate`` with a streamer. Requests wait in one FIFO queue and one
worker thread runs one ``generate`` at a time, so a request that arrives while another is being
generated waits for it to finish (no continuous batching, no paged cache, no CUDA graphs).
``--batch N`` (default 1) is static batching: the worker takes up to N queued requests with the
same sampling settings, left-pads them into one ``generate`` call, and the batch runs until its
longest request is done (what ``pipeline(batch_size=N)`` does). Batch 1 is the default because it
is the common deployment and the one whose outputs are exactly ``generate``'s for each prompt.

The HTTP side is the router's own code, so both systems in a comparison tokenize, detokenize,
stream and count tokens identically: the same ``CompletionRequest`` validation, the same
``RouterTokenizer`` (the model's tokenizer.json: same prompt token ids as the engine sees), and
``router.choices.Serving``, which only needs a dispatcher whose ``run(spec)`` yields ``Chunk``s;
``HFGenerator`` is that dispatcher. Honoured per request: ``max_tokens``, ``ignore_eos`` (EOS
ends a request unless it is set, as in the engine; the load generator sets it so outputs have the
drawn length), ``stop_token_ids``, ``stop`` strings (cut by ``Serving``, which then cancels the
request), temperature / top_p / top_k / seed (seed exact at batch 1 only), ``n``, usage in the
last SSE chunk (``stream_options.include_usage``). Refused with 400: ``logprobs``.

Life cycle of a request: queued (FIFO) -> generating (in a batch of up to N) -> done, or
cancelled (the client left, or a stop string was found: a queued request is dropped, a running
one stops its ``generate`` at the next step once every row of the batch is done or cancelled).
Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health`` (200 once the model is loaded and warmed up), ``GET /load``.
"""

import argparse
import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from splitserve.router.dispatch import Chunk, SequenceSpec
from splitserve.router.errors import RouterError, bad_request

if TYPE_CHECKING:
    import torch
    from fastapi import FastAPI
    from splitserve.router.tokenizer import RouterTokenizer

log = logging.getLogger("splitserve.bench.hf_server")

T = TypeVar("T")


@dataclass(frozen=True)
class HFServerConfig:
    """How to load and serve the model; validated when built."""

    model_dir: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8001
    device: str | None = None  # None: cuda if present, else cpu
    dtype: str | None = None  # None: the checkpoint's
    batch: int = 1
    random_weights: bool = False

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"model_dir: no config.json in {self.model_dir}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


class _Job:
    """One sequence: its settings, and the queue its tokens reach the event loop through.

    ``feed`` runs on the generate thread; everything it hands over goes through
    ``loop.call_soon_threadsafe``, so the asyncio queue is only touched by its own loop.
    """

    def __init__(self, spec: SequenceSpec, loop: asyncio.AbstractEventLoop) -> None:
        s = spec.sampling
        self.request_id = spec.request_id
        self.prompt = list(spec.prompt_token_ids)
        self.max_tokens = s.max_tokens
        self.ignore_eos = s.ignore_eos
        self.stop_ids = set(s.stop_token_ids)
        self.temperature = s.temperature
        self.top_p = s.top_p
        self.top_k = s.top_k
        self.seed = s.seed
        self.loop = loop
        self.out: asyncio.Queue[Chunk | RouterError] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.emitted = 0
        self.finished = False

    @property
    def kind(self) -> tuple[float, float, int]:
        """Requests of one kind can share a ``generate`` call (same logits processing)."""
        if self.temperature == 0:
            return (0.0, 1.0, -1)
        return (self.temperature, self.top_p, self.top_k)

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled.is_set()

    def feed(self, token: int, eos_ids: set[int]) -> None:
        """One generated token (generate thread); ignored once the job is done."""
        if self.done:
            return
        self.emitted += 1
        finish = None
        if token in self.stop_ids or (not self.ignore_eos and token in eos_ids):
            finish = "stop"
        elif self.emitted >= self.max_tokens:
            finish = "length"
        self.finished = finish is not None
        self._push(Chunk([token], finish, None))

    def fail(self, message: str) -> None:
        """End the job with a server error (generate thread)."""
        if not self.done:
            self.finished = True
            self._push(RouterError(500, message, type="server_error", code="generation_failed"))

    def _push(self, item: Chunk | RouterError) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


def _streamer(jobs: list[_Job], eos_ids: set[int]) -> Any:
    """A ``transformers`` streamer that hands each step's tokens to their jobs.

    ``generate`` first puts the prompt (2-D), then one 1-D tensor of ``batch`` tokens per step.
    """
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        def put(self, value: "torch.Tensor") -> None:
            if value.dim() != 1:
                return  # the prompt
            for job, token in zip(jobs, value.tolist(), strict=True):
                job.feed(int(token), eos_ids)

        def end(self) -> None:
            pass  # the caller checks every job after generate returns

    return RowStreamer()


def _stop_when_done(jobs: list[_Job]) -> Any:
    """A stopping criterion marking rows whose job is done, so ``generate`` ends once every
    row is (a cancelled or EOS-ended request does not keep the GPU busy to max_new_tokens)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class JobsDone(StoppingCriteria):
        def __call__(self, input_ids: "torch.Tensor", scores: Any,
                     **kwargs: Any) -> "torch.Tensor":
            return torch.tensor([j.done for j in jobs], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([JobsDone()])


class HFGenerator:
    """A FIFO queue and one thread running ``model.generate`` for up to ``batch`` requests.

    Also the dispatcher ``router.choices.Serving`` calls: ``run(spec)`` yields ``Chunk``s.
    """

    def __init__(self, model: Any, eos_ids: Iterable[int], pad_id: int, batch: int = 1) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.eos_ids = set(eos_ids)
        self.pad_id = pad_id
        self.batch = batch
        self._pending: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._running: list[_Job] = []
        self._closed = False
        self.batches_run = 0  # generate calls, and the sequences they served: mean batch size
        self.sequences_run = 0
        self._thread = threading.Thread(target=self._serve, name="hf-generate", daemon=True)
        self._thread.start()

    async def run(self, spec: SequenceSpec) -> AsyncIterator[Chunk]:
        """Queue one sequence and yield its tokens; leaving early cancels it."""
        if spec.sampling.logprobs is not None:
            raise bad_request("logprobs are not supported by the HF baseline server", "logprobs")
        job = _Job(spec, asyncio.get_running_loop())
        with self._cv:
            if self._closed:
                raise RouterError(503, "server is shutting down", type="server_error")
            self._pending.append(job)
            self._cv.notify()
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, RouterError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()

    def load(self) -> dict[str, int]:
        """Queue depth and running sequences (like the workers' ``/load``), and totals."""
        with self._cv:
            waiting = sum(1 for j in self._pending if not j.done)
            return {"waiting": waiting, "running": len(self._running), "batch": self.batch,
                    "batches_run": self.batches_run, "sequences_run": self.sequences_run}

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything queued or running and stop the thread."""
        with self._cv:
            self._closed = True
            for job in [*self._pending, *self._running]:
                job.cancelled.set()
            self._cv.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest live job and up to batch-1 more of its kind right behind
        it (strict FIFO: a job of another kind ends the batch). None once closed."""
        with self._cv:
            while True:
                while self._pending and self._pending[0].done:
                    self._pending.popleft()
                if self._pending:
                    break
                if self._closed:
                    return None
                self._cv.wait()
            jobs = [self._pending.popleft()]
            while self._pending and len(jobs) < self.batch:
                nxt = self._pending[0]
                if not nxt.done and nxt.kind != jobs[0].kind:
                    break
                self._pending.popleft()
                if not nxt.done:
                    jobs.append(nxt)
            self._running = jobs
            self.batches_run += 1
            self.sequences_run += len(jobs)
            return jobs

    def _serve(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self._generate(jobs)
            except Exception as exc:  # noqa: BLE001 - reported to every request of the batch
                log.exception("generate failed for %s", [j.request_id for j in jobs])
                for job in jobs:
                    job.fail(f"generation failed: {type(exc).__name__}: {exc}")
            for job in jobs:
                if not job.done:
                    job.fail(f"generate ended after {job.emitted} of {job.max_tokens} tokens")
            with self._cv:
                self._running = []

    def _generate(self, jobs: list[_Job]) -> None:
        """One ``generate`` call for ``jobs`` (left-padded), tokens streamed as they come."""
        import torch

        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.prompt):] = torch.tensor(job.prompt)
            mask[row, width - len(job.prompt):] = 1
        temperature, top_p, top_k = jobs[0].kind
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p,
                        "top_k": 0 if top_k < 0 else top_k}
            if jobs[0].seed is not None:
                torch.manual_seed(int(jobs[0].seed))
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max(j.max_tokens for j in jobs),
                pad_token_id=self.pad_id,
                streamer=_streamer(jobs, self.eos_ids),
                stopping_criteria=_stop_when_done(jobs),
                **sampling,
            )


def load_model(cfg: HFServerConfig) -> tuple[Any, list[int], int]:
    """The model on its device, eval mode, with ``generate``'s own EOS stop turned off (EOS is
    handled per request, so ``ignore_eos`` is honoured without masking EOS logits as HF's
    ``min_new_tokens`` would); returns (model, eos ids, pad id)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype: Any = getattr(torch, cfg.dtype) if cfg.dtype else "auto"
    if cfg.random_weights:
        config = AutoConfig.from_pretrained(cfg.model_dir)
        if dtype == "auto":
            dtype = getattr(config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=dtype).to(device)
    model.eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    pad_id = pad if isinstance(pad, int) else (eos_ids[0] if eos_ids else 0)
    model.generation_config.eos_token_id = None
    return model, eos_ids, pad_id


def create_app(cfg: HFServerConfig, generator: "HFGenerator",
               tokenizer: "RouterTokenizer") -> "FastAPI":
    """The OpenAI-compatible app over ``generator``, built from the router's pieces.

    FastAPI reads the handlers' annotations to parse bodies; this module has no
    ``from __future__ import annotations`` so that the classes imported here (late, to keep
    ``splitserve --help`` light) are real objects rather than strings FastAPI cannot resolve.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from splitserve.bench.streaming_response import DisconnectAwareStreamingResponse
    from splitserve.router.app import model_max_len
    from splitserve.router.choices import Serving, Shape
    from splitserve.router.config import SLO
    from splitserve.router.errors import error_body
    from splitserve.router.openai_api import (
        ChatCompletionRequest,
        CompletionRequest,
        check_model,
        validation_message,
    )
    from starlette.exceptions import HTTPException as StarletteHTTPException

    max_len = model_max_len(cfg.model_dir)
    serving = Serving(tokenizer, generator, cfg.served_model_name)  # type: ignore[arg-type]
    app = FastAPI(title="splitserve HF transformers baseline")
    created = int(time.time())

    @app.exception_handler(RouterError)
    async def _router_error(request: Request, exc: RouterError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

    async def respond(request: Request, shape: Shape, body: Any,
                      prompts: list[list[int]]) -> Response:
        result = await _unless_client_leaves(
            request, serving.serve(shape, body, prompts, max_len, SLO()))
        if result is None:
            return Response(status_code=499)  # nobody is listening (nginx's "client closed")
        if isinstance(result, dict):
            return JSONResponse(result)
        return DisconnectAwareStreamingResponse(result.lines, "text/event-stream",
                                                on_close=result.close,
                                                headers={"cache-control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model, cfg.served_model_name)
        prompts = []
        for p in body.prompts():
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids or any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise bad_request("prompt is empty or has token ids out of range", "prompt")
            prompts.append(ids)
        return await respond(request, Shape(chat=False), body, prompts)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model, cfg.served_model_name)
        try:
            ids = tokenizer.encode_chat([m.template_dict() for m in body.messages],
                                        body.add_generation_prompt)
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from exc
        return await respond(request, Shape(chat=True), body, [ids])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": cfg.served_model_name, "object": "model", "created": created,
            "owned_by": "huggingface-transformers", "root": cfg.model_dir, "max_model_len": max_len,
        }]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "role": "hf", "model": cfg.served_model_name, "batch": cfg.batch,
                "device": str(generator.device)}

    @app.get("/load")
    async def load() -> dict[str, Any]:
        return {"role": "hf", **generator.load()}

    return app


async def _unless_client_leaves(request: Any, work: Awaitable[T],
                                poll_s: float = 0.5) -> T | None:
    """``work``'s result, or None if the client disconnects first (``work`` is then cancelled).

    A request waits in the FIFO queue before its first token, and the streaming response (which
    watches for disconnects) only starts after that; without this, a request its client gave
    up on (a load-generator timeout) would still be generated later, delaying every request
    queued behind it.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def warm_up(generator: HFGenerator) -> None:
    """One short ``generate`` before listening (CUDA context, kernels, allocator), so the first
    measured request is not charged for start-up; /health answers only after it."""
    import torch

    ids = torch.tensor([[generator.pad_id] * 4], device=generator.device)
    with torch.inference_mode():
        generator.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=2, do_sample=False,
                                 pad_token_id=generator.pad_id)


def serve(cfg: HFServerConfig) -> None:
    """Load, warm up, serve until interrupted, then cancel what is left."""
    import uvicorn
    from splitserve.router.tokenizer import RouterTokenizer

    t0 = time.perf_counter()
    tokenizer = RouterTokenizer(cfg.model_dir)
    model, eos_ids, pad_id = load_model(cfg)
    generator = HFGenerator(model, eos_ids, pad_id, cfg.batch)
    warm_up(generator)
    log.info("HF transformers %s on %s (%s), batch %d, ready in %.1f s",
             cfg.model_dir, generator.device, next(model.parameters()).dtype, cfg.batch,
             time.perf_counter() - t0)
    try:
        uvicorn.run(create_app(cfg, generator, tokenizer), host=cfg.host, port=cfg.port,
                    log_level="warning")
    finally:
        generator.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's command-line options (``splitserve bench hf-server``)."""
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--served-model-name", default=None, help="default: the folder's name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the checkpoint's")
    p.add_argument("--batch", type=int, default=1,
                   help="static batch: up to N queued requests per generate call (default 1)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of config.json's shape (timing only; no safetensors read)")


def config_from_args(args: argparse.Namespace) -> HFServerConfig:
    """``HFServerConfig`` from ``add_arguments``' options."""
    return HFServerConfig(
        model_dir=args.model,
        served_model_name=args.served_model_name or Path(args.model).name,
        host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        batch=args.batch, random_weights=args.random_weights,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``splitserve bench hf-server``."""
    serve(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m splitserve.bench.hf_server ...``"""
    import sys

    from splitserve.bench.entry import standalone_main

    return standalone_main(sys.modules[__name__], run_from_args, argv)

if __name__ == "__main__":
    raise SystemExit(main())
