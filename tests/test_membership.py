"""Runtime membership through the admin API, against fake engines: add, drain, undrain, remove;
candidate churn and ring-change metrics; KV-event intake for a joined instance."""

from __future__ import annotations

import asyncio
from typing import Any

from dualmap_pd.hashing import block_hashes
from dualmap_pd.ring import DualRing
from scheduler.service import default_intake
from tests.fakes.kv_publisher import FakeBlockPool, FakeKVPublisher
from tests.fakes.openai_server import FakeOpenAIServer, FakeServerConfig
from tests.service_harness import BLOCK, Harness, cluster, completion, eventually, run

TOKEN = "admin-token-for-tests-0123456789"
ADMIN = {"token": TOKEN}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREFILL_HEADER = "X-DualMap-Prefill-Instance"


async def admin(h: Harness, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with h.client.request(method, h.url + path, json=body, headers=AUTH) as r:
        return r.status, await r.json()


def new_prefill_body(server: FakeOpenAIServer, name: str = "prefill-new", **extra: Any) -> dict[str, Any]:
    return {"role": "prefill", "name": name, "url": server.url, "nixl_side_channel_port": 40190,
            "kv_events_port": 40290, **extra}  # fmt: skip


def prompts(n: int) -> list[list[int]]:
    """Token-id prompts with distinct first blocks (distinct routing keys)."""
    return [[5 + (i * 7 + j) % 250 for j in range(2 * BLOCK)] for i in range(n)]


def test_join_sends_new_prefixes_to_the_newcomer_and_reports_candidate_churn() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2, admin=ADMIN) as h, FakeOpenAIServer() as extra:
            batch = prompts(60)
            for p in batch:
                assert (await h.post("/v1/completions", completion(p)))[0] == 200
            status, info = await admin(h, "POST", "/admin/instances", new_prefill_body(extra))
            assert status == 201, info
            assert info["name"] == "prefill-new" and info["healthy"] and not info["draining"]
            # The reported churn is exactly what two rings built from the memberships give.
            keys = {block_hashes(p, BLOCK)[0] for p in batch}
            before, after = DualRing(["prefill-0", "prefill-1"]), DualRing(["prefill-0", "prefill-1", "prefill-new"])
            moved = sum(set(before.candidates(k)) != set(after.candidates(k)) for k in keys)
            assert info["change"] == {"prefixes_checked": len(keys), "prefixes_moved": moved,
                                      "moved_fraction": moved / len(keys)}  # fmt: skip
            assert 0 < moved < len(keys)
            # New prefixes whose candidates include the newcomer can land there.
            fresh = [[200 + (i * 3 + j) % 50 for j in range(2 * BLOCK)] for i in range(40)]
            landed = set()
            for p in fresh:
                status, headers, _ = await h.post("/v1/completions", completion(p))
                assert status == 200
                landed.add(headers[PREFILL_HEADER])
            assert "prefill-new" in landed and len(extra.requests) > 0
            text = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_ring_changes_total{kind="join",role="prefill"} 1.0' in text
            assert f'dualmap_ring_prefixes_moved_total{{kind="join"}} {float(moved)}' in text
            assert f"dualmap_ring_last_change_moved_fraction {moved / len(keys)}" in text

    run(body)


def test_listing_and_single_instance_views() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2, n_decode=1, admin=ADMIN) as h:
            status, listing = await admin(h, "GET", "/admin/instances")
            assert status == 200
            assert {(i["name"], i["role"]) for i in listing["data"]} == {
                ("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode")}
            status, one = await admin(h, "GET", "/admin/instances/decode-0")
            assert status == 200 and one["url"] == h.decode[0].url and one["in_flight"] == 0
            status, err = await admin(h, "GET", "/admin/instances/nope")
            assert status == 404 and err["error"]["code"] == "instance_not_found"

    run(body)


def test_draining_readmits_queued_requests_to_their_backup_and_loses_none() -> None:
    async def body() -> None:
        slow = FakeServerConfig(first_token_delay_s=0.15)
        async with cluster(n_prefill=2, prefill_config=slow, max_engine_pending=1, admin=ADMIN) as h:
            view = h.scheduler.view
            # Everything queues on prefill-0 while prefill-1 drains.
            assert (await admin(h, "POST", "/admin/instances/prefill-1/drain"))[0] == 200
            tasks = [asyncio.create_task(h.post("/v1/completions", completion(f"request {i}")))
                     for i in range(8)]  # fmt: skip
            assert await eventually(lambda: len(view["prefill-0"].queue) >= 5)
            assert (await admin(h, "POST", "/admin/instances/prefill-1/undrain"))[0] == 200
            status, info = await admin(h, "POST", "/admin/instances/prefill-0/drain")
            assert status == 200 and info["draining"] and info["queued"] == 0
            readmitted = info["readmitted"]
            assert readmitted >= 4
            results = await asyncio.gather(*tasks)
            assert [r[0] for r in results] == [200] * 8  # none lost
            served = [r[1][PREFILL_HEADER] for r in results]
            assert served.count("prefill-1") == readmitted
            assert served.count("prefill-0") == 8 - readmitted  # in its engine: finished there
            # New work avoids the draining instance.
            for i in range(6):
                _, headers, _ = await h.post("/v1/completions", completion(f"after drain {i}"))
                assert headers[PREFILL_HEADER] == "prefill-1"
            assert len(h.scheduler.router) == 0
            text = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_ring_changes_total{kind="drain",role="prefill"} 2.0' in text
            assert 'dualmap_instance_draining{instance="prefill-0",role="prefill"} 1.0' in text

    run(body)


