"""The admin API: list, add, drain, undrain and remove prefill/decode instances at runtime.

    GET    /admin/instances                 every instance, and the last change's candidate churn
    GET    /admin/instances/{name}          one instance
    POST   /admin/instances                 add: {"role": "prefill", "name": ..., "url" or "host"
                                            + "port", "nixl_side_channel_port", "kv_events_port"}
    POST   /admin/instances/{name}/drain    no new work; queued requests go to their backup
    POST   /admin/instances/{name}/undrain  takes new work again
    DELETE /admin/instances/{name}[?force=true]  remove now if idle, else drain and remove when
                                            idle (202); force removes at once

Auth: ``Authorization: Bearer <admin token>``. The token comes from DUALMAP_ADMIN_TOKEN or the
config's ``admin.token``; with neither, the admin API is disabled (every admin request gets 403)
so a scheduler started without thinking about it cannot be reconfigured by anyone who reaches its
port. The client API's keys never open the admin API. Added instances must live on a host of the
allow-list (scheduler/http/allowlist.py). Every refusal is an OpenAI-format error.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from scheduler.http.allowlist import HostAllowList
from scheduler.config import ConfigError, check_admin_token, instance_from_dict
from scheduler.http.errors import ApiError, invalid_field, invalid_json
from scheduler.service import Scheduler

ADMIN_TOKEN_ENV = "DUALMAP_ADMIN_TOKEN"
MAX_ADMIN_BODY = 64 * 1024
AUTHENTICATION_ERROR = "authentication_error"
PERMISSION_ERROR = "permission_error"
Handler = Callable[[web.Request], Awaitable[web.Response]]
_encode = msgspec.json.encode


class AdminGuard:
    """The admin-token check. The only place it is made."""

    def __init__(self, token: str | None) -> None:
        self._token = None if token is None else _digest(token)

    @classmethod
    def from_config(cls, configured: str | None, environ: Mapping[str, str]) -> AdminGuard:
        from_env = environ.get(ADMIN_TOKEN_ENV)
        if from_env:
            return cls(check_admin_token(from_env, ADMIN_TOKEN_ENV))
        return cls(configured)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, request: web.Request) -> None:
        if self._token is None:
            raise ApiError(403, f"the admin API is disabled; set {ADMIN_TOKEN_ENV} (or admin.token "
                           "in the config) to enable it", type=PERMISSION_ERROR,
                           code="admin_disabled", kind="admin_disabled")  # fmt: skip
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "the admin API needs 'Authorization: Bearer <admin token>'",
                           type=AUTHENTICATION_ERROR, code="missing_admin_token",
                           kind="admin_unauthorized")  # fmt: skip
        # Constant-time comparison of digests: timing reveals neither a prefix nor the length.
        if not hmac.compare_digest(_digest(given.strip()), self._token):
            raise ApiError(403, "invalid admin token", type=PERMISSION_ERROR,
                           code="invalid_admin_token", kind="admin_forbidden")  # fmt: skip


class AdminApi:
    def __init__(self, scheduler: Scheduler, guard: AdminGuard, allow: HostAllowList) -> None:
        self.scheduler = scheduler
        self.guard = guard
        self.allow = allow

    def add_routes(self, app: web.Application) -> None:
        g = self._guarded
        app.router.add_get("/admin/instances", g(self.list_instances))
        app.router.add_post("/admin/instances", g(self.add_instance))
        app.router.add_get("/admin/instances/{name}", g(self.get_instance))
        app.router.add_delete("/admin/instances/{name}", g(self.remove_instance))
        app.router.add_post("/admin/instances/{name}/drain", g(self.drain))
        app.router.add_post("/admin/instances/{name}/undrain", g(self.undrain))

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.Response:
            try:
                self.guard.check(request)
                if request.method != "GET" and self.scheduler.options.workers > 1:
                    # The call would reach one worker of N: the others would keep the old
                    # membership. Every worker applies a watched config file.
                    raise ApiError(409, f"this scheduler runs {self.scheduler.options.workers} "
                                   "worker processes on one port; a membership change here would "
                                   "reach only one of them. Change membership through the watched "
                                   "config file (admin.watch_config: true), which every worker applies",
                                   code="membership_conflict", kind="admin_conflict")  # fmt: skip
                return await handler(request)
            except ApiError as err:
                self.scheduler.metrics.error(err.kind)
                resp = err.to_response()
                if err.status == 401:
                    resp.headers["WWW-Authenticate"] = 'Bearer realm="dualmap-admin"'
                return resp

        return guarded

    # -- handlers ---------------------------------------------------------------------------
    async def list_instances(self, request: web.Request) -> web.Response:
        m = self.scheduler.membership
        return _json({"object": "list", "data": m.list(), "last_change": m.last_churn()})

    async def get_instance(self, request: web.Request) -> web.Response:
        return _json({"object": "instance", **self.scheduler.membership.describe(request.match_info["name"])})

    async def add_instance(self, request: web.Request) -> web.Response:
        body = await _read_object(request)
        role = body.pop("role", None)
        if role not in ("prefill", "decode"):
            raise invalid_field("role", "'role' must be 'prefill' or 'decode'")
        if "url" in body:
            body.update(_split_url(body.pop("url")))
        try:
            inst = instance_from_dict(body, role)
        except ConfigError as exc:
            raise invalid_field("instance", str(exc)) from None
        if not self.allow.allows(inst.host):
            raise ApiError(403, f"host {inst.host!r} is not in the admin allow-list "
                           f"({', '.join(self.allow.entries)}); see admin.allowed_hosts",
                           type=PERMISSION_ERROR, param="host", code="host_not_allowed",
                           kind="admin_host_not_allowed")  # fmt: skip
        m = self.scheduler.membership
        info = await m.add(inst)
        return _json({"object": "instance", **info, "change": m.last_churn()}, status=201)

    async def drain(self, request: web.Request) -> web.Response:
        m = self.scheduler.membership
        info = m.drain(request.match_info["name"])
        return _json({"object": "instance", **info, "change": m.last_churn()})

    async def undrain(self, request: web.Request) -> web.Response:
        m = self.scheduler.membership
        info = m.undrain(request.match_info["name"])
        return _json({"object": "instance", **info, "change": m.last_churn()})

    async def remove_instance(self, request: web.Request) -> web.Response:
        force = request.query.get("force", "false").lower()
        if force not in ("true", "false", "1", "0"):
            raise invalid_field("force", "'force' must be true or false")
        m = self.scheduler.membership
        info = await m.remove(request.match_info["name"], force=force in ("true", "1"))
        status = 200 if info["status"] == "removed" else 202
        return _json({"object": "instance", **info, "change": m.last_churn()}, status=status)


def install_admin(app: web.Application, scheduler: Scheduler,
                  environ: Mapping[str, str] | None = None) -> AdminApi:  # fmt: skip
    """Add the admin routes (before any catch-all route). Raises ConfigError for a bad token."""
    cfg = scheduler.config
    guard = AdminGuard.from_config(cfg.admin.token, os.environ if environ is None else environ)
    api = AdminApi(scheduler, guard, HostAllowList.for_config(cfg))
    api.add_routes(app)
    return api


# -- helpers --------------------------------------------------------------------------------
def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


async def _read_object(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        raise ApiError(413, f"admin request body exceeds {MAX_ADMIN_BODY} bytes",
                       code="request_too_large", kind="payload_too_large")  # fmt: skip
    raw = await request.content.read(MAX_ADMIN_BODY + 1)
    if len(raw) > MAX_ADMIN_BODY:
        raise ApiError(413, f"admin request body exceeds {MAX_ADMIN_BODY} bytes",
                       code="request_too_large", kind="payload_too_large")  # fmt: skip
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid_json(str(exc)) from None
    if not isinstance(body, dict):
        raise invalid_field("body", "the body must be a JSON object")
    return body


def _split_url(url: Any) -> dict[str, Any]:
    """``"http://host:port"`` -> host and port (an instance is a plain-HTTP vLLM server)."""
    if not isinstance(url, str):
        raise invalid_field("url", "'url' must be a string like http://10.0.0.5:8100")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise invalid_field("url", f"'url' must look like http://host:port, got {url!r}")
    return {"host": parts.hostname, "port": port}
