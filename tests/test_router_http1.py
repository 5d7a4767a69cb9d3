"""The router's HTTP/1.1 client (router/http1.py) against a real socket server: kept-alive
connections are reused, and a connection the worker closes is freed at once (no reference
cycle left for the garbage collector, whose pauses are the router's tail latency)."""

from __future__ import annotations

import asyncio
import gc

from splitserve.router.http1 import Pool


async def _serve(keep_alive: bool) -> tuple[asyncio.Server, int, list[int]]:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            tail = b"" if keep_alive else b"Connection: close\r\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + tail + b"\r\nok")
            await writer.drain()
            if not keep_alive:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


def _requests(keep_alive: bool, n: int) -> tuple[list[bytes], int]:
    async def main() -> tuple[list[bytes], int]:
        server, port, connections = await _serve(keep_alive)
        pool = Pool(connect_timeout_s=5)
        bodies = []
        for _ in range(n):
            response = await pool.post("127.0.0.1", port, "/prefill", b"{}", timeout=5)
            bodies.append(await response.read(5))
            response.close()
            await asyncio.sleep(0.01)  # the server's close reaches the client
        pool.close()
        server.close()
        await server.wait_closed()
        return bodies, len(connections)

    return asyncio.run(main())


def test_kept_alive_connections_are_reused() -> None:
    bodies, connections = _requests(keep_alive=True, n=10)
    assert bodies == [b"ok"] * 10 and connections == 1


def test_connections_the_worker_closes_leave_no_cyclic_garbage() -> None:
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds, to name it
    try:
        bodies, connections = _requests(keep_alive=False, n=30)
        gc.collect()
        ours = sorted({type(o).__qualname__ for o in gc.garbage
                       if type(o).__module__ in ("splitserve.router.http1", "httptools.parser.parser")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert bodies == [b"ok"] * 30 and connections == 30
    # (asyncio's own selector transports make cycles of their own; the router runs on uvloop)
    assert ours == [], f"closed connections left cycles through {ours}"
