"""The front door: client API keys, size limits, timeouts, and OpenAI-format errors for each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scheduler.http.auth import API_KEYS_ENV, ApiKeyError, ApiKeyGuard
from scheduler.config import SchedulerSettings
from tests.fakes.openai_server import FakeServerConfig
from tests.service_harness import MODEL, cluster, completion, run

KEY = "sk-test-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"


def _is_openai_error(answer: Any, code: str) -> bool:
    return (isinstance(answer, dict) and set(answer) == {"error"}
            and set(answer["error"]) == {"message", "type", "param", "code"}
            and answer["error"]["code"] == code)  # fmt: skip


def test_default_bind_is_loopback() -> None:
    assert SchedulerSettings().host == "127.0.0.1"


def test_keys_come_from_env_and_file_and_short_keys_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n{OTHER}\n\n")
    guard = ApiKeyGuard.from_sources({API_KEYS_ENV: f" {KEY} ,"}, f)
    assert len(guard) == 2 and guard.enabled
    assert not ApiKeyGuard.from_sources({}).enabled
    with pytest.raises(ApiKeyError, match="at least"):
        ApiKeyGuard(["short"])
    with pytest.raises(ApiKeyError, match="cannot read"):
        ApiKeyGuard.from_sources({}, tmp_path / "missing")


@pytest.mark.parametrize("header, code", [
    (None, "missing_api_key"),
    ("Bearer wrong-key-0123456789", "invalid_api_key"),
    (f"Basic {KEY}", "invalid_api_key"),
    ("Bearer", "invalid_api_key"),
])  # fmt: skip
def test_client_api_rejects_missing_or_wrong_keys_with_401(header: str | None, code: str) -> None:
    async def body() -> None:
        async with cluster(api_keys=ApiKeyGuard([KEY, OTHER])) as h:
            headers = {} if header is None else {"Authorization": header}
            for path in ("/v1/completions", "/v1/chat/completions"):
                status, _, answer = await h.post(path, completion(), headers=headers)
                assert status == 401 and _is_openai_error(answer, code), answer
            async with h.client.get(h.url + "/v1/models", headers=headers) as r:
                assert r.status == 401 and _is_openai_error(await r.json(), code)
            assert not any(s.requests for s in h.prefill)  # nothing reached an engine
            # Probes and scrapers carry no key.
            assert (await h.client.get(h.url + "/health")).status == 200
            assert (await h.client.get(h.url + "/metrics")).status == 200
            text = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_errors_total{kind="unauthorized"}' in text

    run(body)


def test_valid_keys_are_served() -> None:
    async def body() -> None:
        async with cluster(api_keys=ApiKeyGuard([KEY, OTHER])) as h:
            for key in (KEY, OTHER):
                status, _, answer = await h.post("/v1/completions", completion(),
                                                 headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                assert status == 200, answer
            async with h.client.get(h.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}) as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == MODEL

    run(body)


def test_oversized_body_gets_413_in_openai_format() -> None:
    async def body() -> None:
        async with cluster() as h:  # the harness limits bodies to 64 KiB
            big = completion("x" * (70 * 1024))
            status, _, answer = await h.post("/v1/completions", big)
            assert status == 413 and _is_openai_error(answer, "request_too_large")
            status, _, _ = await h.post("/v1/completions", completion())
            assert status == 200

    run(body)


def test_prefill_past_its_timeout_gets_504_in_openai_format() -> None:
    async def body() -> None:
        slow = FakeServerConfig(first_token_delay_s=5.0)
        async with cluster(n_prefill=1, prefill_config=slow, prefill_timeout_s=0.3) as h:
            status, _, answer = await h.post("/v1/completions", completion())
            assert status == 504 and _is_openai_error(answer, "upstream_timeout"), answer
            assert len(h.scheduler.router) == 0

    run(body)


def test_silent_decoder_ends_a_stream_cleanly_after_the_idle_timeout() -> None:
    async def body() -> None:
        # The first chunk never comes: nothing was sent, so the client gets a 504, not a hang.
        silent = FakeServerConfig(first_token_delay_s=5.0)
        async with cluster(n_decode=1, decode_config=silent, decode_idle_timeout_s=0.3) as h:
            status, _, answer = await h.post("/v1/completions", completion(stream=True))
            assert status == 504 and _is_openai_error(answer, "upstream_timeout"), answer

    run(body)


def test_config_names_a_keys_file_never_the_keys() -> None:
    from scheduler.config import ConfigError, config_from_dict

    def cfg(scheduler: dict[str, Any]) -> Any:
        return config_from_dict({
            "model": "/nonexistent/m", "scheduler": scheduler,
            "prefill": [{"name": "p0", "port": 8701, "nixl_side_channel_port": 6001, "kv_events_port": 6002}],
            "decode": [{"name": "d0", "port": 8702, "nixl_side_channel_port": 6003}],
        })  # fmt: skip

    assert cfg({"api_keys_file": "keys.txt"}).scheduler.api_keys_file == "keys.txt"
    assert cfg({}).scheduler.api_keys_file is None
    with pytest.raises(ConfigError, match="api_keys_file"):
        cfg({"api_keys_file": 3})
    with pytest.raises(ConfigError, match="unknown key"):
        cfg({"api_keys": ["sk-in-the-yaml-0123456789"]})
