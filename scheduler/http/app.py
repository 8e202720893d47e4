"""The OpenAI-compatible front end (aiohttp): routes, request validation, error mapping.

The Scheduler lives in the app's state (``app[SCHEDULER_KEY]``), never in a module global, so
several apps (tests, benchmarks) can run in one process. Handlers are cancelled when their client
disconnects (``handler_cancellation=True``), which is what cancels the upstream requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from aiohttp import web

from scheduler.http import errors
from scheduler.http.admin import install_admin
from scheduler.http.auth import ApiKeyGuard
from scheduler.http.errors import ApiError
from scheduler.dispatch.pd_client import ANSWER_DELIVERED, RELAY_OUTCOME, PDHandoff
from scheduler.prom import CONTENT_TYPE
from scheduler.service import Scheduler
from scheduler.dispatch.tokenization import LONG_PROMPT_CHARS, encode_chat
from scheduler.http.validation import (
    Endpoint,
    GenerationRequest,
    check_context,
    decode_body,
    parse_chat,
    parse_completion,
)

log = logging.getLogger(__name__)
SCHEDULER_KEY = web.AppKey("scheduler", Scheduler)
HANDOFF_KEY = web.AppKey("handoff", PDHandoff)
API_KEYS_KEY = web.AppKey("api_keys", ApiKeyGuard)
_encode = msgspec.json.encode


def _tokenize(sched: Scheduler, gen: GenerationRequest) -> list[int]:
    tok = sched.tokenizer
    if gen.prompt_ids is not None:
        return gen.prompt_ids
    if gen.prompt_text is not None:
        return tok.encode_text(gen.prompt_text, gen.add_special_tokens)
    try:
        return encode_chat(tok, gen.messages or [], gen.chat_options)  # type: ignore[arg-type]
    except Exception as exc:  # a template that raises (jinja2 errors, bad roles) is bad input
        raise errors.invalid_field("messages", f"chat template failed: {exc}") from None


def _prompt_size(gen: GenerationRequest) -> int:
    if gen.prompt_text is not None:
        return len(gen.prompt_text)
    if gen.messages is not None:
        return sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else 1024
                   for m in gen.messages)  # fmt: skip
    return 0


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise errors.payload_too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.payload_too_large(limit) from None


async def _generate(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    sched = request.app[SCHEDULER_KEY]
    arrival = sched.clock()
    outcome = "ok"
    try:
        request.app[API_KEYS_KEY].check(request)  # before the body is even read
        body = decode_body(await _read_body(request, sched.options.max_body_bytes))
        served = sched.config.served_model_name
        if endpoint is Endpoint.COMPLETIONS:
            gen = parse_completion(body, served, sched.tokenizer.vocab_size)
        else:
            gen = parse_chat(body, served)
        if _prompt_size(gen) > LONG_PROMPT_CHARS:  # off the loop: one huge prompt must not stall all
            gen.prompt_ids = await asyncio.to_thread(_tokenize, sched, gen)
        else:
            gen.prompt_ids = _tokenize(sched, gen)
        check_context(gen, sched.config.max_model_len)
        response = await request.app[HANDOFF_KEY].serve(request, gen, arrival)
        # Counted (error kind) where the relay saw it; the outcome is recorded here.
        outcome = request.get(RELAY_OUTCOME, outcome)
        return response
    except ApiError as err:
        outcome = "error"
        sched.metrics.error(err.kind)
        return err.to_response()
    except (asyncio.CancelledError, ConnectionResetError):
        if request.get(ANSWER_DELIVERED):  # it hung up after the final [DONE]: served in full
            raise
        outcome = "cancelled"
        sched.metrics.error("client_disconnected")
        raise
    except Exception:
        # A bug of ours, never the client's input (that is an ApiError): say so, keep serving.
        log.exception("unhandled error serving %s", request.path)
        outcome = "error"
        sched.metrics.error("internal")
        return ApiError(500, "internal scheduler error", type=errors.SERVER_ERROR,
                        code="internal_error", kind="internal").to_response()  # fmt: skip
    finally:
        sched.metrics.request_done(endpoint.value, outcome)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, Endpoint.COMPLETIONS)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, Endpoint.CHAT)


def _model_card(sched: Scheduler) -> dict[str, object]:
    cfg = sched.config
    return {
        "id": cfg.served_model_name,
        "object": "model",
        "created": int(sched.started_wall),
        "owned_by": "dualmap-pd",
        "root": str(cfg.model),
        "max_model_len": cfg.max_model_len,
    }


def _json(body: object) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the one served model, as OpenAI lists models."""
    sched = request.app[SCHEDULER_KEY]
    try:
        request.app[API_KEYS_KEY].check(request)
    except ApiError as err:
        sched.metrics.error(err.kind)
        return err.to_response()
    return _json({"object": "list", "data": [_model_card(sched)]})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{model} (the openai SDK's ``models.retrieve``): its card, or OpenAI's 404
    ``model_not_found`` for any other name."""
    sched = request.app[SCHEDULER_KEY]
    name = request.match_info["model"]
    try:
        request.app[API_KEYS_KEY].check(request)
        if name != sched.config.served_model_name:
            raise ApiError(404, f"The model `{name}` does not exist.", type=errors.INVALID_REQUEST,
                           param="model", code="model_not_found", kind="model_not_found")  # fmt: skip
    except ApiError as err:
        sched.metrics.error(err.kind)
        return err.to_response()
    return _json(_model_card(sched))


async def health(request: web.Request) -> web.Response:
    """200 when both pools have a healthy instance (requests can be served), else 503."""
    view = request.app[SCHEDULER_KEY].view
    instances = {st.name: {"role": st.role.value, "healthy": st.healthy} for st in view.instances()}
    ok = bool(view.eligible("prefill")) and bool(view.eligible("decode"))
    body = {"status": "ok" if ok else "unavailable", "instances": instances}
    return web.Response(body=_encode(body), status=200 if ok else 503,
                        content_type="application/json")  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SCHEDULER_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def fallback(request: web.Request) -> web.Response:
    """Unknown paths and methods, in the OpenAI error format. A catch-all route rather than a
    middleware: a middleware would add a coroutine layer to every request."""
    known = {r.resource.canonical for r in request.app.router.routes()
             if r.resource is not None and r.handler is not fallback}  # fmt: skip
    if request.path in known:
        err = ApiError(405, f"method {request.method} is not allowed on {request.path}",
                       code="method_not_allowed", kind="method_not_allowed")  # fmt: skip
    else:
        err = ApiError(404, f"no such endpoint: {request.path}", code="not_found", kind="not_found")
    request.app[SCHEDULER_KEY].metrics.error(err.kind)
    return err.to_response()


async def _start(app: web.Application) -> None:
    await app[SCHEDULER_KEY].start()


async def _stop(app: web.Application) -> None:
    await app[SCHEDULER_KEY].stop()


WORKER_HEADER = "X-DualMap-Worker"


def create_app(scheduler: Scheduler, api_keys: ApiKeyGuard | None = None,
               worker: int | None = None) -> web.Application:  # fmt: skip
    """``api_keys``: client keys for the /v1 API (scheduler/http/auth.py); None leaves it open.
    ``worker``: this process's index under ``serve --workers``, sent back in every answer's
    X-DualMap-Worker header (which replica served it)."""
    app = web.Application(client_max_size=scheduler.options.max_body_bytes)
    if worker is not None:
        async def tag_worker(_request: web.Request, response: web.StreamResponse) -> None:
            response.headers[WORKER_HEADER] = str(worker)

        app.on_response_prepare.append(tag_worker)
    app[SCHEDULER_KEY] = scheduler
    app[API_KEYS_KEY] = api_keys or ApiKeyGuard()
    app[HANDOFF_KEY] = PDHandoff(scheduler)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    install_admin(app, scheduler)  # /admin/*, behind the admin token (scheduler/http/admin.py)
    app.router.add_route("*", "/{tail:.*}", fallback)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def start_site(app: web.Application, host: str, port: int, reuse_port: bool = False) -> web.AppRunner:
    """Serve ``app`` on host:port (port 0: any free port; see ``bound_port``). ``reuse_port``:
    SO_REUSEPORT, so several worker processes share the port (scheduler/workers.py)."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


async def serve_forever(scheduler: Scheduler, host: str, port: int,
                        ready: Callable[[int], None] | None = None,
                        api_keys: ApiKeyGuard | None = None, worker: int | None = None) -> None:  # fmt: skip
    """Run the app until cancelled (Ctrl-C), then shut down cleanly."""
    runner = await start_site(create_app(scheduler, api_keys, worker), host, port,
                              reuse_port=worker is not None)
    try:
        if ready is not None:
            ready(bound_port(runner))
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
