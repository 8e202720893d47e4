"""Fault outcomes of the P/D handoff against fake engines (docs/fault_handling.md).

Each test injects one fault and checks the defined outcome: which instance finishes the request,
whether the prompt is prefilled again, what the client sees, and that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from pathlib import Path

from scheduler.intake.kv_events import KVEventSubscriber
from scheduler.service import Scheduler
from tests.fakes.kv_publisher import FakeBlockPool, FakeKVPublisher
from tests.fakes.openai_server import FakeServerConfig, Fault, fault_by_max_tokens
from tests.service_harness import BLOCK, Harness, cluster, completion, eventually, run

SLOW = FakeServerConfig(first_token_delay_s=30.0)  # a prefill that will not finish in a test


def _sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def _served(h: Harness) -> list[int]:
    return [len(s.requests) for s in h.prefill]


async def _posts(h: Harness, n: int, tag: str, **extra: Any) -> list[tuple[int, dict[str, str], Any]]:
    return await asyncio.gather(*(h.post("/v1/completions", completion(f"{tag}{i}", **extra))
                                  for i in range(n)))  # fmt: skip


def _assert_clean(h: Harness) -> None:
    assert len(h.scheduler.router) == 0
    assert all(st.running_requests == 0 for st in h.scheduler.view.instances("decode"))


# --- prefill instance dies -----------------------------------------------------------------


def test_prefill_killed_with_requests_queued_and_in_engine_loses_none() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2, max_engine_pending=1) as h:
            h.prefill[0].config = SLOW
            tasks = asyncio.ensure_future(_posts(h, 8, "k"))
            # prefill-0 holds one request in its engine and queues the rest of its share.
            assert await eventually(lambda: len(h.prefill[0].requests) >= 1)
            assert await eventually(lambda: len(h.scheduler.view["prefill-0"].queue) >= 1)
            await h.prefill[0].stop()  # kill: connections drop, the port refuses
            results = await tasks
            assert [r[0] for r in results] == [200] * 8, results
            assert {r[1]["X-DualMap-Prefill-Instance"] for r in results} == {"prefill-1"}
            assert not h.scheduler.view["prefill-0"].healthy
            assert h.scheduler.metrics.errors.value(("prefill_retried",)) >= 1
            _assert_clean(h)

    run(body)


def test_hung_prefill_is_cut_when_its_health_check_fails_and_requests_move() -> None:
    async def body() -> None:
        # The request timeout (600 s) never fires here: the circuit opening does the work.
        async with cluster(n_prefill=2, max_engine_pending=4) as h:
            h.prefill[0].config = SLOW
            tasks = asyncio.ensure_future(_posts(h, 6, "hung"))
            assert await eventually(lambda: len(h.prefill[0].requests) >= 1)
            h.prefill[0].healthy = False  # alive, holding the connections, /health says 503
            results = await tasks
            assert [r[0] for r in results] == [200] * 6, results
            assert {r[1]["X-DualMap-Prefill-Instance"] for r in results} == {"prefill-1"}
            assert await eventually(lambda: h.prefill[0].disconnects >= 1)  # its requests were aborted
            _assert_clean(h)

    run(body)


def test_prefill_503_is_retried_on_the_backup_candidate() -> None:
    async def body() -> None:
        broken = FakeServerConfig(fault_for=lambda b: Fault("status", status_code=503))
        async with cluster(n_prefill=2, health_failure_threshold=1) as h:
            h.prefill[0].config = broken
            results = await _posts(h, 6, "e")
            assert [r[0] for r in results] == [200] * 6
            assert {r[1]["X-DualMap-Prefill-Instance"] for r in results} == {"prefill-1"}
            _assert_clean(h)

    run(body)


def test_every_prefill_dead_gives_503_no_instance_not_a_hang() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2) as h:
            for s in h.prefill:
                await s.stop()
            status, _, answer = await h.post("/v1/completions", completion("z"))
            assert status in (502, 503), answer
            status, _, answer = await h.post("/v1/completions", completion("z2"))
            assert status == 503 and answer["error"]["code"] == "no_instance"
            _assert_clean(h)

    run(body)


# --- decode instance dies ------------------------------------------------------------------


def test_decode_dying_before_its_first_token_is_retried_with_a_fresh_prefill() -> None:
    async def body() -> None:
        async with cluster(n_prefill=1, n_decode=2) as h:
            h.decode[0].config = FakeServerConfig(fault_for=lambda b: Fault("disconnect", after_tokens=0))
            h.scheduler.view["decode-1"].active_tokens = 10**6  # so the policy picks decode-0 first
            for i in range(3):
                status, headers, text = await h.post("/v1/completions", completion(f"d{i}", stream=True))
                assert status == 200 and headers["X-DualMap-Decode-Instance"] == "decode-1"
                events = _sse_events(text)
                assert events[-1] == "[DONE]"
                assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == " t0 t1 t2 t3"
            # decode-0 may have read the prefill's KV before dying: each request was prefilled
            # again for its retry. A drop after the headers is soft evidence: the third opens
            # decode-0's circuit (threshold 3).
            assert _served(h) == [6]
            assert h.scheduler.metrics.errors.value(("decode_reprefilled",)) == 3
            assert not h.scheduler.view["decode-0"].healthy
            assert all(st.running_requests == 0 for st in h.scheduler.view.instances("decode"))

    run(body)


def test_decode_503_before_streaming_is_retried_on_another_decoder() -> None:
    async def body() -> None:
        async with cluster(n_prefill=1, n_decode=2, health_failure_threshold=5) as h:
            h.decode[0].config = FakeServerConfig(fault_for=lambda b: Fault("status", status_code=503))
            for i in range(4):
                status, headers, answer = await h.post("/v1/completions", completion(f"f{i}"))
                assert status == 200, answer
                assert headers["X-DualMap-Decode-Instance"] == "decode-1"
            _assert_clean(h)

    run(body)


def test_engine_500_is_one_requests_failure_not_the_instances() -> None:
    async def body() -> None:
        # A crafted request that makes engines fail must not take them out of service.
        err = FakeServerConfig(fault_for=lambda b: Fault("status", status_code=500)
                               if b.get("user") == "poison" else None)  # fmt: skip
        async with cluster(n_prefill=1, n_decode=2, decode_config=err, health_failure_threshold=1) as h:
            for i in range(5):
                status, _, answer = await h.post("/v1/completions", completion(f"p{i}", user="poison"))
                assert status == 502 and answer["error"]["code"] == "upstream_error"
            assert all(st.healthy for st in h.scheduler.view.instances())
            assert sum(len(s.requests) for s in h.decode) == 5  # not retried either
            status, _, _ = await h.post("/v1/completions", completion("fine"))
            assert status == 200
            _assert_clean(h)

    run(body)


def test_decode_dying_mid_stream_ends_with_an_error_event_and_done() -> None:
    async def body() -> None:
        dies = FakeServerConfig(fault_for=lambda b: Fault("disconnect", after_tokens=2))
        async with cluster(n_prefill=1, n_decode=1, decode_config=dies) as h:
            status, headers, text = await h.post("/v1/completions", completion("m", stream=True))
            assert status == 200
            events = _sse_events(text)
            assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == [" t0", " t1"]
            error = json.loads(events[2])["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "upstream_error" and "decode-0" in error["message"]
            assert events[3:] == ["[DONE]"]
            # Soft evidence (a handler crash looks the same): one strike, still in service.
            assert h.scheduler.view["decode-0"].healthy
            assert h.scheduler.health.breaker("decode-0").failures == 1
            _assert_clean(h)

    run(body)


def test_non_streamed_decode_dying_mid_body_is_retried_with_a_fresh_prefill() -> None:
    async def body() -> None:
        # A non-streamed answer reaches the client only once complete: a death mid-body is
        # still invisible to it, so the request is retried.
        dies = FakeServerConfig(fault_for=lambda b: Fault("disconnect"))
        async with cluster(n_prefill=1, n_decode=2) as h:
            h.decode[0].config = dies
            results = await _posts(h, 4, "n")
            assert [r[0] for r in results] == [200] * 4, results
            assert {r[1]["X-DualMap-Decode-Instance"] for r in results} == {"decode-1"}
            assert all(r[2]["choices"][0]["text"] == " t0 t1 t2 t3" for r in results)
            reprefilled = h.scheduler.metrics.errors.value(("decode_reprefilled",))
            assert reprefilled >= 1 and _served(h) == [4 + reprefilled]
            _assert_clean(h)

    run(body)


def test_decoder_refusing_connections_is_retried_without_a_second_prefill() -> None:
    async def body() -> None:
        async with cluster(n_prefill=1, n_decode=2) as h:
            await h.decode[0].stop()
            results = await _posts(h, 4, "r")
            assert [r[0] for r in results] == [200] * 4
            assert _served(h) == [4]  # refused before sending: the KV was untouched
            _assert_clean(h)

    run(body)


def test_lone_decoder_dead_gives_clean_503() -> None:
    async def body() -> None:
        async with cluster(n_prefill=1, n_decode=1) as h:
            await h.decode[0].stop()
            # Refused, circuit opened, no other decoder for the retry.
            status, _, answer = await h.post("/v1/completions", completion("l", stream=True))
            assert status == 503 and answer["error"]["code"] == "no_instance"
            status, _, answer = await h.post("/v1/completions", completion("l2", stream=True))
            assert status == 503 and answer["error"]["code"] == "no_instance"
            _assert_clean(h)

    run(body)


# --- the scheduler restarts ----------------------------------------------------------------


def test_restarted_scheduler_rebuilds_its_index_from_the_engines_replay_buffer() -> None:
    prompt = list(range(30, 30 + 3 * BLOCK + 5))

    async def body() -> None:
        pubs = [FakeKVPublisher(replay_endpoint="tcp://127.0.0.1:*") for _ in range(2)]

        def intake(sched: Scheduler) -> list[KVEventSubscriber]:
            return [KVEventSubscriber(f"prefill-{i}", p.endpoint, sched.view, BLOCK,
                                      replay_endpoint=p.replay_endpoint)
                    for i, p in enumerate(pubs)]  # fmt: skip

        try:
            pool = FakeBlockPool(block_size=BLOCK)
            ours = {o for _, o in pool.chain(prompt)}
            async with cluster(n_prefill=2, intake=intake) as first:
                await asyncio.to_thread(pubs[1].wait_subscribed)
                pubs[1].publish(pool.run(pubs[1], prompt))
                assert await eventually(lambda: ours <= first.scheduler.view["prefill-1"].cached_blocks)
            # A new scheduler process: empty view, and the engines publish nothing new.
            async with cluster(n_prefill=2, intake=intake) as second:
                view = second.scheduler.view
                assert await eventually(lambda: ours <= view["prefill-1"].cached_blocks)
                assert not view["prefill-0"].cached_blocks
                for _ in range(3):
                    status, headers, _ = await second.post("/v1/completions", completion(prompt))
                    assert status == 200 and headers["X-DualMap-Prefill-Instance"] == "prefill-1"
        finally:
            for p in pubs:
                p.close()

    run(body)


# --- the client leaves -------------------------------------------------------------------------


def test_client_hanging_up_on_a_fast_stream_is_quiet_and_aborts_the_decode(caplog: Any) -> None:
    async def body() -> None:
        async with cluster(n_decode=1) as h:
            for i in range(5):
                req = completion(f"bye{i}", max_tokens=200, stream=True)
                async with h.client.post(h.url + "/v1/completions", json=req) as resp:
                    assert resp.status == 200
                    await resp.content.readany()
                    resp.close()  # gone while the decoder is still streaming
            st = h.scheduler.view["decode-0"]
            assert await eventually(lambda: st.running_requests == 0 and st.active_tokens == 0)
            assert await eventually(lambda: h.scheduler.metrics.errors.value(("client_disconnected",)) == 5)
            assert h.scheduler.health.breaker("decode-0").failures == 0  # not the engine's fault
            status, _, _ = await h.post("/v1/completions", completion("next"))
            assert status == 200

    with caplog.at_level("ERROR"):
        run(body)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text[:2000]


def test_scheduler_counters_agree_with_the_replay_client() -> None:
    """A client hanging up right after the final [DONE] (the replay client does, without waiting
    for the chunked trailer) got its whole answer: the scheduler must count it as served, not
    as a disconnect. Only real mid-stream hang-ups are disconnects."""
    from scheduler.replay.client import ReplayOptions, replay

    trace = Path(__file__).resolve().parents[1] / "scripts" / "traces" / "hot_prefix_sample.jsonl"
    # The decoder lingers between [DONE] and the end of its answer, so every client hang-up
    # after [DONE] reaches the scheduler while it is still relaying.
    # max_tokens=7: the decode stream breaks after two tokens (an error event, outcome "error").
    linger = FakeServerConfig(done_linger_s=0.05,
                              fault_for=fault_by_max_tokens({7: Fault("disconnect", after_tokens=2)}))

    async def body() -> None:
        async with cluster(n_decode=2, decode_config=linger) as h:
            options = ReplayOptions(trace=trace, url=h.url, requests=40, qps=200.0,
                                    max_prompt_tokens=120, max_output_tokens=6,
                                    prompt_format="tokens", vocab_size=250)  # fmt: skip
            report = await replay(options)
            client = report.summary()
            assert client["completed"] == 40 and client["failed"] == 0, client
            m = h.scheduler.metrics
            await eventually(lambda: m.requests.value(("completions", "ok")) == 40)
            assert m.requests.value(("completions", "ok")) == client["completed"]
            assert m.requests.value(("completions", "cancelled")) == 0
            assert dict(m.errors.values) == {}, dict(m.errors.values)
            assert m.e2e_by_stream[True].count == client["completed"]
            for i in range(3):  # now three real hang-ups, mid-answer
                req = completion(f"leaving{i}", max_tokens=200, stream=True)
                async with h.client.post(h.url + "/v1/completions", json=req) as resp:
                    await resp.content.readany()
                    resp.close()
            assert await eventually(lambda: m.errors.value(("client_disconnected",)) == 3)
            assert m.requests.value(("completions", "cancelled")) == 3
            for i in range(2):  # and two answers that break mid-stream on the decoder
                _, _, text = await h.post("/v1/completions", completion(f"broken{i}", max_tokens=7, stream=True))
                assert '"upstream_error"' in text and text.rstrip().endswith("data: [DONE]")
            assert m.requests.value(("completions", "error")) == m.errors.value(("upstream_decode_stream",)) == 2
            assert m.requests.value(("completions", "ok")) == 40
            assert m.e2e_by_stream[True].count == 40

    run(body)
