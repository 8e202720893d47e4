"""The emulated engine: its timing model, and the scheduler's own intake reading it.

The intake tests run the real KV-event subscriber and /metrics poller of the scheduler against
an ``EmulatedCluster`` (the same code ``dualmap-pd emulate`` runs) and require the scheduler's view
to equal what the emulated engines hold, evictions included.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dualmap_pd.cost import CostModel, get_profile, with_overrides
from dualmap_pd.hashing import block_hashes
from scheduler.config import config_from_dict
from scheduler.emulator.cluster import EmulatedCluster, WordTokenizer
from scheduler.emulator.engine import EngineCore, EngineRequest, ScaledClock
from scheduler.intake.engine_metrics import EngineMetricsPoller
from scheduler.intake.kv_events import KVEventSubscriber
from dualmap_pd.cluster import ClusterView
from tests.service_harness import eventually

BS = 16


class VirtualClock:
    """Time moves only when the engine sleeps: a step costs nothing in wall time."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


def _core(**kw: Any) -> tuple[EngineCore, VirtualClock]:
    clock = VirtualClock()
    return EngineCore(CostModel(get_profile("llama8b-h100")), clock=clock, block_size=BS, **kw), clock


async def _first_token_at(core: EngineCore, clock: VirtualClock, req: EngineRequest) -> float:
    await core.submit(req)
    await req.tokens.get()
    return clock.now()


def test_prefill_time_follows_the_profile_and_a_cache_hit_is_cheaper() -> None:
    async def body() -> None:
        core, clock = _core()
        cost = core.cost
        prompt = list(range(1000, 1000 + 40 * BS))
        t1 = await _first_token_at(core, clock, EngineRequest(prompt, max_tokens=1))
        assert t1 == pytest.approx(cost.prefill_time(len(prompt)))
        t0 = clock.now()
        t2 = await _first_token_at(core, clock, EngineRequest(prompt, max_tokens=1)) - t0
        # 39 of 40 blocks hit (one token is always computed; vLLM keeps the last block).
        assert t2 == pytest.approx(cost.prefill_time(BS, 39 * BS))
        assert core.counters.prefix_cache_hits == 39 * BS
        assert core.counters.prefix_cache_queries == 2 * len(prompt)
        await core.stop()

    asyncio.run(body())


def test_chunked_prefill_and_continuous_batching() -> None:
    async def body() -> None:
        core, clock = _core()
        budget = core.cost.profile.max_batch_tokens
        long = EngineRequest(list(range(5000, 5000 + 2 * budget + 10)), max_tokens=1)
        short = EngineRequest(list(range(100, 100 + BS)), max_tokens=3)
        await core.submit(long)
        await core.submit(short)
        await long.tokens.get()
        # Three chunks of at most the budget; the short one rode along in the last step.
        assert core.counters.prompt_tokens == long.n_prompt + short.n_prompt
        for _ in range(3):
            await short.tokens.get()
        assert short.generated == 3 and core.counters.requests_finished == 2
        assert core.num_running == 0
        await core.stop()

    asyncio.run(body())


def test_kv_capacity_holds_requests_back_and_pulls_take_the_link_time() -> None:
    async def body() -> None:
        core, clock = _core(kv_capacity_tokens=3 * BS)
        a = EngineRequest(list(range(1, 1 + 2 * BS)), max_tokens=4)
        b = EngineRequest(list(range(500, 500 + 2 * BS)), max_tokens=1)
        await core.submit(a)
        await core.submit(b)
        await a.tokens.get()
        assert b.remaining_prefill == 0 and not b.hashes  # not admitted while a holds the KV
        for _ in range(3):
            await a.tokens.get()
        await b.tokens.get()  # admitted once a finished
        pulled = EngineRequest(list(range(9000, 9000 + 64)), max_tokens=1, pulled_tokens=64)
        t0 = clock.now()
        await core.submit(pulled)
        assert clock.now() - t0 == pytest.approx(core.cost.transfer_time(core.cost.kv_bytes(64)))
        assert core.counters.nixl_transfers == 1
        await pulled.tokens.get()
        await core.stop()

    asyncio.run(body())


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _config(tmp_path: Path, n_prefill: int = 2) -> Any:
    ports = iter(_free_ports(4 * n_prefill + 2))
    prefill = [{"name": f"prefill-{i}", "host": "127.0.0.1", "port": next(ports),
                "kv_events_port": next(ports), "kv_events_replay_port": next(ports),
                "nixl_side_channel_port": next(ports)} for i in range(n_prefill)]  # fmt: skip
    decode = [{"name": "decode-0", "host": "127.0.0.1", "port": next(ports), "nixl_side_channel_port": next(ports)}]
    return config_from_dict({"model": str(tmp_path), "served_model_name": "tiny", "block_size": BS,
                             "max_model_len": 4096, "run_dir": str(tmp_path / "run"),
                             "prefill": prefill, "decode": decode})  # fmt: skip


