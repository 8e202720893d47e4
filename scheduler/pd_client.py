"""The prefill -> decode handoff against vLLM, and the relay of the answer to the client.

Per request (the flow vLLM's NixlConnector expects):
1. wait for a prefill instance (Scheduler.acquire_prefill: late dispatch may queue us);
2. POST the request there with max_tokens=1, stream=false and
   ``kv_transfer_params: {"do_remote_decode": true}``; the answer carries the
   ``kv_transfer_params`` (remote engine, block ids, host, port) the decode engine needs;
3. pick a decode instance (decode policy), POST the *original* request there with those
   ``kv_transfer_params``; it pulls the KV over NIXL and generates;
4. relay its answer: SSE chunks passed through byte for byte, or the JSON body as is.

Upstream calls go through scheduler.upstream (keep-alive pools, far cheaper than aiohttp's
client). If the client disconnects, aiohttp cancels the handler; every upstream response is
closed on the way out, which makes vLLM abort the request, and the router forgets it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from scheduler import errors
from scheduler.upstream import UpstreamClosed, UpstreamPool, UpstreamProtocolError, UpstreamResponse
from scheduler.validation import GenerationRequest

if TYPE_CHECKING:
    from dualmap_pd.request import RoutedRequest
    from scheduler.service import Scheduler, SchedulerOptions

log = logging.getLogger(__name__)
_encode = msgspec.json.encode
_decode = msgspec.json.decode
PREFILL_HEADER = "X-DualMap-Prefill-Instance"
DECODE_HEADER = "X-DualMap-Decode-Instance"
# One retry on another instance when the chosen one refuses connections (it is down).
PREFILL_ATTEMPTS = 2
DECODE_ATTEMPTS = 2


@dataclass(slots=True)
class PrefillResult:
    kv_transfer_params: dict[str, Any] | None
    engine_cached_tokens: int | None  # what the engine says it found in its prefix cache


class InstanceUnreachable(Exception):
    """The instance refused or dropped the connection before answering (it is down)."""


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


async def _read(upstream: UpstreamResponse, headers: dict[str, str]) -> bytes:
    try:
        return await upstream.read()
    except OSError as exc:  # reset, closed early, timed out (all OSError subclasses)
        raise errors.upstream_failure("decode", headers[DECODE_HEADER], str(exc) or "timed out") from None


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

    async def healthy(self, base_url: str) -> bool:
        try:
            resp = await self._pool(base_url).request("GET", "/health", timeout=2.0)
            await resp.read()
            return resp.status == 200
        except OSError:  # refused, reset, closed, timed out (all OSError subclasses)
            return False

    async def prefill(self, base_url: str, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            resp = await self._pool(base_url).request(
                "POST", path, body, timeout=self._options.prefill_timeout_s
            )
            try:
                return resp.status, await resp.read()
            finally:
                resp.close()  # no-op once read; aborts the engine request otherwise
        except UpstreamClosed as exc:
            raise InstanceUnreachable(str(exc)) if not exc.partial else exc
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            raise InstanceUnreachable(str(exc)) from exc

    async def open_decode(self, base_url: str, path: str, body: bytes) -> UpstreamResponse:
        """The decode response, headers read; the caller must release or close it."""
        try:
            return await self._pool(base_url).request(
                "POST", path, body, idle_timeout=self._options.decode_idle_timeout_s
            )
        except UpstreamClosed as exc:
            raise InstanceUnreachable(str(exc)) if not exc.partial else exc
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            raise InstanceUnreachable(str(exc)) from exc


class PDHandoff:
    """Runs one request through prefill and decode for the web handlers."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def serve(self, http: web.Request, gen: GenerationRequest, arrival: float) -> web.StreamResponse:
        sched = self.scheduler
        routed = sched.new_request(gen.prompt_ids or [], gen.max_tokens, arrival)
        path = gen.endpoint.path
        prefill_instance, result, prefill_rtt = await self._prefill(routed, gen, path)
        if not gen.stream:
            sched.metrics.ttft_by_stream[False].observe(sched.clock() - arrival)
        body = decode_body(gen.body, result.kv_transfer_params)
        attempts_left = DECODE_ATTEMPTS
        while True:
            attempts_left -= 1
            decode_instance, load = sched.acquire_decode(routed)
            try:
                decode_started = sched.clock()
                try:
                    upstream = await sched.client.open_decode(sched.instance_url(decode_instance), path, body)
                except InstanceUnreachable as exc:
                    sched.mark_unhealthy(decode_instance)
                    if attempts_left > 0:
                        continue  # another decoder pulls the same KV from the prefill instance
                    raise errors.upstream_failure("decode", decode_instance, str(exc)) from None
                except OSError as exc:  # timed out, or reset after a partial answer
                    raise errors.upstream_failure("decode", decode_instance, str(exc) or "timed out") from None
                headers = {PREFILL_HEADER: prefill_instance, DECODE_HEADER: decode_instance}
                try:
                    # What the scheduler itself added so far: everything but the prefill round
                    # trip (parsing, tokenizing, late-dispatch queueing, routing).
                    overhead = decode_started - arrival - prefill_rtt
                    return await self._answer(http, gen, upstream, headers, arrival, overhead)
                finally:
                    upstream.close()  # no-op once released; aborts the engine request otherwise
            finally:
                sched.release_decode(decode_instance, load)

    async def _answer(self, http: web.Request, gen: GenerationRequest, upstream: UpstreamResponse,
                      headers: dict[str, str], arrival: float, overhead: float) -> web.StreamResponse:  # fmt: skip
        if upstream.status != 200:
            raise errors.from_upstream("decode", upstream.status, await _read(upstream, headers))
        if gen.stream:
            return await self._relay_stream(http, upstream, headers, arrival)
        sched = self.scheduler
        data = await _read(upstream, headers)
        sched.metrics.e2e_by_stream[False].observe(sched.clock() - arrival)
        sched.metrics.overhead_series.observe(max(0.0, overhead))
        headers["Content-Type"] = "application/json"
        return web.Response(body=data, headers=headers)

    async def _prefill(self, routed: RoutedRequest, gen: GenerationRequest,
                       path: str) -> tuple[str, PrefillResult, float]:  # fmt: skip
        """Queue, send and finish the prefill leg; returns (instance, result, round trip)."""
        sched = self.scheduler
        body = prefill_body(gen.body)
        attempts_left = PREFILL_ATTEMPTS
        while True:
            attempts_left -= 1
            instance = await sched.acquire_prefill(routed)
            predicted_hit = sched.predicted_hit_tokens(instance, routed)
            started = sched.clock()
            try:
                status, raw = await sched.client.prefill(sched.instance_url(instance), path, body)
            except InstanceUnreachable as exc:
                sched.abort_prefill(routed)
                sched.mark_unhealthy(instance)
                if attempts_left > 0:
                    continue  # re-admitted: the router now skips the dead instance
                raise errors.upstream_failure("prefill", instance, str(exc)) from None
            except (asyncio.TimeoutError, OSError) as exc:
                sched.abort_prefill(routed)
                raise errors.upstream_failure("prefill", instance, str(exc) or "timed out") from None
            except BaseException:
                sched.abort_prefill(routed)  # cancelled: the client is gone
                raise
            if status != 200:
                sched.abort_prefill(routed)
                raise errors.from_upstream("prefill", status, raw)
            try:
                result = parse_prefill(raw)
            except ValueError as exc:
                sched.abort_prefill(routed)
                raise errors.upstream_failure("prefill", instance, str(exc)) from None
            rtt = sched.clock() - started
            sched.complete_prefill(routed, instance, rtt, predicted_hit, result.engine_cached_tokens)
            if result.kv_transfer_params is None:
                sched.metrics.error("missing_kv_transfer_params")
            return instance, result, rtt

    async def _relay_stream(self, http: web.Request, upstream: UpstreamResponse,
                            headers: dict[str, str], arrival: float) -> web.StreamResponse:  # fmt: skip
        sched = self.scheduler
        out = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await out.prepare(http)
        first = True
        try:
            async for chunk in upstream.iter_chunks():
                if first:
                    sched.metrics.ttft_by_stream[True].observe(sched.clock() - arrival)
                    first = False
                await out.write(chunk)
        except (UpstreamClosed, UpstreamProtocolError, asyncio.TimeoutError) as exc:
            # Headers are sent: the only way left to report is an SSE error event, as vLLM does.
            sched.metrics.error("upstream_decode_stream")
            err = errors.upstream_failure("decode", headers[DECODE_HEADER], str(exc) or "stream broke")
            await out.write(b"data: " + err.to_bytes() + b"\n\ndata: [DONE]\n\n")
        await out.write_eof()
        sched.metrics.e2e_by_stream[True].observe(sched.clock() - arrival)
        return out
