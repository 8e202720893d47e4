"""A lean HTTP/1.1 keep-alive client for the scheduler -> engine hops.

Why not aiohttp's client: each request through it costs about 90 us of CPU (tracing hooks,
cookie and header machinery, timers), and every scheduled request makes two upstream calls, so
it was the largest share of the scheduler's per-request cost. The engines (vLLM behind uvicorn)
speak plain HTTP/1.1: JSON answers with Content-Length, SSE streams with chunked encoding. This
client does just that: one pool of idle connections per engine, one write per request, an
incremental response parser, back-pressure on streams, and closing the connection to abort a
request (which is how vLLM learns the client left).

A reused idle connection can race the server's keep-alive timeout (uvicorn closes after 5 s);
if it dies before any response byte arrives, the request is retried once on a new connection,
and idle connections older than ``max_idle_s`` are not reused at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 64 * 1024
HIGH_WATER = 1 << 20  # buffered stream bytes before we stop reading from the engine
LOW_WATER = 1 << 18


class UpstreamClosed(ConnectionError):
    """The connection ended before a complete response (``partial``: some of it had arrived)."""

    def __init__(self, message: str, partial: bool) -> None:
        super().__init__(message)
        self.partial = partial


class UpstreamProtocolError(ConnectionError):
    """The engine's answer is not HTTP/1.1 we understand."""


class UpstreamTimeout(TimeoutError):
    """The request ran past its deadline, or the engine went silent for too long."""


@dataclass(slots=True)
class _Response:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    keep_alive: bool = True


