"""The prefill -> decode handoff against vLLM, and the relay of the answer to the client.

Per request (the flow vLLM's NixlConnector expects):
1. wait for a prefill instance (Scheduler.acquire_prefill: late dispatch may queue us);
2. POST the request there with max_tokens=1, stream=false and
   ``kv_transfer_params: {"do_remote_decode": true}``; the answer carries the
   ``kv_transfer_params`` (remote engine, block ids, host, port) the decode engine needs;
3. pick a decode instance (decode policy), POST the *original* request there with those
   ``kv_transfer_params``; it pulls the KV over NIXL and generates;
4. relay its answer: SSE chunks passed through byte for byte, or the JSON body as is.

Upstream calls go through scheduler.dispatch.upstream (keep-alive pools, far cheaper than aiohttp's
client). If the client disconnects, aiohttp cancels the handler; every upstream response is
closed on the way out, which makes vLLM abort the request, and the router forgets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from scheduler.http import errors
from scheduler.dispatch.upstream import (
    UpstreamClosed,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)
from scheduler.http.validation import GenerationRequest

if TYPE_CHECKING:
    from dualmap_pd.request import RoutedRequest
    from scheduler.ports import RequestLifecycle
    from scheduler.config import SchedulerOptions

log = logging.getLogger(__name__)
_encode = msgspec.json.encode
_decode = msgspec.json.decode
PREFILL_HEADER = "X-DualMap-Prefill-Instance"
DECODE_HEADER = "X-DualMap-Decode-Instance"
# One retry on another instance when the chosen one refuses connections (it is down).
PREFILL_ATTEMPTS = 2
DECODE_ATTEMPTS = 2
# Answers that say the engine's server cannot serve at all (vLLM: 503 once its engine died; a
# proxy in front: 502/504). They count against the instance's circuit and are retried. A plain
# 500 is not: vLLM answers it for one request's internal error, and counting it would let a
# client take every instance out of service with a few crafted requests.
ENGINE_DOWN_STATUSES = frozenset((502, 503, 504))


@dataclass(slots=True)
class PrefillResult:
    kv_transfer_params: dict[str, Any] | None
    engine_cached_tokens: int | None  # what the engine says it found in its prefix cache


class InstanceUnreachable(Exception):
    """The instance refused, dropped or broke the connection (it is down, or died mid-answer).

    ``request_sent``: the request may have reached the engine (so a decode leg may have read the
    prefill's KV, and that KV may already be freed). ``answered``: part of an answer had arrived,
    so the server was alive and this may be one request's crash rather than the instance's."""

    def __init__(self, message: str, *, request_sent: bool, answered: bool = False) -> None:
        super().__init__(message)
        self.request_sent = request_sent
        self.answered = answered


def _unreachable(exc: OSError) -> InstanceUnreachable:
    """What a connection error on a request to an engine says about the instance."""
    if isinstance(exc, (UpstreamClosed, UpstreamProtocolError)):  # the request went out
        answered = isinstance(exc, UpstreamProtocolError) or exc.partial
        return InstanceUnreachable(str(exc), request_sent=True, answered=answered)
    # Refused, unreachable, connect timed out: nothing was sent.
    return InstanceUnreachable(str(exc) or "connect timed out", request_sent=False)


class DecodeLegFailed(Exception):
    """The decode leg failed before the client saw a byte: it may be retried elsewhere."""

    def __init__(self, error: errors.ApiError, *, kv_maybe_read: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.kv_maybe_read = kv_maybe_read


def prefill_body(body: dict[str, Any]) -> bytes:
    """The prefill leg: one token, not streamed, KV kept for a remote decode."""
    leg = dict(body)
    leg["max_tokens"] = 1
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    leg["stream"] = False
    leg.pop("stream_options", None)
    leg.pop("min_tokens", None)  # would exceed max_tokens=1 and be rejected
    leg["kv_transfer_params"] = {"do_remote_decode": True}
    return _encode(leg)


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> bytes:
    if kv_transfer_params is None:
        return _encode(body)  # the decode engine recomputes the prompt: slower, still correct
    leg = dict(body)
    leg["kv_transfer_params"] = kv_transfer_params
    return _encode(leg)


def parse_prefill(raw: bytes) -> PrefillResult:
    try:
        data = _decode(raw)
    except msgspec.DecodeError:
        data = None
    if not isinstance(data, dict):
        raise ValueError("prefill answer is not a JSON object")
    kv = data.get("kv_transfer_params")
    cached: int | None = None
    usage = data.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        cached = details["cached_tokens"]
    elif isinstance(kv, dict) and isinstance(kv.get("remote_prefill_cached_tokens"), int):
        # vLLM's NixlConnector reports the prefill's prefix-cache hit here even when
        # --enable-prompt-tokens-details is off.
        cached = kv["remote_prefill_cached_tokens"]
    return PrefillResult(kv if isinstance(kv, dict) else None, cached)


class PDClient:
    """Upstream HTTP to the vLLM engines: one keep-alive connection pool per engine, and one
    sweeper task that times out overdue requests."""

    SWEEP_INTERVAL_S = 0.5

    def __init__(self, options: SchedulerOptions) -> None:
        self._options = options
        self._pools: dict[str, UpstreamPool] = {}
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="upstream-sweep")

    def _pool(self, base_url: str) -> UpstreamPool:
        pool = self._pools.get(base_url)
        if pool is None:
            parts = urlsplit(base_url)
            pool = UpstreamPool(
                parts.hostname or "127.0.0.1", parts.port or 80,
                connect_timeout=self._options.connect_timeout_s,
                max_idle=self._options.max_connections,
            )  # fmt: skip
            self._pools[base_url] = pool
        return pool

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.SWEEP_INTERVAL_S)
            now = loop.time()
            for pool in self._pools.values():
                pool.expire(now)

    async def close(self) -> None:
        self._sweeper.cancel()
        await asyncio.gather(self._sweeper, return_exceptions=True)
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def abort_active(self, base_url: str) -> None:
        """Abort every request in flight to one engine (its circuit opened)."""
        pool = self._pools.get(base_url)
        if pool is not None:
            pool.abort_active()

    async def healthy(self, base_url: str) -> bool:
        try:
            resp = await self._pool(base_url).request("GET", "/health", timeout=2.0)
            await resp.read()
            return resp.status == 200
        except OSError:  # refused, reset, closed, timed out (all OSError subclasses)
            return False

    async def prefill(self, base_url: str, path: str, body: bytes) -> tuple[int, bytes]:
        """Status and body. Raises InstanceUnreachable, or UpstreamTimeout past the deadline."""
        try:
            resp = await self._pool(base_url).request(
                "POST", path, body, timeout=self._options.prefill_timeout_s
            )
            try:
                return resp.status, await resp.read()
            finally:
                resp.close()  # no-op once read; aborts the engine request otherwise
        except UpstreamTimeout:
            raise
        except OSError as exc:
            raise _unreachable(exc) from exc

    async def open_decode(self, base_url: str, path: str, body: bytes) -> UpstreamResponse:
        """The decode response, headers read; the caller must release or close it."""
        try:
            return await self._pool(base_url).request(
                "POST", path, body, idle_timeout=self._options.decode_idle_timeout_s
            )
        except UpstreamTimeout:
            raise
        except OSError as exc:
            raise _unreachable(exc) from exc


class PDHandoff:
    """Runs one request through prefill and decode for the web handlers.

    Failures (docs/fault_handling.md): a prefill leg that breaks or answers 502/503/504 is retried (the
    circuit of a dead instance opens, so the retry falls to the request's backup candidate); a
    decode leg that fails before the client saw a byte is retried on another decoder, after a
    fresh prefill when the failed decoder may have read (and so freed) the prefill's KV; once
    streaming began, the client gets an SSE error event (OpenAI error object), then ``[DONE]``.
    """

    def __init__(self, scheduler: RequestLifecycle) -> None:
        self.scheduler = scheduler

    async def serve(self, http: web.Request, gen: GenerationRequest, arrival: float) -> web.StreamResponse:
        sched = self.scheduler
        routed = sched.new_request(gen.prompt_ids or [], gen.max_tokens, arrival)
        path = gen.endpoint.path
        prefill_instance, result, prefill_rtt = await self._prefill(routed, gen, path)
        if not gen.stream:
            sched.metrics.ttft_by_stream[False].observe(sched.clock() - arrival)
        attempts_left = DECODE_ATTEMPTS
        failed_decoders: list[str] = []
        while True:
            attempts_left -= 1
            body = decode_body(gen.body, result.kv_transfer_params)
            decode_instance, load = sched.acquire_decode(routed, avoid=failed_decoders)
            headers = {PREFILL_HEADER: prefill_instance, DECODE_HEADER: decode_instance}
            try:
                # What the scheduler itself added so far: everything but the prefill round
                # trip (parsing, tokenizing, late-dispatch queueing, routing).
                overhead = sched.clock() - arrival - prefill_rtt
                return await self._decode(http, gen, body, headers, arrival, overhead)
            except DecodeLegFailed as failed:
                if attempts_left <= 0:
                    raise failed.error from None
                sched.metrics.error("decode_retried")
                failed_decoders.append(decode_instance)
                reprefill = failed.kv_maybe_read
            finally:
                sched.release_decode(decode_instance, load)
            if reprefill:
                sched.metrics.error("decode_reprefilled")
                prefill_instance, result, rtt = await self._prefill(routed, gen, path)
                prefill_rtt += rtt

    async def _decode(self, http: web.Request, gen: GenerationRequest, body: bytes,
                      headers: dict[str, str], arrival: float, overhead: float) -> web.StreamResponse:  # fmt: skip
        sched = self.scheduler
        instance = headers[DECODE_HEADER]
        try:
            upstream = await sched.client.open_decode(sched.instance_url(instance), gen.endpoint.path, body)
        except InstanceUnreachable as exc:
            sched.health.report_failure(instance, "connect", hard=not exc.answered)
            raise DecodeLegFailed(errors.upstream_failure("decode", instance, str(exc)),
                                  kv_maybe_read=exc.request_sent) from None  # fmt: skip
        except UpstreamTimeout:
            sched.health.report_failure(instance, "timeout")
            raise DecodeLegFailed(errors.upstream_timeout("decode", instance), kv_maybe_read=True) from None
        try:
            if upstream.status != 200:
                raw = await self._leg_bytes(upstream, instance, whole=True)
                if upstream.status not in ENGINE_DOWN_STATUSES:  # this request's own failure
                    raise errors.from_upstream("decode", upstream.status, raw)
                sched.health.report_failure(instance, f"http_{upstream.status}")
                raise DecodeLegFailed(errors.from_upstream("decode", upstream.status, raw), kv_maybe_read=True)
            if gen.stream:
                # The first chunk is read before the client's headers go out: until then a
                # failure can still be retried invisibly.
                first = await self._leg_bytes(upstream, instance, whole=False)
                sched.health.report_success(instance)
                return await self._relay_stream(http, upstream, first, headers, arrival)
            data = await self._leg_bytes(upstream, instance, whole=True)
            sched.health.report_success(instance)
            sched.metrics.e2e_by_stream[False].observe(sched.clock() - arrival)
            sched.metrics.overhead_series.observe(max(0.0, overhead))
            headers["Content-Type"] = "application/json"
            return web.Response(body=data, headers=headers)
        finally:
            upstream.close()  # no-op once released; aborts the engine request otherwise

    async def _leg_bytes(self, upstream: UpstreamResponse, instance: str, *, whole: bool) -> bytes:
        """The whole body, or its first chunk (b"" for an empty body); failures as DecodeLegFailed."""
        try:
            if whole:
                return await upstream.read()
            return await upstream.next_chunk() or b""
        except UpstreamTimeout:
            self.scheduler.health.report_failure(instance, "timeout")
            raise DecodeLegFailed(errors.upstream_timeout("decode", instance), kv_maybe_read=True) from None
        except OSError as exc:  # closed or garbled mid-body: the engine (or its handler) died
            # Soft: a handler crashing on one request also drops its connection mid-answer, and
            # a client must not be able to open circuits with crafted requests. A dead process
            # refuses the next connection (hard) and fails its probes anyway.
            self.scheduler.health.report_failure(instance, "stream")
            err = errors.upstream_failure("decode", instance, str(exc) or "connection closed")
            raise DecodeLegFailed(err, kv_maybe_read=True) from None

    async def _prefill(self, routed: RoutedRequest, gen: GenerationRequest,
                       path: str) -> tuple[str, PrefillResult, float]:  # fmt: skip
        """Queue, send and finish the prefill leg; returns (instance, result, round trip)."""
        sched = self.scheduler
        body = prefill_body(gen.body)
        attempts_left = PREFILL_ATTEMPTS
        while True:
            attempts_left -= 1
            instance = await sched.acquire_prefill(routed)
            if instance not in sched.view or instance not in sched.urls:
                # Removed (admin API) between its dispatch and now: not a failure of the
                # request or the instance; send it again, to the instances that remain.
                sched.abort_prefill(routed)
                attempts_left += 1
                continue
            predicted_hit = sched.predicted_hit_tokens(instance, routed)
            started = sched.clock()
            try:
                status, raw = await sched.client.prefill(sched.instance_url(instance), path, body)
            except InstanceUnreachable as exc:
                sched.abort_prefill(routed)
                sched.health.report_failure(instance, "connect", hard=not exc.answered)
                failure = errors.upstream_failure("prefill", instance, str(exc))
            except UpstreamTimeout:
                sched.abort_prefill(routed)
                sched.health.report_failure(instance, "timeout")
                raise errors.upstream_timeout("prefill", instance) from None
            except BaseException:
                sched.abort_prefill(routed)  # cancelled: the client is gone
                raise
            else:
                if status == 200:
                    return self._finish_prefill(routed, instance, raw, started, predicted_hit)
                sched.abort_prefill(routed)
                if status not in ENGINE_DOWN_STATUSES:  # this request's own failure
                    raise errors.from_upstream("prefill", status, raw)
                sched.health.report_failure(instance, f"http_{status}")
                failure = errors.from_upstream("prefill", status, raw)
            if attempts_left <= 0:
                raise failure
            sched.metrics.error("prefill_retried")  # re-admitted: an open circuit is skipped

    def _finish_prefill(self, routed: RoutedRequest, instance: str, raw: bytes, started: float,
                        predicted_hit: int) -> tuple[str, PrefillResult, float]:  # fmt: skip
        sched = self.scheduler
        try:
            result = parse_prefill(raw)
        except ValueError as exc:
            sched.abort_prefill(routed)
            raise errors.upstream_failure("prefill", instance, str(exc)) from None
        sched.health.report_success(instance)
        rtt = sched.clock() - started
        sched.complete_prefill(routed, instance, rtt, predicted_hit, result.engine_cached_tokens)
        if result.kv_transfer_params is None:
            sched.metrics.error("missing_kv_transfer_params")
        return instance, result, rtt

    async def _relay_stream(self, http: web.Request, upstream: UpstreamResponse, first: bytes,
                            headers: dict[str, str], arrival: float) -> web.StreamResponse:  # fmt: skip
        sched = self.scheduler
        out = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await out.prepare(http)
        first_at = sched.clock()
        sched.metrics.ttft_by_stream[True].observe(first_at - arrival)
        instance = headers[DECODE_HEADER]
        tail = b""  # the last bytes relayed: has the client been sent the final [DONE]?
        events = 0  # SSE events after the first chunk (each ends with a blank line): for TPOT
        try:
            try:
                await out.write(first)
                async for chunk in upstream.iter_chunks():
                    events += chunk.count(b"\n\n")
                    if not http.get(ANSWER_DELIVERED) and _ends_with_done(tail := (tail + chunk)[-DONE_TAIL:]):
                        # The whole answer is out once [DONE] is: a client that hangs up now
                        # (they do, without waiting for the chunked trailer) got everything.
                        # Marked before the write (a cancel while it drains comes after the
                        # bytes went to the socket), unless the client is gone already.
                        transport = http.transport
                        if transport is not None and not transport.is_closing():
                            self._delivered(http, arrival, first_at, events)
                    await out.write(chunk)
                if not http.get(ANSWER_DELIVERED):
                    self._delivered(http, arrival, first_at, events)  # an engine that ends without [DONE]
            except (UpstreamClosed, UpstreamProtocolError, asyncio.TimeoutError) as exc:
                if http.get(ANSWER_DELIVERED):  # broke after [DONE]: the client has it all
                    return out
                # Headers are sent: the only way left to report is an SSE error event, as vLLM does.
                sched.metrics.error("upstream_decode_stream")
                # Soft evidence either way (see _leg_bytes).
                sched.health.report_failure(instance, "timeout" if isinstance(exc, asyncio.TimeoutError) else "stream")
                err = errors.upstream_failure("decode", instance, str(exc) or "stream broke")
                http[ANSWER_DELIVERED] = True  # ended, with its error: not a disconnect either
                http[RELAY_OUTCOME] = "error"
                await out.write(b"data: " + err.to_bytes() + b"\n\ndata: [DONE]\n\n")
            await out.write_eof()
        except ConnectionResetError:
            # The client left. After the end of the answer nothing was lost. Before it, that is
            # its choice, not an error of ours: the caller closes the upstream response, which
            # aborts the engine's request; aiohttp ends the connection (raising would make it
            # log an error).
            if not http.get(ANSWER_DELIVERED):
                http[RELAY_OUTCOME] = "cancelled"
                sched.metrics.error("client_disconnected")
        return out

    def _delivered(self, http: web.Request, arrival: float, first_at: float, events: int) -> None:
        """The client has the whole answer: count its end-to-end time and time per token."""
        http[ANSWER_DELIVERED] = True
        sched = self.scheduler
        end = sched.clock()
        sched.metrics.e2e_by_stream[True].observe(end - arrival)
        sched.metrics.stream_done(first_at, end, events)


DONE_TAIL = 32  # bytes kept to spot "data: [DONE]" split across chunks
# Set on the aiohttp request once the client has been sent the whole answer (the final
# ``data: [DONE]``): a hang-up after that is a finished request, not a client disconnect.
ANSWER_DELIVERED = web.RequestKey("dualmap_answer_delivered", bool)
# A streamed request's outcome when the relay ended it quietly but not well: "error" (an SSE
# error event after a broken decode stream) or "cancelled" (the client hung up mid-answer).
RELAY_OUTCOME = web.RequestKey("dualmap_relay_outcome", str)


async def _chunks_after(first: bytes, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    yield first
    async for chunk in upstream.iter_chunks():
        yield chunk


def _ends_with_done(tail: bytes) -> bool:
    return tail.rstrip().endswith(b"data: [DONE]")
