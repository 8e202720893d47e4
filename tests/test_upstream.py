"""The lean upstream HTTP client against a raw TCP server that answers with crafted bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from scheduler.dispatch.upstream import UpstreamClosed, UpstreamPool, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.base_events.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), timeout=10))


def test_content_length_and_chunked_bodies_split_across_packets_on_one_connection() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b" world")
        await read_request(reader)
        # chunked, with chunk boundaries falling inside sizes and CRLFs
        for piece in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r", b"\nda", b"ta:\r\n",
                      b"3\r\n x\n\r\n0\r\n", b"\r\n"):  # fmt: skip
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        await reader.read()

    async def body() -> None:
        server, port = await serve(handler)
        pool = UpstreamPool("127.0.0.1", port)
        resp = await pool.request("POST", "/a", b"{}")
        assert resp.status == 200 and await resp.read() == b"hello world"
        resp = await pool.request("POST", "/b", b"{}")
        chunks = [c async for c in resp.iter_chunks()]
        assert b"".join(chunks) == b"data: x\n"
        assert connections == 1  # keep-alive reused the connection
        pool.close()
        server.close()

    run(body)


def test_idle_connection_closed_by_the_server_is_retried_on_a_new_one() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # like uvicorn's keep-alive timeout, but without Connection: close

    async def body() -> None:
        server, port = await serve(handler)
        pool = UpstreamPool("127.0.0.1", port)
        for _ in range(3):
            resp = await pool.request("POST", "/", b"{}")
            assert await resp.read() == b"ok"
            await asyncio.sleep(0.05)  # let the close arrive, or race it: both must work
        assert served == 3
        pool.close()
        server.close()

    run(body)


def test_connection_dropped_mid_body_raises_partial_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        writer.transport.abort()

    async def body() -> None:
        server, port = await serve(handler)
        pool = UpstreamPool("127.0.0.1", port)
        resp = await pool.request("POST", "/", b"{}")
        got = []
        with pytest.raises(UpstreamClosed) as info:
            async for chunk in resp.iter_chunks():
                got.append(chunk)
        assert got == [b"abc"] and info.value.partial
        pool.close()
        server.close()

    run(body)


def test_silent_engine_times_out_through_the_sweep_and_refused_connect_is_oserror() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    async def body() -> None:
        server, port = await serve(handler)
        pool = UpstreamPool("127.0.0.1", port)
        pending = asyncio.create_task(pool.request("POST", "/", b"{}", timeout=0.05))
        await asyncio.sleep(0.1)
        pool.expire(asyncio.get_running_loop().time())
        with pytest.raises(UpstreamTimeout):
            await pending
        server.close()
        await server.wait_closed()
        with pytest.raises(OSError):
            await pool.request("POST", "/", b"{}")
        pool.close()

    run(body)
