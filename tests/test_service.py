"""The live scheduler against fake vLLM servers: the P/D flow, errors, late dispatch, disconnects."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.fakes.openai_server import FakeOpenAIServer, FakeServerConfig, Fault
from tests.service_harness import BLOCK, MAX_MODEL_LEN, MODEL, cluster, completion, eventually, run


# --- the P/D flow ---------------------------------------------------------------------------


def test_completion_is_prefilled_then_decoded_with_the_kv_params() -> None:
    async def body() -> None:
        async with cluster() as h:
            status, headers, answer = await h.post("/v1/completions", completion(max_tokens=5))
            assert status == 200, answer
            assert answer["choices"][0]["text"] == " t0 t1 t2 t3 t4"
            (pre,) = [r for s in h.prefill for r in s.requests]
            assert pre["max_tokens"] == 1 and pre["stream"] is False
            assert pre["kv_transfer_params"] == {"do_remote_decode": True}
            (dec,) = h.decode[0].requests
            assert dec["max_tokens"] == 5 and dec["prompt"] == "hello world"
            served_by = h.prefill[int(headers["X-DualMap-Prefill-Instance"][-1])]
            assert dec["kv_transfer_params"]["remote_engine_id"] == f"fake-{served_by.port}"
            assert headers["X-DualMap-Decode-Instance"] == "decode-0"
            assert len(h.scheduler.router) == 0
            assert h.scheduler.view["decode-0"].running_requests == 0
            assert h.scheduler.metrics.overhead_series.count == 1

    run(body)


def test_chat_stream_is_relayed_as_sse() -> None:
    async def body() -> None:
        async with cluster() as h:
            req = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                   "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            status, headers, text = await h.post("/v1/chat/completions", req)
            assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
            events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            assert content == " t0 t1 t2"
            assert chunks[-1]["usage"]["completion_tokens"] == 3
            (pre,) = [r for s in h.prefill for r in s.requests]
            assert "stream_options" not in pre and pre["messages"] == req["messages"]
            assert h.decode[0].requests[0]["stream"] is True

    run(body)


def test_prompt_as_token_ids_and_shared_prefix_routing() -> None:
    async def body() -> None:
        async with cluster(n_prefill=4) as h:
            prefix = list(range(10, 10 + 3 * BLOCK))
            seen = set()
            for tail in range(5):
                status, headers, _ = await h.post("/v1/completions", completion(prefix + [100 + tail]))
                assert status == 200
                seen.add(headers["X-DualMap-Prefill-Instance"])
            # Same first blocks -> same routing key -> the same two DualMap candidates (with no
            # KV events here, the load tie-break picks between them).
            assert len(seen) <= 2

    run(body)


# --- bad input ------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "fake-model", "prompt": "x"', 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "max_tokens": 4}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("/v1/completions", completion(max_tokens="4"), 400, "invalid_value"),
    ("/v1/completions", completion(stream="yes"), 400, "invalid_value"),
    ("/v1/completions", completion(prompt=5), 400, "invalid_value"),
    ("/v1/completions", completion(prompt=[1, 2, 999]), 400, "invalid_value"),
    ("/v1/completions", completion(prompt=["a", "b"]), 400, "invalid_value"),
    ("/v1/completions", completion(n=2), 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]}, 400, "invalid_value"),
    ("/v1/completions", completion(model="gpt-4"), 404, "model_not_found"),
    ("/v1/completions", completion(prompt="x" * 300), 400, "context_length_exceeded"),
    ("/v1/completions", completion(max_tokens=MAX_MODEL_LEN), 400, "context_length_exceeded"),
    ("/v1/completions", completion(prompt="x" * 70_000), 413, "request_too_large"),
    ("/v1/nothing", completion(), 404, "not_found"),
]


@pytest.mark.parametrize("path,request_body,status,code", BAD_REQUESTS)
def test_bad_input_gets_openai_error_and_next_request_succeeds(
    path: str, request_body: Any, status: int, code: str
) -> None:
    async def body() -> None:
        async with cluster() as h:
            got, _, answer = await h.post(path, request_body)
            assert got == status, answer
            assert set(answer) == {"error"}
            assert set(answer["error"]) == {"message", "type", "param", "code"}
            assert answer["error"]["code"] == code and answer["error"]["message"]
            assert not any(s.requests for s in h.prefill + h.decode)  # no engine time spent
            good, _, _ = await h.post("/v1/completions", completion())
            assert good == 200
            metrics = await (await h.client.get(h.url + "/metrics")).text()
            assert "dualmap_errors_total{" in metrics

    run(body)


def test_engine_errors_keep_client_errors_and_hide_server_errors() -> None:
    def fault(body: dict[str, Any]) -> Fault | None:
        prompt = body.get("prompt", "")
        return Fault("status", status_code=400) if "REJECT" in prompt else \
            Fault("status", status_code=500) if "CRASH" in prompt else None  # fmt: skip

    async def body() -> None:
        async with cluster(prefill_config=FakeServerConfig(fault_for=fault)) as h:
            status, _, answer = await h.post("/v1/completions", completion("REJECT me"))
            assert status == 400 and answer["error"]["message"] == "injected"
            status, _, answer = await h.post("/v1/completions", completion("CRASH me"))
            assert status == 502 and answer["error"]["code"] == "upstream_error"
            assert len(h.scheduler.router) == 0  # failed prefills left no slot behind
            assert (await h.post("/v1/completions", completion()))[0] == 200

    run(body)


# --- late dispatch --------------------------------------------------------------------------


def test_requests_beyond_the_engine_limit_wait_then_all_complete() -> None:
    async def body() -> None:
        slow = FakeServerConfig(first_token_delay_s=0.05)
        async with cluster(n_prefill=2, prefill_config=slow, max_engine_pending=1) as h:
            view = h.scheduler.view
            peak_queued = peak_pending = 0
            done = False

            async def sample() -> None:
                nonlocal peak_queued, peak_pending
                while not done:
                    prefill = [view[f"prefill-{i}"] for i in range(2)]
                    peak_queued = max(peak_queued, sum(len(s.queue) for s in prefill))
                    peak_pending = max(peak_pending, max(s.engine_pending_requests for s in prefill))
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())
            results = await asyncio.gather(
                *(h.post("/v1/completions", completion(f"prompt number {i}")) for i in range(10))
            )
            done = True
            await sampler
            assert [r[0] for r in results] == [200] * 10
            assert peak_pending == 1  # never more than the limit in an engine
            assert peak_queued >= 1  # the rest waited in the scheduler
            assert sum(len(s.requests) for s in h.prefill) == 10
            assert len(h.scheduler.router) == 0
            metrics = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_decisions_total{branch="' in metrics

    run(body)


# --- client disconnects ---------------------------------------------------------------------


def test_client_disconnect_mid_stream_cancels_the_decode_request() -> None:
    async def body() -> None:
        slow_decode = FakeServerConfig(inter_token_delay_s=0.05)
        async with cluster(decode_config=slow_decode) as h:
            req = completion(max_tokens=200, stream=True)
            async with h.client.post(h.url + "/v1/completions", json=req) as resp:
                assert resp.status == 200
                await resp.content.readany()  # first chunk arrived: decoding is under way
                st = h.scheduler.view["decode-0"]
                assert st.running_requests == 1 and st.active_tokens == 12 + 200
                resp.close()  # the client goes away
            assert await eventually(lambda: h.decode[0].disconnects == 1)
            assert await eventually(lambda: st.running_requests == 0 and st.active_tokens == 0)
            metrics = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_errors_total{kind="client_disconnected"} 1.0' in metrics

    run(body)


def test_client_disconnect_while_queued_leaves_the_router() -> None:
    async def body() -> None:
        slow = FakeServerConfig(first_token_delay_s=0.4)
        async with cluster(n_prefill=1, prefill_config=slow, max_engine_pending=1) as h:
            first = asyncio.create_task(h.post("/v1/completions", completion("first")))
            assert await eventually(lambda: h.scheduler.view["prefill-0"].engine_pending_requests == 1)
            with pytest.raises(asyncio.TimeoutError):
                await h.post("/v1/completions", completion("second"),
                             timeout=aiohttp.ClientTimeout(total=0.1))  # fmt: skip
            # The queued one is gone from the router; the first still holds its engine slot.
            assert await eventually(lambda: len(h.scheduler.router) == 1)
            assert not h.scheduler.view["prefill-0"].queue
            assert (await first)[0] == 200
            assert len(h.scheduler.router) == 0
            assert len(h.prefill[0].requests) == 1  # the cancelled request never reached it

    run(body)


# --- decode load balancing and failures -----------------------------------------------------


def test_decode_instance_choice_follows_load() -> None:
    async def body() -> None:
        async with cluster(n_decode=2) as h:
            view = h.scheduler.view
            view["decode-0"].active_tokens = 1_000_000  # as if busy with long requests
            for i in range(4):
                status, headers, _ = await h.post("/v1/completions", completion(f"p{i}"))
                assert status == 200 and headers["X-DualMap-Decode-Instance"] == "decode-1"
            view["decode-0"].active_tokens = 0
            view["decode-1"].active_tokens = 1_000_000
            for i in range(4):
                _, headers, _ = await h.post("/v1/completions", completion(f"q{i}"))
                assert headers["X-DualMap-Decode-Instance"] == "decode-0"
            assert (len(h.decode[0].requests), len(h.decode[1].requests)) == (4, 4)

    run(body)


def test_dead_prefill_instance_is_routed_around_and_comes_back() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2) as h:
            dead_port = h.prefill[0].port
            await h.prefill[0].stop()
            for i in range(6):
                status, headers, answer = await h.post("/v1/completions", completion(f"x{i}"))
                assert status == 200, answer
                assert headers["X-DualMap-Prefill-Instance"] == "prefill-1"
            assert not h.scheduler.view["prefill-0"].healthy
            revived = FakeOpenAIServer(port=dead_port)
            await revived.start()
            try:
                assert await eventually(lambda: h.scheduler.view["prefill-0"].healthy)
            finally:
                await revived.stop()

    run(body)


def test_dead_decode_instance_is_retried_on_another() -> None:
    async def body() -> None:
        async with cluster(n_decode=2) as h:
            await h.decode[0].stop()
            for i in range(4):
                status, headers, answer = await h.post("/v1/completions", completion(f"d{i}"))
                assert status == 200, answer
                assert headers["X-DualMap-Decode-Instance"] == "decode-1"
            view = h.scheduler.view
            assert not view["decode-0"].healthy
            assert view["decode-0"].running_requests == view["decode-1"].running_requests == 0
            # The retry reused the prefill's KV params: one prefill per request.
            assert sum(len(s.requests) for s in h.prefill) == 4

    run(body)


def test_models_health_and_metrics_endpoints() -> None:
    async def body() -> None:
        async with cluster() as h:
            models = await (await h.client.get(h.url + "/v1/models")).json()
            assert [m["id"] for m in models["data"]] == [MODEL]
            health = await h.client.get(h.url + "/health")
            assert health.status == 200
            await h.post("/v1/completions", completion(stream=True))
            text = await (await h.client.get(h.url + "/metrics")).text()
            for name in ("dualmap_ttft_seconds_bucket", "dualmap_e2e_seconds_bucket",
                         "dualmap_instance_queue_depth", "dualmap_instance_estimated_ttft_seconds",
                         "dualmap_cache_hit_tokens_predicted_total",
                         "dualmap_cache_hit_tokens_engine_total"):  # fmt: skip
                assert name in text, name
            for s in h.decode:
                await s.stop()
            # The only decoder is down: marked unhealthy on the first try, no other to retry on.
            status, _, answer = await h.post("/v1/completions", completion())
            assert status == 503 and answer["error"]["code"] == "no_instance"
            assert (await h.client.get(h.url + "/health")).status == 503

    run(body)


def test_tpot_of_a_streamed_answer_is_the_time_per_token_after_the_first() -> None:
    async def body() -> None:
        # 4 tokens 50 ms apart: the 3 after the first take 150 ms, TPOT 50 ms.
        async with cluster(decode_config=FakeServerConfig(inter_token_delay_s=0.05)) as h:
            status, _, _ = await h.post("/v1/completions", completion(stream=True, max_tokens=4))
            assert status == 200
            series = h.scheduler.metrics.tpot_series
            assert await eventually(lambda: series.count == 1)
            assert 0.04 <= series.total <= 0.1
            await h.post("/v1/completions", completion(max_tokens=4))  # not streamed: no TPOT
            assert series.count == 1
            assert "dualmap_tpot_seconds_bucket" in await (await h.client.get(h.url + "/metrics")).text()

    run(body)


def test_a_client_hanging_up_on_done_still_has_its_latency_counted() -> None:
    async def body() -> None:
        # The decoder ends its stream 0.5 s after [DONE]; the client leaves on [DONE], which
        # cancels the scheduler's handler while it waits for that end.
        slow_eof = FakeServerConfig(inter_token_delay_s=0.01, done_linger_s=0.5)
        async with cluster(decode_config=slow_eof) as h:
            resp = await h.client.post(h.url + "/v1/completions", json=completion(stream=True, max_tokens=4))
            async for line in resp.content:
                if line.strip() == b"data: [DONE]":
                    break
            resp.close()
            metrics = h.scheduler.metrics
            # It had the whole answer: a served request, not a disconnect.
            assert await eventually(lambda: metrics.requests.value(("completions", "ok")) == 1)
            assert metrics.requests.value(("completions", "cancelled")) == 0
            assert metrics.e2e_by_stream[True].count == 1 and metrics.tpot_series.count == 1

    run(body)