async def _complete(session: aiohttp.ClientSession, url: str, prompt: list[int], **extra: Any) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, **extra}
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def test_the_schedulers_kv_event_intake_sees_exactly_what_the_emulated_engine_holds(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    # A prefix cache of 12 blocks: the prompts below overflow it, so BlockRemoved flows too.
    profile = with_overrides(get_profile("llama8b-h100"), prefix_cache_bytes=12 * BS * get_profile("llama8b-h100").kv_bytes_per_token)

    async def body() -> None:
        view = ClusterView(BS)
        for inst in cfg.instances:
            view.add_instance(inst.name, inst.role)
        async with EmulatedCluster(cfg, profile, ScaledClock(50.0), tokenizer=WordTokenizer()) as emu:
            subs = [KVEventSubscriber(i.name, i.kv_events_endpoint, view, BS,
                                      replay_endpoint=i.kv_events_replay_endpoint) for i in cfg.prefill]  # fmt: skip
            for s in subs:
                await s.start()
            for i in cfg.prefill:
                await asyncio.to_thread(emu.instances[i.name].publisher.wait_subscribed)
            shared = list(range(100, 100 + 4 * BS))
            async with aiohttp.ClientSession() as session:
                for k in range(8):
                    prompt = shared + list(range(1000 * (k + 1), 1000 * (k + 1) + 3 * BS + 5))
                    target = emu.instances[cfg.prefill[k % 2].name].server
                    answer = await _complete(session, target.url, prompt,
                                             kv_transfer_params={"do_remote_decode": True})  # fmt: skip
                    params = answer["kv_transfer_params"]
                    assert params["remote_engine_id"] == cfg.prefill[k % 2].name
                    assert params["remote_block_ids"] == [list(range(1, -(-len(prompt) // BS) + 1))]
                    decode = emu.instances["decode-0"].server
                    await _complete(session, decode.url, prompt, kv_transfer_params=params)
            for i in cfg.prefill:
                engine = emu.instances[i.name].server.engine
                held = set(engine.cache.blocks())
                assert len(held) == 12  # full: evictions happened
                assert await eventually(lambda: view[i.name].cached_blocks == held, timeout=5.0), i.name
            assert emu.instances["decode-0"].server.kv.nixl_transfers == 8
            for s in subs:
                await s.stop()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_the_schedulers_metrics_poller_reads_the_emulated_engines(tmp_path: Path) -> None:
    cfg = _config(tmp_path, n_prefill=1)

    async def body() -> None:
        view = ClusterView(BS)
        for inst in cfg.instances:
            view.add_instance(inst.name, inst.role)
        async with EmulatedCluster(cfg, get_profile("llama8b-h100"), ScaledClock(50.0),
                                   tokenizer=WordTokenizer()) as emu:  # fmt: skip
            p0 = emu.instances["prefill-0"].server
            prompt = list(range(300, 300 + 6 * BS))
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    await _complete(session, p0.url, prompt)
                async with session.post(p0.url + "/tokenize", json={"prompt": "ka ri to"}) as resp:
                    assert (await resp.json())["tokens"] == WordTokenizer().encode_text("ka ri to", True)
            urls = {i.name: i.url for i in cfg.instances}
            poller = EngineMetricsPoller(view, urls, interval_s=0.05, model_name="tiny")
            snaps = await poller.poll_once()
            snap = snaps["prefill-0"]
            kv = p0.kv
            assert snap.ok
            assert (snap.prefix_cache_queries, snap.prefix_cache_hits) == (kv.prefix_cache_queries, kv.prefix_cache_hits)
            assert snap.prefix_cache_hits == 2 * 5 * BS
            assert snap.generation_tokens == 6 and snap.prompt_tokens == kv.prompt_tokens
            assert snap.num_requests_running == 0 and snap.kv_cache_usage == 0

    asyncio.run(asyncio.wait_for(body(), 60))


def test_block_hashes_are_the_schedulers() -> None:
    # The emulator's engine hashes are the scheduler's chained hashes, so a router that hashes
    # prompts itself (DualMap's rings) and the engine agree block for block.
    from scheduler.emulator.engine import prompt_blocks

    tokens = list(range(7, 7 + 5 * BS + 3))
    assert prompt_blocks(tokens, BS) == block_hashes(tokens, BS)
