"""ClientWatch (router/completions.py): cancels a request's handler when its client leaves, and costs
the garbage collector nothing when it does not (a cancelled watcher per request left a reference
cycle each, and collecting them was the router's p99 latency)."""

from __future__ import annotations

import asyncio
import gc

from splitserve.router.completions import ClientWatch


class _Connection:
    """What uvicorn's receive() does once the body is read: wait, then report a disconnect when
    the client leaves or the response is complete."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()

    async def receive(self) -> dict:
        await self.ended.wait()
        return {"type": "http.disconnect"}


def test_a_completed_request_leaves_no_cyclic_garbage() -> None:
    async def one_request() -> None:
        conn = _Connection()
        watch = ClientWatch(conn.receive)
        await asyncio.sleep(0)  # the watcher waits in receive()
        watch.stop()
        conn.ended.set()  # the response is complete
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not watch.gone

    async def main() -> None:
        for _ in range(50):
            await one_request()

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
        assert gc.collect() < 50  # the event loop's own start and stop make a few, not one per request
    finally:
        gc.enable()


def test_a_client_that_leaves_cancels_the_handler() -> None:
    async def main() -> bool:
        conn = _Connection()

        async def handler() -> bool:
            watch = ClientWatch(conn.receive)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return watch.absorb()
            return False

        task = asyncio.create_task(handler())
        await asyncio.sleep(0)
        conn.ended.set()  # the client left mid-request
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(main()) is True