class _Connection(asyncio.Protocol):
    """One TCP connection; parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._buf = bytearray()
        self._state = "idle"  # idle | head | body_length | chunk_size | chunk_data | chunk_trailer | body_eof | done
        self._remaining = 0
        self._resp = _Response()
        self._head_waiter: asyncio.Future[_Response] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._got_bytes = False
        # Timeouts are enforced by UpstreamPool.expire (a periodic sweep), not a timer per
        # request: arming and cancelling a timer costs more than the rest of the bookkeeping.
        self.deadline = float("inf")
        self.idle_timeout: float | None = None
        self.last_activity = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == "body_eof":
            self._state = "done"  # a body delimited by the connection's end is complete
        elif self._state not in ("idle", "done"):
            self._fail(UpstreamClosed(str(exc) if exc else "connection closed", self._got_bytes))
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._state in ("idle", "done"):
            self.abort()  # bytes nobody asked for: this connection can no longer be trusted
            return
        self._got_bytes = True
        self.last_activity = self.loop.time()
        self._buf += data
        try:
            self._parse()
        except UpstreamProtocolError as exc:
            self._fail(exc)
            self.abort()

    # -- requests ---------------------------------------------------------------------------
    def send(self, payload: bytes, timeout: float | None, idle_timeout: float | None) -> asyncio.Future[_Response]:
        now = self.loop.time()
        self.last_activity = now
        self.deadline = float("inf") if timeout is None else now + timeout
        self.idle_timeout = idle_timeout
        self._state = "head"
        self._buf.clear()
        self._chunks.clear()
        self._buffered = 0
        self._error = None
        self._got_bytes = False
        self._resp = _Response()
        self._head_waiter = self.loop.create_future()
        self.transport.write(payload)  # type: ignore[union-attr]
        return self._head_waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def busy(self) -> bool:
        return not self.closed and self._state not in ("idle", "done")

    def expire(self, now: float) -> None:
        """Fail the request if it is past its deadline or silent for too long."""
        idle = self.idle_timeout
        if now > self.deadline or (idle is not None and now - self.last_activity > idle):
            self._fail(UpstreamTimeout("engine did not answer in time"))
            self._wake()
            self.abort()

    @property
    def reusable(self) -> bool:
        return self._state == "done" and self._resp.keep_alive and not self.closed and not self._buf

    # -- parsing ----------------------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise UpstreamProtocolError("response headers too large")
                    return
                self._parse_head(bytes(buf[:end]))
                del buf[: end + 4]
                if self._head_waiter is not None and not self._head_waiter.done():
                    self._head_waiter.set_result(self._resp)
            elif state == "body_length":
                take = min(self._remaining, len(buf))
                if take:
                    self._push(bytes(buf[:take]))
                    del buf[:take]
                    self._remaining -= take
                if self._remaining == 0:
                    self._finish()
                return
            elif state == "body_eof":
                if buf:
                    self._push(bytes(buf))
                    buf.clear()
                return
            elif state == "chunk_size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                try:
                    size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise UpstreamProtocolError("bad chunk size") from None
                del buf[: end + 2]
                self._remaining = size
                self._state = "chunk_data" if size else "chunk_trailer"
            elif state == "chunk_data":
                if len(buf) < self._remaining + 2:
                    return
                self._push(bytes(buf[: self._remaining]))
                del buf[: self._remaining + 2]
                self._state = "chunk_size"
            elif state == "chunk_trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish()
                    return
            else:
                return

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise UpstreamProtocolError(f"bad status line {lines[0][:80]!r}")
        resp = self._resp
        resp.status = int(parts[1])
        headers = resp.headers
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        conn = headers.get(b"connection", b"").lower()
        resp.keep_alive = conn != b"close" and parts[0] == b"HTTP/1.1"
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._state = "chunk_size"
        elif b"content-length" in headers:
            self._remaining = int(headers[b"content-length"])
            self._state = "body_length" if self._remaining else "done"
        elif resp.status in (204, 304) or 100 <= resp.status < 200:
            self._state = "done"
        else:
            resp.keep_alive = False
            self._state = "body_eof"

    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._state = "done"
        self.idle_since = self.loop.time()
        self._wake()

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(exc)

    def _wake(self) -> None:
        w = self._data_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- body reading (used by UpstreamResponse) --------------------------------------------
    async def next_chunk(self) -> bytes | None:
        """The next body bytes, or None at the end of the body."""
        while not self._chunks:
            if self._state == "done":
                return None
            if self._error is not None:
                raise self._error
            self._data_waiter = self.loop.create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._paused and self._buffered < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data


class UpstreamResponse:
    """Status and headers are known; the body is read with ``read`` or ``iter_chunks``.
    Exactly one of ``release`` (body fully read) or ``close`` (abort) must end it."""

    __slots__ = ("status", "headers", "_conn", "_pool")

    def __init__(self, conn: _Connection, pool: UpstreamPool, resp: _Response) -> None:
        self.status = resp.status
        self.headers = resp.headers
        self._conn: _Connection | None = conn
        self._pool = pool

    async def read(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise UpstreamClosed("response already closed", True)
        parts = []
        while (chunk := await conn.next_chunk()) is not None:
            parts.append(chunk)
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def next_chunk(self) -> bytes | None:
        """The next body bytes, or None at the end of the body (which releases the response)."""
        conn = self._conn
        if conn is None:
            return None
        chunk = await conn.next_chunk()
        if chunk is None:
            self.release()
        return chunk

    async def iter_chunks(self):  # type: ignore[no-untyped-def]
        conn = self._conn
        if conn is None:
            return
        while (chunk := await conn.next_chunk()) is not None:
            yield chunk
        self.release()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.put_back(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


class UpstreamPool:
    """Idle keep-alive connections to one engine."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 5.0,
                 max_idle: int = 256, max_idle_s: float = 4.0) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.max_idle_s = max_idle_s
        self._idle: list[_Connection] = []
        self._active: set[_Connection] = set()
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(loop), self.host, self.port),
            self.connect_timeout,
        )
        return conn

    def _take_idle(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.max_idle_s:
                return conn
            conn.abort()
        return None

    def expire(self, now: float) -> None:
        """Time out overdue requests and drop stale idle connections (called periodically)."""
        keep: list[_Connection] = []
        for conn in self._idle:
            if not conn.closed and now - conn.idle_since < self.max_idle_s:
                keep.append(conn)
            else:
                conn.abort()
        self._idle = keep
        for conn in list(self._active):
            if conn.busy:
                conn.expire(now)
            else:
                self._active.discard(conn)

    def put_back(self, conn: _Connection) -> None:
        self._active.discard(conn)
        if conn.reusable and len(self._idle) < self.max_idle:
            conn._state = "idle"
            self._idle.append(conn)
        else:
            conn.abort()

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: bytes = b"application/json", timeout: float | None = None,
                      idle_timeout: float | None = None) -> UpstreamResponse:  # fmt: skip
        """Send one request; returns once the response headers are in.

        ``timeout`` bounds the whole exchange, ``idle_timeout`` the silence between two reads
        (both enforced by ``expire``). Raises ``OSError`` if the engine cannot be reached,
        ``UpstreamClosed`` if the connection dies before the headers arrive, and
        ``UpstreamTimeout``."""
        payload = b"".join((
            f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header,
            b"Content-Type: ", content_type, b"\r\nContent-Length: ", str(len(body)).encode(),
            b"\r\n\r\n", body,
        ))  # fmt: skip
        conn = self._take_idle()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect()
            self._active.add(conn)
            try:
                head = await conn.send(payload, timeout, idle_timeout)
            except UpstreamClosed as exc:
                conn.abort()
                if reused and not exc.partial:  # the keep-alive race: retry on a new connection
                    conn, reused = None, False
                    continue
                raise
            except BaseException:  # cancelled (client gone) or timed out: abort the request
                conn.abort()
                raise
            return UpstreamResponse(conn, self, head)

    def abort_active(self) -> int:
        """Abort every request in flight on this pool (the engine is being given up on); each
        waiter sees ``UpstreamClosed``. Returns how many were aborted."""
        busy = [conn for conn in self._active if conn.busy]
        for conn in busy:
            conn.abort()
        return len(busy)

    def close(self) -> None:
        for conn in (*self._idle, *self._active):
            conn.abort()
        self._idle.clear()
        self._active.clear()
