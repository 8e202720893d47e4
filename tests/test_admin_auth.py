"""The admin API's front door: token required (disabled without one), host allow-list, config."""

from __future__ import annotations

import pytest

from scheduler.http.admin import ADMIN_TOKEN_ENV, AdminGuard
from scheduler.http.allowlist import HostAllowList
from scheduler.config import ConfigError, config_from_dict
from tests.fakes.openai_server import FakeOpenAIServer
from tests.service_harness import Harness, cluster, completion, run

TOKEN = "admin-token-for-tests-0123456789"


async def get(h: Harness, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    async with h.client.get(h.url + path, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.json()


def test_admin_api_is_disabled_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)

    async def body() -> None:
        async with cluster() as h:
            for method, path in (("GET", "/admin/instances"), ("POST", "/admin/instances/prefill-0/drain"),
                                 ("DELETE", "/admin/instances/prefill-0")):  # fmt: skip
                async with h.client.request(method, h.url + path,
                                            headers={"Authorization": "Bearer anything-at-all-1234"}) as r:  # fmt: skip
                    err = (await r.json())["error"]
                    assert r.status == 403 and err["code"] == "admin_disabled"
                    assert ADMIN_TOKEN_ENV in err["message"] and err["type"] == "permission_error"
            assert not h.scheduler.view["prefill-0"].draining
            assert (await h.post("/v1/completions", completion()))[0] == 200
            text = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_errors_total{kind="admin_disabled"} 3.0' in text

    run(body)


def test_missing_or_wrong_tokens_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)

    async def body() -> None:
        async with cluster(admin={"token": TOKEN}) as h:
            status, headers, err = await get(h, "/admin/instances")
            assert status == 401 and err["error"]["code"] == "missing_admin_token"
            assert headers["WWW-Authenticate"].startswith("Bearer")
            for bad in (f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
                status, _, err = await get(h, "/admin/instances", {"Authorization": bad})
                assert status in (401, 403) and err["error"]["type"] in ("authentication_error", "permission_error")
            status, _, listing = await get(h, "/admin/instances", {"Authorization": f"Bearer {TOKEN}"})
            assert status == 200 and len(listing["data"]) == 3

    run(body)


def test_the_environment_token_wins_over_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    env_token = "from-the-environment-abcdefghij"
    monkeypatch.setenv(ADMIN_TOKEN_ENV, env_token)

    async def body() -> None:
        async with cluster(admin={"token": TOKEN}) as h:
            assert (await get(h, "/admin/instances", {"Authorization": f"Bearer {TOKEN}"}))[0] == 403
            assert (await get(h, "/admin/instances", {"Authorization": f"Bearer {env_token}"}))[0] == 200

    run(body)


def test_short_tokens_are_rejected_at_startup() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        AdminGuard.from_config(None, {ADMIN_TOKEN_ENV: "short"})
    with pytest.raises(ConfigError, match="admin.token"):
        config_from_dict(_minimal(admin={"token": "short"}))


def test_instances_outside_the_allow_list_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)

    async def body() -> None:
        async with cluster(admin={"token": TOKEN, "allowed_hosts": ["10.0.0.0/8"]}) as h, \
                FakeOpenAIServer() as extra:  # fmt: skip
            payload = {"role": "prefill", "name": "intruder", "url": extra.url,
                       "nixl_side_channel_port": 40190, "kv_events_port": 40290}  # fmt: skip
            async with h.client.post(h.url + "/admin/instances", json=payload,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as r:  # fmt: skip
                err = (await r.json())["error"]
                assert r.status == 403 and err["code"] == "host_not_allowed" and err["param"] == "host"
                assert "10.0.0.0/8" in err["message"]
            assert "intruder" not in h.scheduler.view

    run(body)


def test_allow_list_matching() -> None:
    allow = HostAllowList(["10.0.0.0/8", "fd00::/8", "gpu-7.internal", "192.168.1.5"])
    assert allow.allows("10.20.30.40") and allow.allows("192.168.1.5") and allow.allows("[fd00::1]")
    assert allow.allows("GPU-7.internal")
    assert not allow.allows("11.0.0.1") and not allow.allows("192.168.1.6")
    assert not allow.allows("gpu-7.internal.evil.com") and not allow.allows("127.0.0.1")
    default = HostAllowList.for_config(config_from_dict(_minimal(host="node-3")))
    assert default.allows("127.0.0.1") and default.allows("localhost") and default.allows("::1")
    assert default.allows("node-3") and not default.allows("node-4")


def test_admin_config_validation() -> None:
    cfg = config_from_dict(_minimal(admin={"allowed_hosts": ["10.0.0.0/8", "Node-1"], "watch_config": True}))
    assert cfg.admin.allowed_hosts == ("10.0.0.0/8", "node-1") and cfg.admin.watch_config
    for bad, match in (({"allowed_hosts": "10.0.0.0/8"}, "list"), ({"allowed_hosts": ["bad host!"]}, "neither"),
                       ({"watch_interval_s": 0}, "positive"), ({"tokn": "x"}, "unknown key"),
                       ({"recent_prefixes": 0}, ">= 1")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            config_from_dict(_minimal(admin=bad))


def _minimal(host: str = "127.0.0.1", **extra: object) -> dict[str, object]:
    return {
        "model": "/nonexistent/m",
        "prefill": [{"name": "p0", "host": host, "port": 9001, "nixl_side_channel_port": 9002,
                     "kv_events_port": 9003}],
        "decode": [{"name": "d0", "port": 9004, "nixl_side_channel_port": 9005}],
        **extra,
    }  # fmt: skip
