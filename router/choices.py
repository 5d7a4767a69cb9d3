"""From an OpenAI request to choices: token limits, fan-out of ``n``, detokenization, the JSON
and SSE shapes of completions and chat completions.

Each choice is one sequence served by the dispatcher; all choices of a request run concurrently
and feed one queue. Before the HTTP response starts, every choice must have produced its first
chunk or failed, so a request that cannot be served gets a proper status code (429/502/503)
instead of a stream that errors at once.

The common request has one choice: it is served in the caller's task without the queue and the
pump task (``_SingleRun``), and its last SSE events (the finishing chunk, usage, ``[DONE]``) go
out as one piece, so the router writes to the client's socket as few times as it can.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from splitserve.router.codec import dumps
from splitserve.router.config import SLO
from splitserve.router.dispatch import Chunk, Dispatcher, SequenceSpec
from splitserve.router.errors import RouterError, bad_request
from splitserve.router.logprobs import LogprobsFormatter
from splitserve.router.openai_api import SamplingFields
from splitserve.router.output import ChoiceText
from splitserve.router.tokenizer import RouterTokenizer

_END = object()


@dataclass
class SSEStream:
    """A streaming answer: its SSE lines, and ``close`` to call when the response ends for any
    reason (a generator's ``finally`` is not enough: a server drops a disconnected client's
    generator without closing it, and the decode sequences would run on until collected)."""

    lines: AsyncIterator[str]
    close: Any


@dataclass(frozen=True)
class Shape:
    """What differs between /v1/completions and /v1/chat/completions."""

    chat: bool

    @property
    def prefix(self) -> str:
        return "chatcmpl-" if self.chat else "cmpl-"

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def choice(self, index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(
        self, index: int, text: str, finish: str | None, first: bool, logprobs: dict | None = None
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def token_limits(
    prompts: list[list[int]], requested: int | None, max_model_len: int, prompt_param: str = "prompt"
) -> list[int]:
    """max_tokens per prompt: the request's, or what is left of the context by default."""
    out = []
    for ids in prompts:
        left = max_model_len - len(ids)
        if left <= 0:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                f"{len(ids)} tokens. Please shorten the prompt.",
                prompt_param,
            )
        if requested is not None and requested > left:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {len(ids) + requested} tokens ({len(ids)} in the prompt, {requested} "
                f"for the completion). Please reduce the prompt or max_tokens.",
                "max_tokens",
            )
        out.append(requested if requested is not None else left)
    return out


