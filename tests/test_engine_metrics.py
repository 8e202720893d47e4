"""Engine-metrics intake: parsing vLLM's real /metrics body, the fake's format, the poller."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dualmap_pd.cluster import ClusterView
from scheduler.intake.engine_metrics import (
    METRICS,
    EngineMetricsPoller,
    EngineSnapshot,
    parse_samples,
    snapshot_from_text,
)
from tests.fakes.vllm_metrics import EngineValues, FakeMetricsServer, FakeVllmMetrics

REAL = (Path(__file__).parent / "fixtures" / "vllm032_metrics.txt").read_text()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def reference_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def headers(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("#")}


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


# -- parsing the real body ----------------------------------------------------------------------
def test_hand_parser_agrees_with_prometheus_client_on_real_body() -> None:
    ours, ref = parse_samples(REAL), reference_samples(REAL)
    assert set(ours) == set(ref)
    for name, samples in ref.items():
        assert sorted(ours[name], key=repr) == sorted(samples, key=repr), name


def test_every_metric_name_exists_in_real_body() -> None:
    samples = parse_samples(REAL)
    for fld, (name, _) in METRICS.items():
        assert name in samples, f"{fld}: {name} not exported by vLLM 0.32"
    assert samples["vllm:kv_cache_usage_perc"][0][0] == {"engine": "0", "model_name": "tiny"}


def test_snapshot_of_real_body() -> None:
    ref = reference_samples(REAL)
    snap = snapshot_from_text("p0", "u", REAL, 12.0)
    assert snap.ok and snap.scraped_at == 12.0
    for fld, (name, _) in METRICS.items():
        assert getattr(snap, fld) == ref[name][0][1], fld
    assert snap.nixl_failed_transfers == 2.0 and snap.prefix_cache_hits and snap.prefix_cache_hits > 0
    assert 0.0 <= (snap.prefix_hit_rate() or 0.0) <= 1.0
    assert snapshot_from_text("p0", "u", REAL, 0.0, model_name="other").prefix_cache_hits is None


def test_parser_edge_cases() -> None:
    text = ('# HELP x y\nvllm:a{model_name="m}\\"q",engine="0"} 1.5 1700000000\n'
            "vllm:b 2e+09\nvllm:c{engine=\"1\"} +Inf\nvllm:d{engine=\"0\"} NaN\nnoise\n")
    s = parse_samples(text)
    assert s["vllm:a"] == [({"model_name": 'm}"q', "engine": "0"}, 1.5)]
    assert s["vllm:b"] == [({}, 2e9)] and s["vllm:c"][0][1] == float("inf")
    assert set(parse_samples(text, ["vllm:b"])) == {"vllm:b"}


# -- the fake speaks the same format ------------------------------------------------------------
def test_fake_body_matches_real_format() -> None:
    fake = FakeVllmMetrics().render()
    assert headers(fake) <= headers(REAL)  # same families, HELP texts and TYPEs
    assert series(fake) <= series(REAL)  # same sample names and label sets
    assert {n for n in parse_samples(fake)} >= {name for name, _ in METRICS.values()}
    assert series(FakeVllmMetrics(nixl=False).render()).isdisjoint({s for s in series(REAL) if "nixl" in s})


def test_fake_values_round_trip_and_engines_combine() -> None:
    m = FakeVllmMetrics(model_name="m", engines=[EngineValues(), EngineValues()], process_start_time=123.0)
    a, b = m.engines
    a.num_requests_running, b.num_requests_running = 2, 3
    a.kv_cache_usage_perc, b.kv_cache_usage_perc = 0.25, 0.75
    a.prefix_cache_queries, a.prefix_cache_hits = 1000, 400
    b.nixl_bytes_transferred = [4096.0, 8192.0]
    b.nixl_xfer_time_seconds = [0.01, 0.03]
    a.nixl_num_failed_transfers = 1
    s = snapshot_from_text("p", "u", m.render(), 0.0)
    assert (s.num_requests_running, s.kv_cache_usage, s.prefix_cache_hits) == (5, 0.75, 400)
    assert (s.nixl_bytes_transferred_sum, s.nixl_transfers) == (12288.0, 2)
    assert s.nixl_xfer_time_sum == pytest.approx(0.04) and s.nixl_xfer_time_count == 2
    assert s.nixl_failed_transfers == 1 and s.process_start_time == 123.0
    assert s.prefix_hit_rate() == 0.4


# -- the poller ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_poll_once_updates_view_and_listeners() -> None:
    async def main() -> None:
        view = ClusterView(128)
        view.add_instance("p0", "prefill")
        m = FakeVllmMetrics()
        m.engine.kv_cache_usage_perc, m.engine.num_requests_running = 0.5, 4
        got: list[EngineSnapshot] = []
        async with FakeMetricsServer(m) as srv:
            poller = EngineMetricsPoller(view, {"p0": srv.url, "p9": srv.url + "/metrics"},
                                         clock=lambda: 5.0)
            poller.add_listener(got.append)
            snaps = await poller.poll_once()
            await poller.stop()
        assert snaps["p0"].ok and snaps["p9"].ok and {s.instance for s in got} == {"p0", "p9"}
        assert view["p0"].kv_usage == 0.5 and view["p0"].running_requests == 4
        assert snaps["p0"].url.endswith(f":{srv.port}/metrics") and snaps["p0"].scraped_at == 5.0
        assert poller.snapshots["p0"] == snaps["p0"] == poller.last_good("p0")

    run(main())


def broken(_: EngineSnapshot) -> None:
    raise RuntimeError("listener bug")


def test_poller_survives_connection_refused_error_status_and_timeout() -> None:
    async def main() -> None:
        view = ClusterView(128)
        view.add_instance("p0", "prefill")
        view["p0"].kv_usage = 0.3
        failures: list[EngineSnapshot] = []
        async with FakeMetricsServer(FakeVllmMetrics()) as bad, FakeMetricsServer(FakeVllmMetrics()) as slow:
            bad.status, slow.delay_s = 503, 1.0
            poller = EngineMetricsPoller(view, {"p0": f"http://127.0.0.1:{free_port()}", "bad": bad.url,
                                                "slow": slow.url}, timeout_s=0.2)
            poller.add_listener(lambda s: failures.append(s) if not s.ok else None)
            poller.add_listener(broken)  # a broken listener does not stop polling
            for _ in range(2):
                snaps = await poller.poll_once()
            await poller.stop()
        assert all(not s.ok for s in snaps.values()) and len(failures) == 6
        assert "Connect" in (snaps["p0"].error or "") and "503" in (snaps["bad"].error or "")
        assert "Timeout" in (snaps["slow"].error or "")
        assert snaps["p0"].consecutive_failures == 2 and snaps["p0"].kv_cache_usage is None
        assert view["p0"].kv_usage == 0.3 and poller.last_good("p0") is None

    run(main())


def test_restart_detected_and_failures_reset_on_recovery() -> None:
    async def main() -> None:
        m = FakeVllmMetrics(process_start_time=100.0)
        m.engine.prefix_cache_queries = 50
        async with FakeMetricsServer(m) as srv:
            poller = EngineMetricsPoller(None, {"p0": srv.url})
            first = (await poller.poll_once())["p0"]
            srv.status = 500
            failed = (await poller.poll_once())["p0"]
            srv.status = 200
            m.process_start_time = 200.0
            again = (await poller.poll_once())["p0"]
            m.engine.prefix_cache_queries = 80
            later = (await poller.poll_once())["p0"]
            await poller.stop()
        assert not first.restarted and not failed.ok and failed.consecutive_failures == 1
        assert again.ok and again.restarted and again.consecutive_failures == 0 and not later.restarted

    run(main())


def test_background_loop_polls_at_interval() -> None:
    async def main() -> None:
        async with FakeMetricsServer(FakeVllmMetrics()) as srv:
            poller = EngineMetricsPoller(None, {"p0": srv.url}, interval_s=0.05)
            await poller.start()
            await asyncio.sleep(0.5)
            await poller.stop()
            n = srv.scrapes
            await asyncio.sleep(0.15)
        assert 4 <= n <= 12 and srv.scrapes == n  # stopped means stopped
        poller.remove_endpoint("p0")
        assert poller.snapshots == {}

    run(main())


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError):
        EngineMetricsPoller(None, {}, interval_s=0)