def test_removing_a_busy_instance_waits_until_it_is_idle() -> None:
    async def body() -> None:
        slow = FakeServerConfig(first_token_delay_s=0.3)
        async with cluster(n_prefill=2, prefill_config=slow, admin=ADMIN) as h:
            view = h.scheduler.view
            assert (await admin(h, "POST", "/admin/instances/prefill-1/drain"))[0] == 200
            task = asyncio.create_task(h.post("/v1/completions", completion("in flight")))
            assert await eventually(lambda: view["prefill-0"].engine_pending_requests == 1)
            assert (await admin(h, "POST", "/admin/instances/prefill-1/undrain"))[0] == 200
            status, info = await admin(h, "DELETE", "/admin/instances/prefill-0")
            assert status == 202 and info["status"] == "removing" and info["draining"]
            assert "prefill-0" in view  # still finishing its request
            status, _, _ = await task
            assert status == 200
            assert await eventually(lambda: "prefill-0" not in view, timeout=5)
            assert "prefill-0" not in h.scheduler.urls
            assert "prefill-0" not in {i.name for i in h.scheduler.config.prefill}
            _, headers, _ = await h.post("/v1/completions", completion("after removal"))
            assert headers[PREFILL_HEADER] == "prefill-1"
            text = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_ring_changes_total{kind="leave",role="prefill"} 1.0' in text

    run(body)


def test_remove_idle_now_refuse_the_last_one_and_unknown_names() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2, n_decode=2, admin=ADMIN) as h:
            status, info = await admin(h, "DELETE", "/admin/instances/decode-1")
            assert status == 200 and info["status"] == "removed"
            assert "decode-1" not in h.scheduler.view
            status, err = await admin(h, "DELETE", "/admin/instances/decode-0")
            assert status == 409 and err["error"]["code"] == "membership_conflict"
            status, err = await admin(h, "DELETE", "/admin/instances/ghost")
            assert status == 404
            status, err = await admin(h, "DELETE", "/admin/instances/prefill-0?force=maybe")
            assert status == 400 and err["error"]["param"] == "force"
            for i in range(4):  # the remaining decode instance serves
                _, headers, _ = await h.post("/v1/completions", completion(f"decode {i}"))
                assert headers["X-DualMap-Decode-Instance"] == "decode-0"

    run(body)


def test_draining_a_decode_instance_moves_new_decodes_away() -> None:
    async def body() -> None:
        async with cluster(n_prefill=1, n_decode=2, admin=ADMIN) as h:
            assert (await admin(h, "POST", "/admin/instances/decode-0/drain"))[0] == 200
            for i in range(8):
                status, headers, _ = await h.post("/v1/completions", completion(f"d {i}"))
                assert status == 200 and headers["X-DualMap-Decode-Instance"] == "decode-1"
            assert (await admin(h, "POST", "/admin/instances/decode-0/undrain"))[0] == 200
            used = set()
            for i in range(16):
                _, headers, _ = await h.post("/v1/completions", completion(f"e {i}"))
                used.add(headers["X-DualMap-Decode-Instance"])
            assert used == {"decode-0", "decode-1"}

    run(body)


def test_an_instance_not_up_yet_joins_once_healthy() -> None:
    async def body() -> None:
        async with cluster(n_prefill=1, admin=ADMIN) as h, FakeOpenAIServer() as extra:
            extra.healthy = False
            status, info = await admin(h, "POST", "/admin/instances", new_prefill_body(extra))
            assert status == 201 and info["healthy"] is False
            assert await eventually(lambda: not h.scheduler.view["prefill-new"].eligible)
            extra.healthy = True
            assert await eventually(lambda: h.scheduler.view["prefill-new"].eligible, timeout=5)

    run(body)


