"""One emulated vLLM engine's HTTP face: the OpenAI API exactly as vLLM 0.32 streams it.

Serves ``/v1/completions``, ``/v1/chat/completions`` (streaming and not), ``/v1/models``,
``/health``, ``/tokenize``, ``/v1/completions/render`` and, with a cache model, ``/metrics``.
Streaming follows vLLM's wire format: ``data: {json}\\n\\n`` chunks carrying
``choices[0].text`` (completions) or ``choices[0].delta.content`` (chat, after a role-only first
chunk), a final usage chunk with empty ``choices`` when ``stream_options.include_usage`` is
set, then ``data: [DONE]``. Non-streaming requests get one JSON body.

Timing has two modes. With an ``EngineCore`` (``engine=``; what ``dualmap-pd emulate`` runs)
every request goes through the profile's continuous-batching model (scheduler/emulator/
engine.py). Without one the server answers after fixed delays (``first_token_delay_s``,
``inter_token_delay_s``), the mode the unit tests use; with ``kv_block_size`` set it still
keeps the engine's prefix-cache bookkeeping for token-id prompts (unbounded).

P/D: a request carrying ``kv_transfer_params: {"do_remote_decode": true}`` (the prefill leg)
gets ``kv_transfer_params`` back in NixlConnector's shape (remote block ids, engine id,
host/port, ``remote_prefill_cached_tokens``); a request carrying ``do_remote_prefill`` with
block ids "pulls" the blocks it does not hold: one NIXL transfer, counted in the
``vllm:nixl_*`` series, and with an engine timed at the profile's link speed.

Faults for tests: ``fault_for`` picks a ``Fault`` per request from its JSON body. Every body is
recorded in ``requests``; ``disconnects`` counts clients that went away mid-answer.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dualmap_pd.cost import CostModel, get_profile
from scheduler.dispatch.tokenization import ChatOptions, PromptTokenizer, encode_chat
from scheduler.emulator.engine import EngineCore, EngineCounters, EngineRequest
from scheduler.emulator.metrics import CONTENT_TYPE, EngineValues, VllmMetrics

FAULT_KINDS = ("status", "hang", "stream_error", "disconnect")
UNBOUNDED_CACHE_BLOCKS = 1 << 40


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
class ServerConfig:
    model: str = "fake-model"
    first_token_delay_s: float = 0.0  # fixed-delay mode only
    inter_token_delay_s: float = 0.0
    # None: generate exactly max_tokens (like ignore_eos); an int caps it (like an early EOS).
    max_generated_tokens: int | None = None
    prompt_tokens: int = 1  # reported in usage for a text prompt when there is no tokenizer
    fault_for: Callable[[dict[str, Any]], Fault | None] | None = None
    # Prefix-cache / NIXL bookkeeping for token-id prompts in fixed-delay mode (None: off).
    kv_block_size: int | None = None
    kv_bytes_per_block: int = 0
    nixl_xfer_seconds: float = 0.001  # reported per transfer in fixed-delay mode
    tokenizer: PromptTokenizer | None = None  # the engine's own tokenizer (text prompts)
    max_model_len: int | None = None  # longer prompt + max_tokens: 400, as vLLM answers
    # Pause between ``data: [DONE]`` and the end of the response (fixed-delay mode): widens the
    # window in which a client hanging up right after [DONE] meets a proxy still relaying.
    done_linger_s: float = 0.0


def fault_by_max_tokens(faults: dict[int, Fault]) -> Callable[[dict[str, Any]], Fault | None]:
    """A ``fault_for`` that chooses by the request's ``max_tokens`` (easy to set from a trace)."""

    def choose(body: dict[str, Any]) -> Fault | None:
        return faults.get(body.get("max_tokens", -1))

    return choose


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _error(message: str, status: int, kind: str = "BadRequestError") -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": kind, "param": None,
                              "code": status}, status=status)  # fmt: skip


class BadRequest(ValueError):
    """A request vLLM would reject with a 400 before any work."""


def _fixed_delay_core(block_size: int) -> EngineCore:
    """Cache bookkeeping only (its step loop never runs): an unbounded LRU at ``block_size``."""
    return EngineCore(CostModel(get_profile("llama8b-h100")), block_size=block_size,
                      cache_blocks=UNBOUNDED_CACHE_BLOCKS)  # fmt: skip


