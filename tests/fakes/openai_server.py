"""A small fake OpenAI-compatible server that streams exactly like vLLM, for tests.

Serves ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` on 127.0.0.1 (port 0 by
default). Streaming responses follow vLLM's wire format: ``data: {json}\\n\\n`` chunks carrying
``choices[0].text`` (completions) or ``choices[0].delta.content`` (chat, after a role-only first
chunk), a final usage chunk with empty ``choices`` when ``stream_options.include_usage`` is set,
then ``data: [DONE]``.

Latency, the number of generated tokens and failures are configurable through
``FakeServerConfig``; ``fault_for`` picks a ``Fault`` per request from its JSON body, so a test
can make some requests fail and others succeed in one run. Every request body is recorded in
``FakeOpenAIServer.requests`` for assertions.

Non-streaming requests (``stream`` false or absent) get one JSON body, as vLLM answers them. A
request carrying ``kv_transfer_params: {"do_remote_decode": true}`` (the prefill leg of P/D) gets
``kv_transfer_params`` back in vLLM's NixlConnector shape, so a P/D proxy can be tested end to
end; ``disconnects`` counts requests whose client went away before the answer was complete.

With ``kv_block_size`` set, token-id prompts also go through a small model of vLLM's prefix cache
and NixlConnector, enough to test KV migration between two fake prefill servers: each server
remembers the full blocks it computed, the prefill leg reports ``remote_prefill_cached_tokens``,
a request carrying ``do_remote_prefill`` params "pulls" the blocks it does not hold (one NIXL
transfer of ``kv_bytes_per_block`` per block, the partial last block included, as vLLM reads
it), and ``GET /metrics`` serves the resulting ``vllm:prefix_cache_*`` and ``vllm:nixl_*``
series in vLLM 0.32's exposition format.

Use ``async with FakeOpenAIServer(config) as server:`` inside a running loop, or
``with serve_in_thread(config) as server:`` from synchronous code (e.g. to test a CLI that calls
``asyncio.run`` itself).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

FAULT_KINDS = ("status", "hang", "stream_error", "disconnect")


@dataclass(frozen=True)
class Fault:
    """What goes wrong with one request.

    ``status``: reply ``status_code`` with a JSON error body; ``hang``: never answer (until the
    server stops); ``stream_error``: send ``after_tokens`` tokens then a vLLM error event;
    ``disconnect``: send ``after_tokens`` tokens then drop the connection without ``[DONE]``
    (not streamed: send the headers and part of the JSON body, then drop it).
    """

    kind: str
    status_code: int = 500
    after_tokens: int = 1

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class FakeServerConfig:
    model: str = "fake-model"
    first_token_delay_s: float = 0.0
    inter_token_delay_s: float = 0.0
    # None: generate exactly max_tokens (like ignore_eos); an int caps it (like an early EOS).
    max_generated_tokens: int | None = None
    prompt_tokens: int = 1  # reported in usage when the prompt is text (no tokenizer here)
    fault_for: Callable[[dict[str, Any]], Fault | None] | None = None
    # Prefix-cache / NIXL model for token-id prompts (None: off, the server stays stateless).
    kv_block_size: int | None = None
    kv_bytes_per_block: int = 0
    nixl_xfer_seconds: float = 0.001  # reported per simulated transfer
    # Pause between ``data: [DONE]`` and the end of the response: widens the window in which a
    # client that hangs up right after [DONE] is seen by the proxy before the stream ends.
    done_linger_s: float = 0.0


def fault_by_max_tokens(faults: dict[int, Fault]) -> Callable[[dict[str, Any]], Fault | None]:
    """A ``fault_for`` that chooses by the request's ``max_tokens`` (easy to set from a trace)."""

    def choose(body: dict[str, Any]) -> Fault | None:
        return faults.get(body.get("max_tokens", -1))

    return choose


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


