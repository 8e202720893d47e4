"""A small blocking client for a running scheduler's admin API (used by `dualmap-pd launch
--register`, scripts and tests). The token is sent as ``Authorization: Bearer``."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from scheduler.config import InstanceConfig


class AdminRequestError(RuntimeError):
    """The scheduler refused an admin call, or could not be reached; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def instance_body(inst: InstanceConfig) -> dict[str, Any]:
    """The POST /admin/instances body of an instance (what its config entry says)."""
    body: dict[str, Any] = {
        "role": inst.role, "name": inst.name, "host": inst.host, "port": inst.port,
        "nixl_side_channel_port": inst.nixl_side_channel_port,
    }  # fmt: skip
    for key in ("kv_events_port", "kv_events_replay_port"):
        if getattr(inst, key) is not None:
            body[key] = getattr(inst, key)
    return body


class AdminClient:
    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                message = json.loads(payload)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = payload.decode("utf-8", "replace")[:500]
            raise AdminRequestError(f"{method} {path}: {exc.code}: {message}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminRequestError(f"{method} {path}: scheduler at {self.base_url} unreachable: {exc}") from None

    def instances(self) -> list[dict[str, Any]]:
        return self.call("GET", "/admin/instances")[1]["data"]

    def add(self, inst: InstanceConfig) -> dict[str, Any]:
        return self.call("POST", "/admin/instances", instance_body(inst))[1]

    def drain(self, name: str) -> dict[str, Any]:
        return self.call("POST", f"/admin/instances/{name}/drain")[1]

    def remove(self, name: str, force: bool = False) -> dict[str, Any]:
        return self.call("DELETE", f"/admin/instances/{name}" + ("?force=true" if force else ""))[1]

    def wait_removed(self, name: str, timeout_s: float, poll_s: float = 0.5) -> bool:
        """After ``remove``: wait until the instance is gone (it drains first when busy)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.call("GET", f"/admin/instances/{name}")
            except AdminRequestError as exc:
                if exc.status == 404:
                    return True
                raise
            time.sleep(poll_s)
        return False