class Serving:
    def __init__(self, tokenizer: RouterTokenizer, dispatcher: Dispatcher, model_name: str) -> None:
        self.tokenizer, self.dispatcher, self.model_name = tokenizer, dispatcher, model_name

    def _specs(
        self, shape: Shape, body: SamplingFields, prompts: list[list[int]], max_len: int, slo: SLO
    ) -> tuple[str, list[SequenceSpec], list[int]]:
        limits = token_limits(prompts, body.max_tokens, max_len, "messages" if shape.chat else "prompt")
        rid = shape.prefix + uuid.uuid4().hex
        now = time.monotonic()
        specs, owners = [], []
        for i, (ids, limit) in enumerate(zip(prompts, limits, strict=True)):
            for j in range(body.n):
                index = i * body.n + j
                specs.append(SequenceSpec(f"{rid}-{index}", ids, body.sampling_params(limit, index), slo, now))
                owners.append(i)
        return rid, specs, owners

    async def serve(
        self, shape: Shape, body: SamplingFields, prompts: list[list[int]], max_len: int, slo: SLO
    ) -> dict[str, Any] | SSEStream:
        """The JSON body (non-streaming) or an SSE line iterator (streaming)."""
        rid, specs, owners = self._specs(shape, body, prompts, max_len, slo)
        choices = [ChoiceText(self.tokenizer.detokenizer(s.prompt_token_ids), body.stop_list) for s in specs]
        formatters = [LogprobsFormatter(self.tokenizer, shape.chat) for _ in specs] if body.num_logprobs is not None else None
        run = _SingleRun(self.dispatcher, specs[0]) if len(specs) == 1 else _Run(self.dispatcher, specs)
        await run.start()
        try:
            head = await run.first_of_each()
        except BaseException:
            await run.cancel()
            raise
        usage = {"prompt_tokens": sum(len(p) for p in prompts)}
        created = int(time.time())
        if not body.stream:
            entries: list[list[dict | None]] = [[] for _ in specs]
            try:
                async for idx, chunk in run.items(head):
                    self._feed(choices, run, idx, chunk)
                    entries[idx] += chunk.logprobs or []
            finally:
                await run.cancel()
            completion_tokens = sum(c.num_tokens for c in choices)
            return {
                "id": rid,
                "object": shape.object,
                "created": created,
                "model": self.model_name,
                "choices": [
                    shape.choice(i, c.text, c.finish_reason, formatters[i].format(entries[i]) if formatters else None)
                    for i, c in enumerate(choices)
                ],
                "usage": dict(usage, completion_tokens=completion_tokens, total_tokens=usage["prompt_tokens"] + completion_tokens),
            }
        return SSEStream(self._sse(shape, rid, created, body, run, head, choices, usage, formatters), run.cancel)

    @staticmethod
    def _feed(choices: list[ChoiceText], run: _Run | _SingleRun, idx: int, chunk: Chunk) -> str:
        c = choices[idx]
        delta = c.add(chunk.token_ids, chunk.finish_reason, chunk.stop_string)
        if c.finished and chunk.finish_reason is None:
            run.stop(idx)  # the router saw a stop string first: end the sequence on the worker
        return delta

    async def _sse(
        self, shape: Shape, rid: str, created: int, body: SamplingFields, run: _Run | _SingleRun,
        head: list[tuple[int, Any]], choices: list[ChoiceText], usage: dict[str, int],
        formatters: list[LogprobsFormatter] | None = None,
    ) -> AsyncIterator[str]:
        obj = shape.object + ".chunk" if shape.chat else shape.object
        sent_first = [False] * len(choices)

        def event(payload: dict[str, Any]) -> str:
            return "data: " + dumps(payload).decode() + "\n\n"

        def chunk_event(choice: dict[str, Any]) -> str:
            return event({"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]})

        def tail() -> str:
            if not body.include_usage:
                return "data: [DONE]\n\n"
            completion_tokens = sum(c.num_tokens for c in choices)
            u = dict(usage, completion_tokens=completion_tokens, total_tokens=usage["prompt_tokens"] + completion_tokens)
            return event({"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [], "usage": u}) + "data: [DONE]\n\n"

        try:
            try:
                async for idx, chunk in run.items(head):
                    was_finished = choices[idx].finished
                    text = self._feed(choices, run, idx, chunk)
                    finish = choices[idx].finish_reason if choices[idx].finished and not was_finished else None
                    logprobs = formatters[idx].format(chunk.logprobs) if formatters and chunk.logprobs else None
                    out = ""
                    # A chunk goes out for every step that produced tokens, even while their
                    # text is held back (part of a multi-byte character, or maybe the start of
                    # a stop string): clients see progress, and time to first token and the
                    # gaps between tokens measure tokens, not complete characters.
                    if text or finish or logprobs or chunk.token_ids or (shape.chat and not sent_first[idx]):
                        out = chunk_event(shape.delta(idx, text, finish, not sent_first[idx], logprobs))
                        sent_first[idx] = True
                    if finish and all(c.finished for c in choices):
                        yield out + tail()  # the last choice finished: nothing else can follow
                        return
                    if out:
                        yield out
            except RouterError as exc:
                yield event(exc.body()) + "data: [DONE]\n\n"
                return
            yield tail()
        finally:
            await run.cancel()


class _SingleRun:
    """A request's only sequence, iterated in the caller's task (the interface of ``_Run``)."""

    def __init__(self, dispatcher: Dispatcher, spec: SequenceSpec) -> None:
        self._chunks = dispatcher.run(spec)
        self._stopped = self._finished = False

    async def start(self) -> None:
        return None

    async def first_of_each(self) -> list[tuple[int, Any]]:
        """The first chunk (or _END); a RouterError propagates as it is raised."""
        return [(0, await anext(self._chunks, _END))]

    async def items(self, head: list[tuple[int, Any]]) -> AsyncIterator[tuple[int, Chunk]]:
        for idx, item in head:
            if item is _END:
                return
            self._finished = item.finish_reason is not None
            yield idx, item
        if self._stopped:
            return
        async for chunk in self._chunks:
            self._finished = chunk.finish_reason is not None
            yield 0, chunk
            if self._stopped:  # the router saw a stop string: leave, closing the decode stream
                return

    def stop(self, idx: int) -> None:
        self._stopped = True

    async def cancel(self) -> None:
        """Close the sequence. One that finished is first run to its end (the caller stops
        reading at the finishing chunk), so the dispatcher reads the end of decode's stream and
        keeps the connection for the next request instead of dropping it."""
        if self._finished and not self._stopped:
            try:
                async for _ in self._chunks:
                    pass
            except RouterError:
                pass  # a failure after the last token: the client already has its answer
        await self._chunks.aclose()


class _Run:
    """The concurrent sequences of one request, feeding one queue of (index, chunk|error|END)."""

    def __init__(self, dispatcher: Dispatcher, specs: list[SequenceSpec]) -> None:
        self.dispatcher, self.specs = dispatcher, specs
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.open = len(specs)

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.specs)]

    async def _pump(self, idx: int, spec: SequenceSpec) -> None:
        try:
            async for chunk in self.dispatcher.run(spec):
                await self.queue.put((idx, chunk))
        except RouterError as exc:
            await self.queue.put((idx, exc))
        finally:
            self.queue.put_nowait((idx, _END))

    async def first_of_each(self) -> list[tuple[int, Any]]:
        """Items until every sequence has said something; raises the first error among them."""
        got: set[int] = set()
        head: list[tuple[int, Any]] = []
        while len(got) < len(self.specs):
            idx, item = await self.queue.get()
            if isinstance(item, RouterError):
                raise item
            head.append((idx, item))  # a chunk, or _END
            got.add(idx)
        return head

    async def items(self, head: list[tuple[int, Any]]) -> AsyncIterator[tuple[int, Chunk]]:
        """All chunks (``head`` first) until every sequence ended; raises a sequence's error."""
        pending = list(head)
        while self.open:
            idx, item = pending.pop(0) if pending else await self.queue.get()
            if item is _END:
                self.open -= 1
            elif isinstance(item, RouterError):
                raise item
            else:
                yield idx, item

    def stop(self, idx: int) -> None:
        self.tasks[idx].cancel()

    async def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
