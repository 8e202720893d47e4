"""Two scheduler replicas over the same engines pick the same candidates (docs/replicas.md).

The rings are a pure function of the membership, so replicas agree on every prefix's two
candidates without talking to each other; with the same KV events they also agree on where a
cached prefix is; with equal loads (no requests of their own in flight) on the first choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp

from dualmap_pd.hashing import block_hashes
from scheduler.http.app import bound_port, create_app, start_site
from scheduler.service import IntakeFactory, Scheduler, SchedulerOptions, default_intake
from tests.fakes.kv_publisher import FakeBlockPool, FakeKVPublisher
from tests.fakes.openai_server import FakeOpenAIServer
from tests.service_harness import BLOCK, ByteTokenizer, completion, eventually, fake_cluster_config, run

TOKEN = "replica-admin-token-0123456789"
PREFILL_HEADER = "X-DualMap-Prefill-Instance"


@asynccontextmanager
async def replicas(n_prefill: int, kv_events_ports: list[int] | None = None,
                   intake: IntakeFactory | None = None) -> AsyncIterator[tuple[list[Scheduler], list[str], Any]]:  # fmt: skip
    """Two Scheduler apps with the same config over one set of fake engines."""
    async with AsyncExitStack() as stack:
        prefill = [await stack.enter_async_context(FakeOpenAIServer()) for _ in range(n_prefill)]
        decode = [await stack.enter_async_context(FakeOpenAIServer())]
        cfg = fake_cluster_config(prefill, decode, kv_events_ports, admin={"token": TOKEN})
        scheds, urls = [], []
        for _ in range(2):
            sched = Scheduler(cfg, ByteTokenizer(), options=SchedulerOptions(health_interval_s=0.1), intake=intake)
            runner = await start_site(create_app(sched), "127.0.0.1", 0)
            stack.push_async_callback(runner.cleanup)
            scheds.append(sched)
            urls.append(f"http://127.0.0.1:{bound_port(runner)}")
        client = await stack.enter_async_context(aiohttp.ClientSession())
        yield scheds, urls, client


async def post(client: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, str]:
    async with client.post(url + "/v1/completions", json=body) as r:
        await r.read()
        return r.status, r.headers.get(PREFILL_HEADER, "")


def _prompts(n: int, salt: int = 0) -> list[list[int]]:
    return [[5 + (i * 11 + j + salt) % 250 for j in range(2 * BLOCK + 3)] for i in range(n)]


def _pairs(sched: Scheduler, batch: list[list[int]]) -> list[tuple[str, ...]]:
    out = []
    for p in batch:
        req = sched.new_request(p, 4, 0.0)
        sched.router.sync_membership()
        out.append(sched.prefill_policy.candidates_for(req)[1])  # type: ignore[attr-defined]
    return out


def test_same_membership_same_candidate_pairs_and_same_first_choice() -> None:
    async def body() -> None:
        async with replicas(n_prefill=4) as (scheds, urls, client):
            batch = _prompts(40)
            a, b = _pairs(scheds[0], batch), _pairs(scheds[1], batch)
            assert a == b and len(set(a)) > 3  # identical and not trivially constant
            # Sequential requests: loads are equal (nothing in flight), so the first choice agrees.
            for p in batch:
                (sa, ia), (sb, ib) = await post(client, urls[0], completion(p)), await post(client, urls[1], completion(p))
                assert sa == sb == 200 and ia == ib
            # The same membership change on both keeps them in step (each gets its own admin call).
            async with FakeOpenAIServer() as extra:
                for url in urls:
                    body = {"role": "prefill", "name": "prefill-new", "url": extra.url,
                            "nixl_side_channel_port": 40190, "kv_events_port": 40290}  # fmt: skip
                    async with client.post(url + "/admin/instances", json=body,
                                           headers={"Authorization": f"Bearer {TOKEN}"}) as r:  # fmt: skip
                        assert r.status == 201
                a2, b2 = _pairs(scheds[0], batch), _pairs(scheds[1], batch)
                assert a2 == b2 and a2 != a and any("prefill-new" in pair for pair in a2)

    run(body)


def test_replicas_fed_the_same_kv_events_send_a_cached_prefix_to_the_same_instance() -> None:
    async def body() -> None:
        with FakeKVPublisher() as pub0, FakeKVPublisher() as pub1:
            ports = [int(p.endpoint.rsplit(":", 1)[1]) for p in (pub0, pub1)]
            intake = default_intake(kv_events=True, engine_metrics=False)
            async with replicas(n_prefill=2, kv_events_ports=ports, intake=intake) as (scheds, urls, client):
                # Both replicas subscribe to every engine's event stream (PUB fans out).
                await asyncio.to_thread(pub1.wait_subscribed)
                prompt = _prompts(1, salt=99)[0]
                pool = FakeBlockPool(block_size=BLOCK)
                # prefill-1's engine reports the prompt cached: both replicas learn it and follow it.
                pub1.publish(pool.run(pub1, prompt))
                ours = set(block_hashes(prompt, BLOCK))
                for s in scheds:
                    assert await eventually(lambda s=s: ours <= s.view["prefill-1"].cached_blocks)
                for _ in range(3):
                    (sa, ia), (sb, ib) = await post(client, urls[0], completion(prompt)), await post(client, urls[1], completion(prompt))
                    assert sa == sb == 200 and ia == ib == "prefill-1"

    run(body)