@dataclass
class FakeKVState:
    """Cumulative counters a vLLM server exports, as the fake model of its cache moves them."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    nixl_transfers: int = 0
    nixl_bytes: int = 0
    nixl_xfer_seconds: float = 0.0
    nixl_failed: int = 0
    cached: set[tuple[int, ...]] = field(default_factory=set)  # full-block prefixes held

    def render(self, model: str) -> str:
        """The counters in vLLM 0.32's text format (prometheus_client 0.26 layout; histograms
        without their finite buckets)."""
        labels = f'engine="0",model_name="{model}"'
        out: list[str] = []
        for name, value in (
            ("vllm:prefix_cache_queries_total", self.prefix_cache_queries),
            ("vllm:prefix_cache_hits_total", self.prefix_cache_hits),
            ("vllm:nixl_num_failed_transfers_total", self.nixl_failed),
        ):
            out += [f"# TYPE {name} counter", f"{name}{{{labels}}} {float(value)}"]
        for name, total in (
            ("vllm:nixl_xfer_time_seconds", self.nixl_xfer_seconds),
            ("vllm:nixl_bytes_transferred", self.nixl_bytes),
        ):
            count = float(self.nixl_transfers)
            out += [
                f"# TYPE {name} histogram",
                f'{name}_bucket{{engine="0",le="+Inf",model_name="{model}"}} {count}',
                f"{name}_count{{{labels}}} {count}",
                f"{name}_sum{{{labels}}} {float(total)}",
            ]
        return "\n".join(out) + "\n"


@dataclass
class FakeOpenAIServer:
    config: FakeServerConfig = field(default_factory=FakeServerConfig)
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0  # handlers cancelled because the client closed the connection
    healthy: bool = True  # False: GET /health answers 503, as vLLM does when its engine died
    kv: FakeKVState = field(default_factory=FakeKVState)  # used when config.kv_block_size is set
    _runner: web.AppRunner | None = None
    _stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeOpenAIServer:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        if self.config.kv_block_size:  # only with the cache model: others keep their 404
            app.router.add_get("/metrics", self._metrics)
        # Cancel handlers whose client went away (a timed-out request) instead of letting them
        # hang on, and do not wait long for stragglers at shutdown.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _health(self, request: web.Request) -> web.Response:
        # vLLM answers 200 with an empty body, 503 once its engine is dead.
        return web.Response(status=200 if self.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.kv.render(self.config.model))

    def _prefill_kv(self, body: dict[str, Any]) -> int:
        """Model the prefix cache (and a NIXL pull) for a token-id prompt; returns the cached
        tokens. Like vLLM, a hit is capped below the prompt length (one token is computed)."""
        bs = self.config.kv_block_size
        prompt = body.get("prompt")
        if not bs or not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return 0
        n = len(prompt)
        blocks = [tuple(prompt[: (i + 1) * bs]) for i in range(n // bs)]
        held = 0
        while held < len(blocks) and blocks[held] in self.kv.cached:
            held += 1
        cached = min(held * bs, (n - 1) // bs * bs)
        self.kv.prefix_cache_queries += n
        self.kv.prefix_cache_hits += cached
        kv = body.get("kv_transfer_params")
        if isinstance(kv, dict) and kv.get("do_remote_prefill") and kv.get("remote_block_ids"):
            pulled = -(-n // bs) - cached // bs  # every block not held, the partial one too
            self.kv.nixl_transfers += 1
            self.kv.nixl_bytes += pulled * self.config.kv_bytes_per_block
            self.kv.nixl_xfer_seconds += self.config.nixl_xfer_seconds
        self.kv.cached.update(blocks)
        return cached

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.config.model, "object": "model"}]}
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            return await self._answer(request, chat)
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        except (AttributeError, TypeError, ValueError) as exc:
            # A field of the wrong shape (stream_options: [], max_tokens: "x"): vLLM's request
            # models reject those with a 400 before any work, so the fake does too.
            return web.json_response({"object": "error", "message": f"invalid request: {exc}",
                                      "type": "BadRequestError", "param": None, "code": 400},
                                     status=400)  # fmt: skip

    def _json_answer(
        self, body: dict[str, Any], chat: bool, n_prompt: int, cached_tokens: int = 0
    ) -> web.Response:
        """A non-streamed answer; with ``do_remote_decode`` also vLLM's kv_transfer_params."""
        n_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        if self.config.max_generated_tokens is not None:
            n_tokens = min(n_tokens, self.config.max_generated_tokens)
        text = "".join(f" t{i}" for i in range(n_tokens))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                      "stop_reason": None}
        answer: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{len(self.requests)}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or self.config.model,
            "choices": [choice],
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_tokens,
                      "completion_tokens": n_tokens, "prompt_tokens_details": None},
        }
        kv = body.get("kv_transfer_params")
        if isinstance(kv, dict) and kv.get("do_remote_decode"):
            bs = self.config.kv_block_size
            block_ids = list(range(1, -(-n_prompt // bs) + 1)) if bs else [len(self.requests)]
            answer["kv_transfer_params"] = {
                "do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": [block_ids],
                "remote_engine_id": f"fake-{self.port}",
                "remote_request_id": answer["id"], "remote_host": self.host,
                "remote_port": self.port, "tp_size": 1, "dcp_size": 1, "pp_size": 1,
                "remote_num_tokens": n_prompt, "remote_blocks_expiry_time": None,
                "transfer_mode": "pull", "remote_prefill_cached_tokens": cached_tokens,
            }
        return web.json_response(answer)

    async def _broken_json_answer(self, request: web.Request) -> web.StreamResponse:
        """Headers and part of a JSON body, then the connection drops (a server killed mid-answer)."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 4096
        await response.prepare(request)
        await response.write(b'{"id": "cmpl-partial", "choices": [')
        request.transport.close()
        return response

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        fault = self.config.fault_for(body) if self.config.fault_for else None
        if fault is not None and fault.kind == "status":
            return web.json_response(
                {"object": "error", "message": "injected", "type": "InternalServerError",
                 "code": fault.status_code},
                status=fault.status_code,
            )
        if fault is not None and fault.kind == "hang":
            if self._stopping is not None:
                await self._stopping.wait()
            return web.Response(status=503)

        n_tokens = int(body.get("max_tokens") or 16)
        if self.config.max_generated_tokens is not None:
            n_tokens = min(n_tokens, self.config.max_generated_tokens)
        prompt = body.get("prompt")
        n_prompt = len(prompt) if isinstance(prompt, list) else self.config.prompt_tokens
        cached_tokens = self._prefill_kv(body)
        stream_options = body.get("stream_options") or {}
        include_usage = bool(stream_options.get("include_usage"))  # a bad shape: 400, as in vLLM
        if not body.get("stream"):
            await asyncio.sleep(self.config.first_token_delay_s)
            if fault is not None and fault.kind == "disconnect":
                return await self._broken_json_answer(request)
            return self._json_answer(body, chat, n_prompt, cached_tokens)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk_id = f"{'chatcmpl' if chat else 'cmpl'}-{len(self.requests)}"
        base = {
            "id": chunk_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or self.config.model,
        }

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                    "stop_reason": None}

        await asyncio.sleep(self.config.first_token_delay_s)
        if chat:
            # vLLM's first chat chunk carries only the role, no generated text.
            role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}
            await response.write(_sse({**base, "choices": [role]}))
        for i in range(n_tokens):
            if fault is not None and i == fault.after_tokens:
                if fault.kind == "stream_error":
                    error = {"error": {"message": "injected", "type": "InternalServerError",
                                       "code": 500}}
                    await response.write(_sse(error))
                    await response.write(_sse("[DONE]"))
                    return response
                request.transport.close()  # "disconnect": no [DONE], no chunked trailer
                return response
            if i:
                await asyncio.sleep(self.config.inter_token_delay_s)
            finish = "length" if i == n_tokens - 1 else None
            await response.write(_sse({**base, "choices": [choice(f" t{i}", finish)]}))
        if include_usage:
            usage = {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_tokens,
                     "completion_tokens": n_tokens}
            await response.write(_sse({**base, "choices": [], "usage": usage}))
        await response.write(_sse("[DONE]"))
        if self.config.done_linger_s:
            await asyncio.sleep(self.config.done_linger_s)
        await response.write_eof()
        return response


@contextmanager
def serve_in_thread(config: FakeServerConfig | None = None) -> Iterator[FakeOpenAIServer]:
    """Run a ``FakeOpenAIServer`` on its own event loop in a daemon thread."""
    server = FakeOpenAIServer(config or FakeServerConfig())
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fake-openai-server", daemon=True)
    thread.start()
    if not ready.wait(timeout=10):
        raise RuntimeError("fake OpenAI server did not start")
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
