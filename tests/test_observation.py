"""The simulator's observation model (sim/observation.py) and scheduler replicas (sim/replicas.py):
each channel's delay, the noise, and replicas that share only what engines publish."""

from __future__ import annotations

import statistics

import pytest

from dualmap_pd.cost import PROFILES
from dualmap_pd.sim import SimConfig, Simulator
from dualmap_pd.sim.observation import Observation
from dualmap_pd.sim.replicas import ArrivalBalancer
from dualmap_pd.sim.workload import PreparedTrace
from dualmap_pd.trace import TraceRecord
from dualmap_pd.workload_prep import WorkloadPrep

PROFILE = PROFILES["qwen7b-910b4"]
TOKENS = 4096
PREFILL_S = PROFILE.prefill_overhead_s + TOKENS * PROFILE.prefill_s_per_token
NO_PREP = WorkloadPrep(warmup_requests=0)


def trace(n: int, gap_ms: float = 10_000.0, shared: bool = False) -> PreparedTrace:
    ids = TOKENS // 512
    recs = [TraceRecord(i * gap_ms, TOKENS, 1, list(range(ids)) if shared else list(range(i * ids, (i + 1) * ids))) for i in range(n)]
    return PreparedTrace(recs, "obs")


def sim(tr: PreparedTrace, obs: Observation, **cfg: object) -> Simulator:
    config = SimConfig(trace="obs", workload=NO_PREP, observation=obs, **cfg)  # type: ignore[arg-type]
    return Simulator(config, tr)


ONLY = dict(kv_event_delay_s=0.0, metrics_poll_s=0.0, dispatch_rtt_s=0.0, prefill_noise_cv=0.0)


def test_kv_events_reach_the_view_after_the_delay() -> None:
    s = sim(trace(1), Observation(**{**ONLY, "kv_event_delay_s": 0.5}), prefill=1)
    seen: list[float] = []
    add = s.view.add_blocks
    s.view.add_blocks = lambda *a, **k: (seen.append(s.now), add(*a, **k))[1]  # type: ignore[method-assign]
    (r,) = s.run().requests
    assert r.ttft == pytest.approx(PREFILL_S)
    assert seen == [pytest.approx(r.first_token_at + 0.5)]
    assert s.view["p0"].cached_blocks  # delivered in the end


def test_dispatch_round_trip_delays_the_engine_and_the_scheduler() -> None:
    s = sim(trace(1), Observation(**{**ONLY, "dispatch_rtt_s": 0.2}), prefill=1)
    finished: list[float] = []
    fin = s.router.finish_prefill
    s.router.finish_prefill = lambda rid, now: (finished.append(now), fin(rid, now))[1]  # type: ignore[method-assign]
    (r,) = s.run().requests
    assert r.prefill_started_at == pytest.approx(0.1)  # half a round trip to the engine
    assert r.ttft == pytest.approx(0.1 + PREFILL_S)
    assert finished == [pytest.approx(r.first_token_at + 0.1)]  # and half back


def test_engine_metrics_are_polled_not_instant() -> None:
    # Colocated, one instance: the first request's running slot shows in the view only at a poll.
    tr = PreparedTrace([TraceRecord(0.0, TOKENS, 400, list(range(8))), TraceRecord(300.0, TOKENS, 2, list(range(8, 16)))], "obs")
    s = sim(tr, Observation(**{**ONLY, "metrics_poll_s": 1.0}), prefill=1)
    phase = s.observer.phases[0]
    seen: list[tuple[float, int]] = []
    admit = s.router.admit
    s.router.admit = lambda req, now: (seen.append((now, s.view["p0"].running_requests)), admit(req, now))[1]  # type: ignore[method-assign]
    s.run()
    assert s.engines["p0"].state.running_requests == 0 and not s._heap  # polling stopped with the work
    at, running = seen[1]
    assert at == pytest.approx(0.3)
    assert running == (1 if phase < 0.3 else 0)  # the engine held it since ~0; the view: after a poll


def test_exact_view_and_zero_settings_agree() -> None:
    tr = trace(30, gap_ms=300.0, shared=True)
    exact = sim(tr, Observation(realistic_view=False), prefill=2, mode="disaggregated").run().summary()
    zeros = sim(tr, Observation(**ONLY), prefill=2, mode="disaggregated").run().summary()
    for key in ("slo_attainment", "ttft_p50", "ttft_p99", "cache_hit_ratio", "decisions"):
        assert exact[key] == zeros[key]
    assert exact["observation"] == "exact, instant view"


