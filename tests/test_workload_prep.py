"""Workload preparation (dualmap_pd/workload_prep.py): the paper's drop / spread / warm-up steps,
each switch, and the earlier behaviour behind --no-paper-workload."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualmap_pd.sim import SimConfig, Simulator
from dualmap_pd.sim.workload import PreparedTrace
from dualmap_pd.trace import ArrivalScaling, TraceRecord, arrival_times
from dualmap_pd.workload_prep import WorkloadPrep, default_warmup, prepare_workload, spread_same_timestamps


def rec(ts: float, prompt: int = 1000, output: int = 10) -> TraceRecord:
    return TraceRecord(ts, prompt, output, [int(ts)])


def test_oversized_requests_are_dropped_and_counted() -> None:
    recs = [rec(0, 20000, 480), rec(1000, 20000, 481), rec(2000, 100, 1), rec(3000, 30000, 1)]
    out = prepare_workload(recs, WorkloadPrep(warmup_requests=0), max_model_len=20480)
    assert out.dropped_oversized == 2 and out.indices == [0, 2] and out.max_model_len == 20480
    assert [r.input_length for r in out.records] == [20000, 100]
    # The option wins over the caller's (profile's) limit; no limit at all drops nothing.
    assert prepare_workload(recs, WorkloadPrep(max_model_len=40000, warmup_requests=0), max_model_len=20480).dropped_oversized == 0
    assert prepare_workload(recs, WorkloadPrep(warmup_requests=0)).dropped_oversized == 0
    assert prepare_workload(recs, WorkloadPrep(drop_oversized=False, warmup_requests=0), max_model_len=1).dropped_oversized == 0
    with pytest.raises(ValueError, match="every request"):
        prepare_workload(recs, WorkloadPrep(), max_model_len=5)


def test_same_timestamp_groups_spread_to_the_next_timestamp() -> None:
    recs = [rec(0), rec(0), rec(0), rec(300), rec(600), rec(600)]
    spread, groups = spread_same_timestamps(recs)
    assert groups == 2
    assert [r.timestamp for r in spread] == [0, 100, 200, 300, 600, 750]  # last group: mean gap 300
    assert [r.hash_ids for r in spread] == [r.hash_ids for r in recs]  # order and content kept
    out = prepare_workload(recs, WorkloadPrep(warmup_requests=0))
    assert out.arrivals == pytest.approx([0, 0.1, 0.2, 0.3, 0.6, 0.75]) and out.spread_groups == 2
    off = prepare_workload(recs, WorkloadPrep(warmup_requests=0, spread_timestamps=False))
    assert off.arrivals == pytest.approx([0, 0, 0, 0.3, 0.6, 0.6]) and off.spread_groups == 0


def test_warmup_runs_at_its_own_rate_then_the_measured_part_at_the_target() -> None:
    recs = [rec(i * 1000.0) for i in range(20)]  # 1 req/s as traced
    out = prepare_workload(recs, WorkloadPrep(warmup_requests=5, warmup_qps=0.5), ArrivalScaling(qps=4.0))
    assert out.warmup == 5 and out.measured == 15
    assert out.arrivals[:6] == pytest.approx([0, 2, 4, 6, 8, 10])  # one every 2 s, then measured
    assert out.measured_qps == pytest.approx(4.0)
    assert out.arrivals[6] - out.arrivals[5] == pytest.approx(0.25)
    at_target = prepare_workload(recs, WorkloadPrep(warmup_requests=5, warmup_qps=0), ArrivalScaling(qps=4.0))
    assert at_target.arrivals == pytest.approx([i * 0.25 for i in range(20)])
    assert "warm-up 5 at 0.5 req/s" in out.description and "at the target rate" in at_target.description


def test_no_paper_workload_is_the_trace_as_it_was() -> None:
    recs = [rec(0, 50000), rec(0), rec(500), rec(2500, 30000)] + [rec(3000 + i * 10) for i in range(30)]
    scaling = ArrivalScaling(rate_scale=2.0)
    out = prepare_workload(recs, WorkloadPrep(paper_workload=False), scaling, max_model_len=20480)
    assert out.records == recs and out.indices == list(range(len(recs))) and out.dropped_oversized == 0
    assert out.arrivals == arrival_times(recs, scaling) and out.warmup == default_warmup(len(recs)) == 3
    assert out.max_model_len is None and "no paper preparation" in out.description


def test_paper_defaults_and_validation() -> None:
    prep = WorkloadPrep()
    assert prep.paper_workload and prep.warmup_qps == 0.3 and prep.drops and prep.spreads
    assert default_warmup(2867) == 500 and default_warmup(300) == 30
    for bad in (WorkloadPrep(max_model_len=0), WorkloadPrep(warmup_requests=-1), WorkloadPrep(warmup_qps=-0.1)):
        with pytest.raises(ValueError):
            bad.validate()
    with pytest.raises(ValueError, match="sorted"):
        prepare_workload([rec(10), rec(0)], prep)


@settings(max_examples=80, deadline=None)
@given(
    stamps=st.lists(st.integers(0, 50), min_size=1, max_size=60),
    lengths=st.lists(st.integers(1, 30000), min_size=60, max_size=60),
    warmup=st.integers(0, 20),
    warmup_qps=st.sampled_from([0.0, 0.3, 2.0]),
    paper=st.booleans(),
)
def test_prepared_arrivals_are_ordered_and_complete(
    stamps: list[int], lengths: list[int], warmup: int, warmup_qps: float, paper: bool
) -> None:
    recs = [rec(s * 100.0, lengths[i]) for i, s in enumerate(sorted(stamps))]
    if paper and all(r.input_length + r.output_length > 20480 for r in recs):
        return
    prep = WorkloadPrep(paper_workload=paper, warmup_requests=warmup, warmup_qps=warmup_qps)
    out = prepare_workload(recs, prep, ArrivalScaling(qps=3.0), max_model_len=20480)
    assert len(out.records) == len(out.arrivals) == len(out.indices) == out.total - out.dropped_oversized
    assert out.indices == sorted(set(out.indices)) and all(recs[i] is r or recs[i] == r for i, r in zip(out.indices, out.records))
    assert all(a <= b for a, b in zip(out.arrivals, out.arrivals[1:])) and out.arrivals[0] == 0
    assert out.warmup == min(warmup, len(out.records))
    assert all(r.input_length + r.output_length <= 20480 for r in out.records) or not paper


def test_simulator_runs_the_prepared_workload() -> None:
    recs = [rec(i * 200.0, 30000 if i % 4 == 0 else 2000) for i in range(40)]
    trace = PreparedTrace(recs, "mixed")
    cfg = SimConfig(trace="mixed", prefill=2, workload=WorkloadPrep(warmup_requests=4))
    res = Simulator(cfg, trace).run()
    s = res.summary()
    assert s["requests"] == 30 and s["dropped_oversized"] == 10 and s["warmup"] == 4
    assert all(r.prompt_tokens == 2000 for r in res.requests)
    assert res.requests[4].arrival == pytest.approx(4 / 0.3)  # measured part after the slow warm-up
    legacy = Simulator(cfg.with_(workload=WorkloadPrep(paper_workload=False)), trace).run().summary()
    assert legacy["requests"] == 40 and legacy["dropped_oversized"] == 0
