"""Circuit breakers and the health monitor, with an injected clock and a scripted probe."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.intake.health import BreakerPolicy, BreakerState, CircuitBreaker, HealthMonitor
from tests.service_harness import cluster, completion, eventually, run


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_soft_failures_open_after_the_threshold_and_a_success_resets_the_count() -> None:
    b = CircuitBreaker(BreakerPolicy(failure_threshold=3))
    assert not b.record_failure(1.0, hard=False)
    assert not b.record_failure(1.0, hard=False)
    assert not b.record_success()
    assert b.failures == 0  # the count is of failures *in a row*
    assert not b.record_failure(2.0, hard=False)
    assert not b.record_failure(2.0, hard=False)
    assert b.record_failure(2.0, hard=False)
    assert b.state is BreakerState.OPEN


def test_hard_failure_opens_at_once() -> None:
    b = CircuitBreaker(BreakerPolicy(failure_threshold=5))
    assert b.record_failure(1.0, hard=True)
    assert b.state is BreakerState.OPEN
    assert not b.record_failure(1.5, hard=True)  # already open: not a new opening


def test_open_waits_then_half_open_probe_closes_or_reopens() -> None:
    b = CircuitBreaker(BreakerPolicy(open_s=2.0))
    b.record_failure(10.0, hard=True)
    assert not b.begin_probe(11.9)
    assert b.state is BreakerState.OPEN
    assert not b.record_success()  # a straggler's success does not close an open circuit
    assert b.begin_probe(12.0)
    assert b.state is BreakerState.HALF_OPEN
    b.record_failure(12.1, hard=False)  # the probe failed: open for another open_s
    assert b.state is BreakerState.OPEN and b.opened_at == 12.1
    assert not b.begin_probe(13.0)
    assert b.begin_probe(14.1)
    assert b.record_success()
    assert b.state is BreakerState.CLOSED


@pytest.mark.parametrize("bad", [dict(failure_threshold=0), dict(open_s=-1.0), dict(probe_interval_s=0.0)])
def test_policy_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(**bad)  # type: ignore[arg-type]


def test_monitor_probes_opens_and_closes_and_follows_membership() -> None:
    async def body() -> None:
        clock = ManualClock()
        up = {"http://a": True, "http://b": True}
        targets = {"a": "http://a", "b": "http://b"}
        events: list[tuple[str, str]] = []

        async def probe(url: str) -> bool:
            return up[url]

        mon = HealthMonitor(lambda: targets, probe, on_open=lambda n: events.append(("open", n)),
                            on_close=lambda n: events.append(("close", n)),
                            policy=BreakerPolicy(failure_threshold=2, open_s=5.0), clock=clock)  # fmt: skip
        await mon.check_once()
        assert events == []
        up["http://a"] = False
        await mon.check_once()
        assert events == []  # one failed probe is not enough
        await mon.check_once()
        assert events == [("open", "a")]
        up["http://a"] = True
        clock.now += 4.0
        await mon.check_once()  # still within open_s: a is not probed
        assert mon.state("a") is BreakerState.OPEN
        clock.now += 1.0
        await mon.check_once()
        assert events == [("open", "a"), ("close", "a")]
        del targets["b"]
        await mon.check_once()
        fams = {m.name: m for m in mon.collector().collect()}
        # b left the membership: it left the gauge too.
        assert [s.labels["instance"] for s in fams["dualmap_instance_circuit_state"].samples] == ["a"]
        trans = {(s.labels["state"], s.value) for s in fams["dualmap_circuit_transitions"].samples
                 if s.name.endswith("_total")}  # fmt: skip
        assert trans == {("open", 1.0), ("half_open", 1.0), ("closed", 1.0)}

    asyncio.run(body())


def test_probe_that_hangs_counts_as_a_failure() -> None:
    async def body() -> None:
        async def probe(url: str) -> bool:
            await asyncio.sleep(10)
            return True

        opened: list[str] = []
        mon = HealthMonitor(lambda: {"a": "http://a"}, probe, on_open=opened.append,
                            on_close=lambda n: None, clock=ManualClock(),
                            policy=BreakerPolicy(failure_threshold=1, probe_timeout_s=0.05))  # fmt: skip
        await mon.check_once()
        assert opened == ["a"]

    asyncio.run(body())


# --- wired into the scheduler ----------------------------------------------------------------


def test_failing_health_check_takes_an_instance_out_and_it_returns() -> None:
    async def body() -> None:
        async with cluster(n_prefill=2) as h:
            h.prefill[0].healthy = False
            assert await eventually(lambda: not h.scheduler.view["prefill-0"].healthy)
            for i in range(4):
                status, headers, _ = await h.post("/v1/completions", completion(f"h{i}"))
                assert status == 200 and headers["X-DualMap-Prefill-Instance"] == "prefill-1"
            text = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_instance_circuit_state{instance="prefill-0"} 2.0' in text \
                or 'dualmap_instance_circuit_state{instance="prefill-0"} 1.0' in text
            assert 'dualmap_instance_failures_total{instance="prefill-0",kind="probe"}' in text
            h.prefill[0].healthy = True
            assert await eventually(lambda: h.scheduler.view["prefill-0"].healthy)
            text = await (await h.client.get(h.url + "/metrics")).text()
            assert 'dualmap_instance_circuit_state{instance="prefill-0"} 0.0' in text

    run(body)


def test_soft_upstream_failures_open_the_circuit_after_the_threshold() -> None:
    from tests.fakes.openai_server import FakeServerConfig, Fault

    async def body() -> None:
        unavailable = FakeServerConfig(fault_for=lambda b: Fault("status", status_code=503))
        async with cluster(n_prefill=1, n_decode=2, health_failure_threshold=2,
                           health_interval_s=60.0) as h:  # fmt: skip
            h.decode[0].config = unavailable
            h.decode[1].config = unavailable
            status, _, answer = await h.post("/v1/completions", completion("s0"))
            # Both decoders answered 503 once: under the threshold, both still in service.
            assert status == 502 and answer["error"]["code"] == "upstream_error"
            assert all(st.healthy for st in h.scheduler.view.instances("decode"))
            await h.post("/v1/completions", completion("s1"))
            assert not any(st.healthy for st in h.scheduler.view.instances("decode"))

    run(body)
