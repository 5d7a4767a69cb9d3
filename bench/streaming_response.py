"""The HF baseline server's (hf_server.py) streaming response: a StreamingResponse that notices a
client leaving while the stream is idle.

With ASGI spec 2.4 servers (uvicorn today), Starlette's StreamingResponse only learns that the
client went away when a ``send`` fails, and uvicorn drops sends to a closed connection silently,
so a stream keeps producing (a decode sequence keeps running) until it ends by itself. This one
also listens for ``http.disconnect`` and cancels the stream at once, then runs ``on_close``
(always, however the response ended), so a client that closes the stream really aborts its
generation. (The router writes its streams itself: router/completions.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse


class DisconnectAwareStreamingResponse(StreamingResponse):
    def __init__(
        self,
        content: AsyncIterator[str | bytes],
        media_type: str,
        on_close: Callable[[], Awaitable[Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        stream = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({stream, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watcher):
                task.cancel()
            results = await asyncio.gather(stream, watcher, return_exceptions=True)
            if self._on_close is not None:
                await self._on_close()
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, (asyncio.CancelledError, OSError)):
            raise error
        if hasattr(self.body_iterator, "aclose"):
            await self.body_iterator.aclose()