def test_add_rejects_bad_bodies_duplicates_and_port_clashes() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2, admin=ADMIN) as h, FakeOpenAIServer() as extra:
            taken_kv_port = h.scheduler.config.prefill[0].kv_events_port
            cases: list[tuple[Any, int, str | None]] = [
                ({**new_prefill_body(extra), "role": "router"}, 400, "role"),
                ({**new_prefill_body(extra), "url": "ftp://127.0.0.1:1"}, 400, "url"),
                ({**new_prefill_body(extra), "url": "http://127.0.0.1"}, 400, "url"),
                ({k: v for k, v in new_prefill_body(extra).items() if k != "kv_events_port"}, 400, "instance"),
                ({**new_prefill_body(extra), "name": "../etc"}, 400, "instance"),
                ({**new_prefill_body(extra), "bogus": 1}, 400, "instance"),
                ({**new_prefill_body(extra), "name": "prefill-0"}, 409, "name"),
                ({**new_prefill_body(extra), "kv_events_port": taken_kv_port}, 409, None),  # prefill-0's
                ([1, 2], 400, "body"),
            ]
            for payload, want, param in cases:
                status, err = await admin(h, "POST", "/admin/instances", payload)
                assert status == want, (payload, err)
                assert err["error"]["param"] == param and err["error"]["message"]
            async with h.client.post(h.url + "/admin/instances", data=b"{not json", headers=AUTH) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
            assert h.scheduler.view.names("prefill") == ["prefill-0", "prefill-1"]
            assert (await h.post("/v1/completions", completion()))[0] == 200

    run(body)


def test_a_joined_prefill_instance_gets_its_kv_events_subscribed() -> None:
    prompt = list(range(20, 20 + 3 * BLOCK))

    async def body() -> None:
        with FakeKVPublisher() as pub_new:
            intake = default_intake(kv_events=True, engine_metrics=False)
            async with cluster(n_prefill=1, intake=intake, admin=ADMIN) as h, FakeOpenAIServer() as extra:
                port = int(pub_new.endpoint.rsplit(":", 1)[1])
                status, _ = await admin(h, "POST", "/admin/instances", new_prefill_body(extra, kv_events_port=port))
                assert status == 201
                assert await asyncio.to_thread(pub_new.wait_subscribed)
                pool = FakeBlockPool(block_size=BLOCK)
                pub_new.publish(pool.run(pub_new, prompt))
                view = h.scheduler.view
                ours = {o for _, o in pool.chain(prompt)}
                assert await eventually(lambda: ours <= view["prefill-new"].cached_blocks)
                # Removing it stops the subscription and forgets its cache.
                assert (await admin(h, "DELETE", "/admin/instances/prefill-new"))[0] == 200
                assert "prefill-new" not in view
                assert not any(getattr(s, "instance", None) == "prefill-new" for s in h.scheduler.services)
                assert all("prefill-new" not in view.holders(b) for b in ours)

    run(body)


def test_churn_counts_a_hot_prefix_by_the_deeper_keys_dualmap_routes_it_by() -> None:
    async def body() -> None:
        # Four instances: a prefix is hot above 2/n of the traffic, which two could never exceed.
        async with cluster(n_prefill=4, admin=ADMIN) as h, FakeOpenAIServer() as extra:
            system = [7] * BLOCK  # one shared first block: a hot system prompt
            for i in range(60):
                user = [5 + (i * 13 + j) % 250 for j in range(BLOCK)]
                assert (await h.post("/v1/completions", completion(system + user)))[0] == 200
            status, info = await admin(h, "POST", "/admin/instances", new_prefill_body(extra))
            assert status == 201
            # Once the prefix is hot (after the detector's 20-request window), each request is
            # keyed by its second block: dozens of keys, not the single shared first block.
            assert info["change"]["prefixes_checked"] > 20

    run(body)


def test_no_request_is_lost_while_instances_join_drain_and_leave_under_load() -> None:
    async def body() -> None:
        slow = FakeServerConfig(first_token_delay_s=0.02)
        async with cluster(n_prefill=3, prefill_config=slow, max_engine_pending=1, admin=ADMIN) as h, \
                FakeOpenAIServer(slow) as extra:  # fmt: skip
            tasks = [asyncio.create_task(h.post("/v1/completions", completion(f"load {i % 17} {i}")))
                     for i in range(60)]  # fmt: skip
            ops = [("POST", "/admin/instances", new_prefill_body(extra)),
                   ("POST", "/admin/instances/prefill-0/drain", None),
                   ("DELETE", "/admin/instances/prefill-1", None),
                   ("POST", "/admin/instances/prefill-0/undrain", None),
                   ("POST", "/admin/instances/prefill-2/drain", None),
                   ("DELETE", "/admin/instances/prefill-new?force=true", None)]  # fmt: skip
            for method, path, payload in ops:
                await asyncio.sleep(0.03)
                status, info = await admin(h, method, path, payload)
                assert status in (200, 201, 202), info
            results = await asyncio.gather(*tasks)
            assert [r[0] for r in results] == [200] * 60
            assert await eventually(lambda: "prefill-1" not in h.scheduler.view, timeout=5)
            assert h.scheduler.view.names("prefill") == ["prefill-0", "prefill-2"]
            assert len(h.scheduler.router) == 0
            assert all(not h.scheduler.view[n].queue for n in ("prefill-0", "prefill-2"))

    run(body)