def test_prefill_noise_is_seeded_with_mean_one() -> None:
    s = sim(trace(1), Observation(**{**ONLY, "prefill_noise_cv": 0.3}), prefill=1)
    a, b = s.observer.noise_for("p0"), s.observer.noise_for("p0")
    assert a is not None and b is not None
    xs = [a() for _ in range(20000)]
    assert xs[:5] == [b() for _ in range(5)]  # seeded
    assert statistics.fmean(xs) == pytest.approx(1.0, abs=0.01)
    assert statistics.pstdev(xs) == pytest.approx(0.3, abs=0.01)
    assert s.observer.noise_for("p0") is not None and sim(trace(1), Observation(**ONLY)).observer.noise_for("p0") is None
    (r,) = s.run().requests
    assert r.ttft != pytest.approx(PREFILL_S)  # the engine is not the model


def test_replicas_share_only_what_engines_publish() -> None:
    s = sim(trace(6, gap_ms=2000.0, shared=True), Observation(**ONLY), prefill=4, schedulers=2, policy="min_ttft")
    res = s.run()
    assert [r.replica for r in res.requests] == [0, 1, 0, 1, 0, 1]
    assert [sum(r.router.stats.decisions.values()) for r in s.replicas] == [3, 3]
    v0, v1 = (r.view for r in s.replicas)
    assert v0 is not v1 and s.replicas[0].policy is not s.replicas[1].policy
    # KV events go to every replica: both know the same caches.
    assert all(v0[n].cached_blocks == v1[n].cached_blocks for n in s.prefill_names)
    assert any(v0[n].cached_blocks for n in s.prefill_names)


def test_a_replica_does_not_see_another_s_bookings() -> None:
    # Two replicas, two requests at the same instant: the second replica's view shows no queue
    # or engine booking for the first request (the engine has not even published it yet).
    tr = PreparedTrace([TraceRecord(0.0, TOKENS, 1, list(range(8))), TraceRecord(0.0, TOKENS, 1, list(range(8, 16)))], "obs")
    s = sim(tr, Observation(**{**ONLY, "dispatch_rtt_s": 0.01}), prefill=2, schedulers=2, policy="min_ttft")
    pending: list[int] = []
    admit = s.replicas[1].router.admit
    s.replicas[1].router.admit = lambda req, now: (  # type: ignore[method-assign]
        pending.append(sum(st.engine_pending_requests + len(st.queue) for st in s.replicas[1].view.instances())),
        admit(req, now),
    )[1]
    s.run()
    assert pending == [0]
    assert sum(st.engine_pending_requests for st in s.replicas[0].view.instances()) == 0  # released


def test_arrival_balancer() -> None:
    rr = ArrivalBalancer(3, "round_robin", 0)
    assert [rr.pick() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    a, b = ArrivalBalancer(4, "random", 7), ArrivalBalancer(4, "random", 7)
    picks = [a.pick() for _ in range(400)]
    assert picks == [b.pick() for _ in range(400)] and set(picks) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        ArrivalBalancer(2, "least_conn", 0)  # type: ignore[arg-type]


def test_observation_settings_are_validated() -> None:
    from dualmap_pd.sim.config import ConfigError

    with pytest.raises(ConfigError, match="kv-event-delay-s"):
        SimConfig(trace=__file__, observation=Observation(kv_event_delay_s=-1)).validate()
    with pytest.raises(ConfigError, match="schedulers"):
        SimConfig(trace=__file__, schedulers=0).validate()


def test_book_on_accept_hides_a_dispatch_for_a_round_trip() -> None:
    # Two requests 10 ms apart on one instance, late dispatch (DualMap): booked at dispatch, the
    # second sees the first's pending work; booked on accept (authors' code), it does not yet.
    tr = PreparedTrace([TraceRecord(0.0, TOKENS, 1, list(range(8))), TraceRecord(10.0, TOKENS, 1, list(range(8, 16)))], "obs")
    seen = {}
    for late in (False, True):
        s = sim(tr, Observation(**{**ONLY, "dispatch_rtt_s": 0.2, "book_on_accept": late}), prefill=1)
        pending: list[int] = []
        admit = s.router.admit
        s.router.admit = lambda req, now: (pending.append(s.view["p0"].engine_pending_tokens), admit(req, now))[1]  # type: ignore[method-assign]
        s.run()
        assert s.view["p0"].engine_pending_tokens == 0 and s.view["p0"].engine_pending_requests == 0  # all released
        seen[late] = pending[1]
    assert seen[False] == TOKENS and seen[True] == 0