@dataclass
class EngineServer:
    config: ServerConfig = field(default_factory=ServerConfig)
    host: str = "127.0.0.1"
    port: int = 0
    engine: EngineCore | None = None  # None: fixed-delay mode (see module doc)
    engine_id: str = ""  # NixlConnector engine id in kv_transfer_params ("" -> from the port)
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0  # handlers cancelled because the client closed the connection
    healthy: bool = True  # False: GET /health answers 503, as vLLM does when its engine died
    _cache: EngineCore | None = None
    _runner: web.AppRunner | None = None
    _stopping: asyncio.Event | None = None
    _n_answers: int = 0

    def __post_init__(self) -> None:
        if self.engine is not None:
            self._cache = self.engine
        elif self.config.kv_block_size:
            self._cache = _fixed_delay_core(self.config.kv_block_size)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kv(self) -> EngineCounters:
        """The engine's cumulative counters (what /metrics exports)."""
        if self._cache is None:
            raise AttributeError("this server has no cache model (set kv_block_size or engine)")
        return self._cache.counters

    async def start(self) -> EngineServer:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions/render", self._render)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        if self._cache is not None:  # only with the cache model: others keep their 404
            app.router.add_get("/metrics", self._metrics)
        # Cancel handlers whose client went away (a timed-out request) instead of letting them
        # hang on, and do not wait long for stragglers at shutdown.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5,
                                     access_log=None)  # fmt: skip
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.engine is not None:
            await self.engine.stop()

    async def __aenter__(self) -> EngineServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- small endpoints ------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        # vLLM answers 200 with an empty body, 503 once its engine is dead.
        return web.Response(status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.config.model, "object": "model", "created": int(time.time()),
                "owned_by": "vllm", "root": self.config.model, "parent": None,
                "max_model_len": self.config.max_model_len, "permission": []}  # vLLM's ModelCard
        return web.json_response({"object": "list", "data": [card]})

    def metrics_text(self) -> str:
        """The /metrics body: vLLM 0.32's families from the engine's counters and gauges."""
        kv = self.kv
        core = self.engine
        ev = EngineValues(
            num_requests_running=float(core.num_running) if core else 0.0,
            num_requests_waiting=float(core.num_waiting) if core else 0.0,
            kv_cache_usage_perc=core.kv_usage() if core else 0.0,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            prompt_tokens=kv.prompt_tokens, generation_tokens=kv.generation_tokens,
            nixl_num_failed_transfers=kv.nixl_failed,
            requests_finished={"length": float(kv.requests_finished)},
        )  # fmt: skip
        if kv.nixl_transfers:  # _sum and _count exact; the per-transfer split is the mean
            n = kv.nixl_transfers
            ev.nixl_xfer_time_seconds = [kv.nixl_xfer_seconds / n] * n
            ev.nixl_bytes_transferred = [kv.nixl_bytes / n] * n
        return VllmMetrics(model_name=self.config.model, engines=[ev]).render()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics_text().encode(), headers={"Content-Type": CONTENT_TYPE})

    def _prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int] | None:
        """Token ids of the request's prompt as the engine sees them (None: text, no tokenizer)."""
        tok = self.config.tokenizer
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise BadRequest("messages must be a list")
            if tok is None:
                return None
            return encode_chat(tok, messages, ChatOptions())
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise BadRequest("prompt must be a string or a list of token ids")
            return list(prompt)
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string or a list of token ids")
        return None if tok is None else tok.encode_text(prompt, True)

    async def _tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            ids = self._prompt_ids(body, chat="messages" in body)
        except (BadRequest, ValueError, TypeError) as exc:
            return _error(f"invalid request: {exc}", 400)
        if ids is None:
            return _error("this engine has no tokenizer", 400)
        return web.json_response({"count": len(ids), "max_model_len": self.config.max_model_len or 0,
                                  "tokens": ids, "token_strs": None})  # fmt: skip

    async def _render(self, request: web.Request) -> web.Response:
        """``/v1/completions/render``: vLLM's list of GenerateRequest (token ids + sampling)."""
        try:
            body = await request.json()
            ids = self._prompt_ids(body, chat=False)
        except (BadRequest, ValueError, TypeError) as exc:
            return _error(f"invalid request: {exc}", 400)
        if ids is None:
            return _error("this engine has no tokenizer", 400)
        sampling = {"max_tokens": body.get("max_tokens") or 16,
                    "temperature": body.get("temperature", 1.0)}  # fmt: skip
        return web.json_response([{"request_id": f"render-{len(self.requests)}", "token_ids": ids,
                                   "sampling_params": sampling, "model": body.get("model"),
                                   "stream": bool(body.get("stream"))}])  # fmt: skip

    # -- generation -----------------------------------------------------------------------------
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
            # models reject those with a 400 before any work, so the emulator does too.
            return _error(f"invalid request: {exc}", 400)

    def _n_tokens(self, body: dict[str, Any]) -> int:
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        if self.config.max_generated_tokens is not None:
            n = min(n, self.config.max_generated_tokens)
        return n

    def _remote_params(self, answer_id: str, n_prompt: int, cached: int) -> dict[str, Any]:
        bs = self._cache.block_size if self._cache else None
        block_ids = list(range(1, -(-n_prompt // bs) + 1)) if bs else [len(self.requests)]
        return {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [block_ids],
            "remote_engine_id": self.engine_id or f"fake-{self.port}",
            "remote_request_id": answer_id, "remote_host": self.host, "remote_port": self.port,
            "tp_size": 1, "dcp_size": 1, "pp_size": 1, "remote_num_tokens": n_prompt,
            "remote_blocks_expiry_time": None, "transfer_mode": "pull",
            "remote_prefill_cached_tokens": cached,
        }  # fmt: skip

    def _fixed_delay_kv(self, prompt: Sequence[int] | None, kv: Any) -> int:
        """Fixed-delay mode: the cache lookup (and a NIXL pull); returns the cached tokens."""
        core = self._cache
        if core is None or prompt is None:
            return 0
        hashes, cached = core.lookup(prompt)
        if isinstance(kv, dict) and kv.get("do_remote_prefill") and kv.get("remote_block_ids"):
            bs = core.block_size
            pulled = -(-len(prompt) // bs) - cached // bs  # every block not held, the partial one too
            core.counters.record_pull(pulled * self.config.kv_bytes_per_block,
                                      self.config.nixl_xfer_seconds)  # fmt: skip
        core.cache.insert(hashes)
        return cached

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
        try:
            prompt = self._prompt_ids(body, chat)
        except BadRequest as exc:
            return _error(str(exc), 400)
        n_tokens = self._n_tokens(body)
        n_prompt = len(prompt) if prompt is not None else self.config.prompt_tokens
        limit = self.config.max_model_len
        if limit is not None and n_prompt + n_tokens > limit:
            return _error(f"This model's maximum context length is {limit} tokens. However, you "
                          f"requested {n_prompt + n_tokens} tokens.", 400)  # fmt: skip
        stream_options = body.get("stream_options") or {}
        include_usage = bool(stream_options.get("include_usage"))  # a bad shape: 400, as in vLLM
        kv = body.get("kv_transfer_params")
        run = _Run(self, body, chat, prompt, n_prompt, n_tokens, kv)
        if self.engine is None:
            run.cached = self._fixed_delay_kv(prompt, kv)
        self._n_answers += 1
        if not body.get("stream"):
            try:
                await run.wait_all()
            finally:
                run.close()
            if fault is not None and fault.kind == "disconnect":
                return await self._broken_json_answer(request)
            return web.json_response(run.json_answer())
        return await run.stream(request, fault, include_usage)


class _Run:
    """One request being answered: its engine timing (or fixed delays) and its wire output."""

    def __init__(self, server: EngineServer, body: dict[str, Any], chat: bool,
                 prompt: list[int] | None, n_prompt: int, n_tokens: int, kv: Any) -> None:  # fmt: skip
        self.server, self.body, self.chat = server, body, chat
        self.n_prompt, self.n_tokens = n_prompt, n_tokens
        self.kv = kv if isinstance(kv, dict) else None
        self.cached = 0
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{len(server.requests)}"
        self.req: EngineRequest | None = None
        self._submitted: asyncio.Task[EngineRequest] | None = None
        engine = server.engine
        if engine is not None:
            prompt = prompt if prompt is not None else [0] * n_prompt
            pulled = 0
            if self.kv and self.kv.get("do_remote_prefill") and self.kv.get("remote_block_ids"):
                # vLLM's decode engine reads what its own cache lacks from the prefill engine.
                _, local = engine.lookup(prompt)
                pulled = max(1, n_prompt - local)
            self.req = EngineRequest(prompt=prompt, max_tokens=n_tokens, pulled_tokens=pulled)
            self._submitted = asyncio.get_running_loop().create_task(engine.submit(self.req))

    async def next_token(self, index: int) -> None:
        """Return when token ``index`` (0-based) has been generated."""
        if self.req is None:
            delay = self.server.config.first_token_delay_s if index == 0 else self.server.config.inter_token_delay_s
            await asyncio.sleep(delay)
            return
        if index == 0 and self._submitted is not None:
            await self._submitted
            self.cached = self.req.cached_tokens
        await self.req.tokens.get()

    async def wait_all(self) -> None:
        if self.req is None:
            await asyncio.sleep(self.server.config.first_token_delay_s)
            return
        for i in range(self.n_tokens):
            await self.next_token(i)

    def close(self) -> None:
        """Free the request in the engine (also when the client went away mid-answer)."""
        if self.req is not None and self.server.engine is not None:
            self.server.engine.cancel(self.req)
        if self._submitted is not None and not self._submitted.done():
            self._submitted.cancel()

    def _usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.n_prompt, "total_tokens": self.n_prompt + self.n_tokens,
                "completion_tokens": self.n_tokens}  # fmt: skip

    def json_answer(self) -> dict[str, Any]:
        """A non-streamed answer; with ``do_remote_decode`` also vLLM's kv_transfer_params."""
        text = "".join(f" t{i}" for i in range(self.n_tokens))
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": "length"}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                      "stop_reason": None}  # fmt: skip
        answer: dict[str, Any] = {
            "id": self.id, "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()), "model": self.body.get("model") or self.server.config.model,
            "choices": [choice], "usage": {**self._usage(), "prompt_tokens_details": None},
        }  # fmt: skip
        if self.kv and self.kv.get("do_remote_decode"):
            answer["kv_transfer_params"] = self.server._remote_params(self.id, self.n_prompt, self.cached)
        return answer

    async def stream(self, request: web.Request, fault: Fault | None, include_usage: bool) -> web.StreamResponse:
        chat = self.chat
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        base = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.body.get("model") or self.server.config.model}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}

        try:
            await response.prepare(request)
            await self.next_token(0)
            if chat:
                # vLLM's first chat chunk carries only the role, no generated text.
                role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}  # fmt: skip
                await response.write(_sse({**base, "choices": [role]}))
            for i in range(self.n_tokens):
                if fault is not None and i == fault.after_tokens:
                    if fault.kind == "stream_error":
                        error = {"error": {"message": "injected", "type": "InternalServerError", "code": 500}}
                        await response.write(_sse(error))
                        await response.write(_sse("[DONE]"))
                        return response
                    request.transport.close()  # "disconnect": no [DONE], no chunked trailer
                    return response
                if i:
                    await self.next_token(i)
                finish = "length" if i == self.n_tokens - 1 else None
                await response.write(_sse({**base, "choices": [choice(f" t{i}", finish)]}))
        finally:
            self.close()
        if include_usage:
            await response.write(_sse({**base, "choices": [], "usage": self._usage()}))
        await response.write(_sse("[DONE]"))
        if self.server.config.done_linger_s:
            await asyncio.sleep(self.server.config.done_linger_s)
        await response.write_eof()
        return response


@contextmanager
def serve_in_thread(config: ServerConfig | None = None) -> Iterator[EngineServer]:
    """Run an ``EngineServer`` (fixed-delay mode) on its own event loop in a daemon thread."""
    server = EngineServer(config or ServerConfig())
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="emulated-engine-server", daemon=True)
    thread.start()
    if not ready.wait(timeout=10):
        raise RuntimeError("emulated engine server did not start")
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
