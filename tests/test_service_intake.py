"""The scheduler's intake wiring: KV events steer routing, engine metrics reach /metrics."""

from __future__ import annotations

import asyncio

from scheduler.intake.engine_metrics import EngineMetricsPoller
from scheduler.service import Scheduler, default_intake
from tests.fakes.kv_publisher import FakeBlockPool, FakeKVPublisher
from tests.fakes.vllm_metrics import FakeMetricsServer, FakeVllmMetrics
from tests.service_harness import BLOCK, MODEL, cluster, completion, eventually, run


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_kv_events_fill_the_index_and_requests_follow_the_cached_prefix() -> None:
    prompt = list(range(20, 20 + 4 * BLOCK + 3))  # 4 full blocks and a tail

    async def body() -> None:
        with FakeKVPublisher() as pub0, FakeKVPublisher() as pub1:
            ports = [_port(pub0.endpoint), _port(pub1.endpoint)]
            intake = default_intake(kv_events=True, engine_metrics=False)
            async with cluster(n_prefill=2, intake=intake, kv_events_ports=ports) as h:
                view = h.scheduler.view
                # prefill-1's engine reports it cached the prompt's full blocks.
                pool = FakeBlockPool(block_size=BLOCK)
                await asyncio.to_thread(pub1.wait_subscribed)
                pub1.publish(pool.run(pub1, prompt))
                ours = [o for _, o in pool.chain(prompt)]
                assert await eventually(lambda: set(ours) <= view["prefill-1"].cached_blocks)
                assert not view["prefill-0"].cached_blocks
                for _ in range(3):
                    status, headers, _ = await h.post("/v1/completions", completion(prompt))
                    assert status == 200
                    assert headers["X-DualMap-Prefill-Instance"] == "prefill-1"
                text = await (await h.client.get(h.url + "/metrics")).text()
                # Predicted hit: all 4 blocks (the tail is partial, so no last-block rule).
                assert f'dualmap_cache_hit_tokens_predicted_total{{instance="prefill-1"}} {3 * 4 * BLOCK}.0' in text
                assert 'dualmap_decisions_total{branch="affinity",pool="prefill"} 3.0' in text
                assert 'dualmap_instance_cached_blocks{instance="prefill-1"} 4.0' in text

    run(body)


def test_engine_metrics_bring_nixl_totals_and_failures_mark_instances_down() -> None:
    async def body() -> None:
        metrics = FakeVllmMetrics(model_name=MODEL)
        metrics.engine.nixl_bytes_transferred = [1000.0, 2000.0]
        metrics.engine.nixl_xfer_time_seconds = [0.01, 0.03]
        async with FakeMetricsServer(metrics) as srv:
            pollers: list[EngineMetricsPoller] = []

            def intake(sched: Scheduler) -> list[EngineMetricsPoller]:
                poller = EngineMetricsPoller(sched.view, {"decode-0": srv.url}, interval_s=0.05,
                                             model_name=MODEL)  # fmt: skip
                poller.add_listener(sched.on_engine_snapshot)
                pollers.append(poller)
                return [poller]

            async with cluster(intake=intake) as h:
                assert await eventually(lambda: "decode-0" in h.scheduler.metrics.kv_transfer)
                text = await (await h.client.get(h.url + "/metrics")).text()
                assert 'dualmap_kv_transfer_bytes_total{instance="decode-0"} 3000.0' in text
                assert 'dualmap_kv_transfers_total{instance="decode-0"} 2.0' in text
                srv.status = 500  # the engine stops answering its metrics
                assert await eventually(lambda: not h.scheduler.view["decode-0"].healthy)
                srv.status = 200
                # The health probe (/health on the engine, a fake OpenAI server) brings it back.
                assert await eventually(lambda: h.scheduler.view["decode-0"].healthy)
                # It was a new process: its NIXL counters start again from zero; ours go on.
                metrics.process_start_time += 60.0
                metrics.engine.nixl_bytes_transferred = [500.0]
                metrics.engine.nixl_xfer_time_seconds = [0.02]
                kv = h.scheduler.metrics.kv_transfer
                assert await eventually(lambda: kv["decode-0"].transfers == 3.0)
                assert kv["decode-0"].bytes == 3500.0
                assert h.scheduler.metrics.engine_restarts.value(("decode-0",)) == 1

    run(body)
