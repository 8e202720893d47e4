"""Prefix-migration planning (policies/migration.py), its router wiring, and the simulator's
model of it: plans, limits, wait-or-recompute, pinning, and whole-run invariants."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualmap_pd.cost import CostModel, Link, get_profile
from dualmap_pd.policies.dualmap import DualMapMigratePolicy, DualMapPolicy
from dualmap_pd.policies.migration import MigrationConfig, MigrationPlanner
from dualmap_pd.router import PrefillRouter
from dualmap_pd.sim import PreparedTrace, SimConfig, Simulator
from dualmap_pd.sim.prefix_cache import PrefixCache
from dualmap_pd.trace import load_trace
from tests.policy_helpers import make_ctx, make_request, make_view, snapshot

TRACES = Path(__file__).resolve().parents[1] / "scripts" / "traces"
COST = CostModel(get_profile("qwen7b-910b4"))
TOKENS_PER_S = 6250  # 0.16 ms/token


def planner(**cfg: object) -> MigrationPlanner:
    return MigrationPlanner(COST, MigrationConfig(**cfg))  # type: ignore[arg-type]


# -- planner ------------------------------------------------------------------------------------
def test_propose_copies_the_prefix_the_best_holder_has_and_the_target_lacks():
    view = make_view(3)
    req = make_request("r", [1, 2, 3, 4])  # 16 blocks of 128
    view.add_blocks("p0", req.block_hashes[:8])
    view.add_blocks("p1", req.block_hashes[:12])
    view.add_blocks("p2", req.block_hashes[:4])
    plan = planner().propose(req, "p2", view, 0.0)
    assert plan is not None
    assert (plan.source, plan.target, plan.request_id) == ("p1", "p2", "r")
    assert plan.block_hashes == tuple(req.block_hashes[:12]) and plan.have_blocks == 4
    assert plan.missing_hashes == tuple(req.block_hashes[4:12])
    assert plan.nbytes == COST.kv_bytes(8 * 128) and plan.prefix_tokens == 12 * 128
    assert plan.transfer_s == pytest.approx(COST.transfer_time(plan.nbytes))
    assert plan.saving_s == pytest.approx(8 * 128 * COST.per_token_prefill())


def test_no_plan_when_nothing_worth_copying():
    view = make_view(3)
    req = make_request("r", [1, 2, 3, 4])
    assert planner().propose(req, "p1", view, 0.0) is None  # nobody holds it
    view.add_blocks("p0", req.block_hashes[:5])
    view.add_blocks("p1", req.block_hashes[:4])
    assert planner(min_blocks=2).propose(req, "p1", view, 0.0) is None  # one block missing
    assert planner(min_blocks=1).propose(req, "p1", view, 0.0) is not None
    view.set_health("p0", False)
    assert planner(min_blocks=1).propose(req, "p1", view, 0.0) is None  # the holder is down
    view.set_health("p0", True)
    view.set_draining("p1", True)
    assert planner(min_blocks=1).propose(req, "p1", view, 0.0) is None  # target takes no work


def test_a_slow_link_makes_recomputing_the_better_choice():
    view = make_view(2)
    req = make_request("r", [1, 2, 3, 4])
    view.add_blocks("p0", req.block_hashes)
    # 2048 tokens: 0.33 s to recompute; 117 MB over 100 MB/s is 1.2 s.
    slow = MigrationPlanner(COST, MigrationConfig(), link=Link(100e6, 0.001))
    assert slow.propose(req, "p1", view, 0.0) is None
    assert planner().propose(req, "p1", view, 0.0) is not None


def test_limits_per_instance_and_bytes_in_flight():
    view = make_view(4)
    reqs = [make_request(f"r{i}", [10 * i + 1, 10 * i + 2]) for i in range(4)]
    for r in reqs:
        view.add_blocks("p0", r.block_hashes)
    pl = planner(max_per_instance=2)
    p1 = pl.propose(reqs[0], "p1", view, 0.0)
    assert p1 is not None
    pl.on_planned(p1, 0.0)
    p2 = pl.propose(reqs[1], "p2", view, 0.0)
    assert p2 is not None and p2.plan_id != p1.plan_id
    pl.on_planned(p2, 0.0)
    assert pl.busy("p0") == 2
    assert pl.propose(reqs[2], "p3", view, 0.0) is None  # p0 is source of two already
    pl.on_finished(p1, 0.1)
    assert pl.propose(reqs[2], "p3", view, 0.1) is not None
    tight = planner(max_bytes_in_flight=p1.nbytes + 1)
    tight.on_planned(tight.propose(reqs[0], "p1", view, 0.0), 0.0)  # type: ignore[arg-type]
    assert tight.propose(reqs[1], "p2", view, 0.0) is None
    assert tight.bytes_in_flight == p1.nbytes


def test_queries_are_pure():
    view = make_view(3)
    req = make_request("r", [1, 2, 3, 4])
    view.add_blocks("p0", req.block_hashes)
    pl = planner()
    pl.on_planned(pl.propose(req, "p1", view, 0.0), 0.0)  # type: ignore[arg-type]
    before, state = snapshot(view), (dict(pl._arriving), pl.bytes_in_flight, pl.stats.planned)
    other = make_request("o", [1, 2, 3, 9])
    pl.propose(other, "p2", view, 0.0)
    pl.expected_hit_blocks(other, "p1", view, 0.0)
    pl.hold_until(other, "p1", view, 0.0)
    pl.achievable_hit_blocks(other, "p2", view, 0.0)
    assert snapshot(view) == before and (dict(pl._arriving), pl.bytes_in_flight, pl.stats.planned) == state


def test_arriving_blocks_count_when_waiting_beats_recomputing():
    view = make_view(2)
    req = make_request("r", [1, 2, 3, 4])
    view.add_blocks("p0", req.block_hashes)
    pl = planner()
    plan = pl.propose(req, "p1", view, 0.0)
    assert plan is not None
    pl.on_planned(plan, 0.0)
    follower = make_request("f", [1, 2, 3, 7])  # shares 12 of its 16 blocks
    assert pl.expected_hit_blocks(follower, "p1", view, 0.0) == 12
    assert pl.hold_until(follower, "p1", view, 0.0) == pytest.approx(plan.transfer_s)
    # The copy is late: started at t=1 behind a busy link, landing at t=5. Recomputing 12
    # blocks (0.25 s) now beats waiting 4 s.
    pl.on_started(plan, 1.0, expected_ready_at=5.0)
    assert pl.expected_hit_blocks(follower, "p1", view, 1.0) == 0
    assert pl.hold_until(follower, "p1", view, 1.0) is None
    assert pl.hold_until(follower, "p1", view, 4.9) == 5.0  # 0.1 s to go: wait
    # Past its expected time with no word: a request waits at most what recomputing costs,
    # counted from the copy's start (1.0 + 0.25 s here, long gone at 5.1).
    assert pl.hold_until(follower, "p1", view, 5.1) is None
    assert pl.expected_hit_blocks(follower, "p1", view, 5.1) == 0
    pl2 = planner()
    late = pl2.propose(req, "p1", view, 10.0)
    assert late is not None
    pl2.on_planned(late, 10.0)
    pl2.on_started(late, 10.0)  # expected at 10.005
    assert pl2.hold_until(follower, "p1", view, 10.1) == pytest.approx(10.0 + 12 * 128 * COST.per_token_prefill())
    assert pl2.expected_hit_blocks(follower, "p1", view, 10.1) == 12
    pl.on_failed(plan, 5.0, "source_gone")
    assert pl.expected_hit_blocks(follower, "p1", view, 5.0) == 0
    assert (pl.stats.failed, pl.stats.failures["source_gone"], pl.bytes_in_flight) == (1, 1, 0)
    pl.on_failed(plan, 5.0, "again")  # a second report of the same plan is ignored
    assert pl.stats.failed == 1


def test_unfinished_plans_expire():
    view = make_view(2)
    req = make_request("r", [1, 2])
    view.add_blocks("p0", req.block_hashes)
    pl = planner(stale_after_s=10.0)
    pl.on_planned(pl.propose(req, "p1", view, 0.0), 0.0)  # type: ignore[arg-type]
    pl.observe_arrival(5.0)
    assert pl.in_flight()
    pl.observe_arrival(11.0)
    assert not pl.in_flight() and pl.stats.expired == 1 and pl.busy("p0") == 0


# -- router and policy --------------------------------------------------------------------------
def _hot_source_setup():
    view = make_view(4)
    pol = DualMapMigratePolicy(make_ctx())
    router = PrefillRouter(pol, view)
    req = make_request("r", [1, 2, 3, 4])
    _, (a, b) = pol.candidates_for(req)
    view.add_blocks(a, req.block_hashes)
    return view, pol, router, req, a, b


def test_slo_switch_copies_the_prefix_and_the_request_waits_for_it():
    view, pol, router, req, a, b = _hot_source_setup()
    view[a].engine_pending_tokens = 3 * TOKENS_PER_S  # over the 2.5 s switch threshold
    d = router.admit(req, 0.0)
    assert (d.instance, d.branch) == (b, "slo_switch")
    (plan,) = router.take_migrations()
    assert (plan.source, plan.target, plan.missing_blocks) == (a, b, 16)
    assert router.take_migrations() == []
    # Queued on b as if cached: waiting ~5 ms beats recomputing 16 blocks.
    assert req.queued_uncached == 0
    assert router.take_dispatchable(0.0, [b]) == []  # held for the copy
    pol.migration.on_started(plan, 0.0)
    view.add_blocks(b, plan.missing_hashes)  # the target's KV events
    pol.migration.on_finished(plan, plan.transfer_s)
    assert [(r.request_id, n) for r, n in router.take_dispatchable(plan.transfer_s, [b])] == [("r", b)]


def test_published_dualmap_emits_no_plans():
    view = make_view(4)
    pol = DualMapPolicy(make_ctx())
    router = PrefillRouter(pol, view)
    req = make_request("r", [1, 2, 3, 4])
    _, (a, b) = pol.candidates_for(req)
    view.add_blocks(a, req.block_hashes)
    view[a].engine_pending_tokens = 3 * TOKENS_PER_S
    assert router.admit(req, 0.0).instance == b
    assert router.take_migrations() == [] and req.queued_uncached == req.prompt_tokens


def test_rebalancing_moves_with_a_copy():
    view, pol, router, req, a, b = _hot_source_setup()
    # a queues many requests carrying the prefix; its backup b is idle and lacks it.
    for i in range(6):
        router.admit(make_request(f"q{i}", [1, 2, 3, 4, 100 + i], arrival=0.0), 0.0)
    view[a].engine_pending_tokens = 6 * TOKENS_PER_S
    router.rebalance([a], 0.1)
    plans = router.take_migrations()
    assert router.stats.moves > 0
    assert plans and all(p.source == a for p in plans)
    assert len({p.target for p in plans}) == len(plans)  # one copy per target, followers wait


# -- simulator ----------------------------------------------------------------------------------
def test_pinned_blocks_survive_eviction():
    cache = PrefixCache(4)
    cache.insert([1, 2, 3, 4])
    cache.pin([1, 2])
    # LRU order 4,3,2,1 then 7,6,5: the pinned 2 and 1 are passed over, and the excess is
    # made up from the new prompt's own oldest block.
    stored, evicted = cache.insert([5, 6, 7])
    assert evicted == [4, 3, 7] and stored == [6, 5]
    assert 1 in cache and 2 in cache and len(cache) == 4
    cache.unpin([1, 2])
    assert cache.pinned == 0
    cache.insert([8, 9, 10, 11])
    assert 1 not in cache


@pytest.fixture(scope="module")
def hot_trace() -> PreparedTrace:
    path = TRACES / "hot_prefix_slice.jsonl"
    return PreparedTrace(load_trace(path)[:400], "hot[:400]")


def _run(trace: PreparedTrace, **over: object):
    cfg = SimConfig(trace=trace.source, policy="dualmap", mode="disaggregated", prefill=8, decode=4, **over)  # type: ignore[arg-type]
    return Simulator(cfg, trace)


def test_sim_migrations_land_and_serve_hits(hot_trace: PreparedTrace):
    res = _run(hot_trace, qps=6.0).run()
    m = res.migrations
    assert m["finished"] > 0 and m["started"] == m["finished"] + m["failed"]
    assert m["bytes_moved"] > 0 and m["planned"] == m["started"]
    s = res.summary()
    assert 0 < s["migrated_hit_tokens"] <= s["hit_tokens"]
    assert all(r.completions == 1 and r.prefills_done == 1 for r in res.requests)


def test_sim_caches_stay_within_capacity_with_migrations(hot_trace: PreparedTrace):
    sim = _run(hot_trace, qps=6.0, prefix_cache_gib=2.0)  # ~290 blocks: constant eviction
    worst = {"over": 0}
    for engine in sim.engines.values():
        cache = engine.cache
        if cache is None:
            continue
        original = cache.insert

        def checked(hashes, _cache=cache, _orig=original):
            out = _orig(hashes)
            worst["over"] = max(worst["over"], len(_cache) - _cache.capacity_blocks)
            return out

        cache.insert = checked  # type: ignore[method-assign]
    res = sim.run()
    assert worst["over"] <= 0
    assert res.migrations["finished"] > 0
    for name in sim.prefill_names:  # the view mirrors every engine's cache, copies included
        assert sim.view[name].cached_blocks == set(sim.engines[name].cache.blocks())  # type: ignore[union-attr]
        assert sim.engines[name].cache.pinned == 0  # type: ignore[union-attr]


def test_sim_same_seed_same_result(hot_trace: PreparedTrace):
    a = _run(hot_trace, qps=7.0, seed=3).run().summary()
    b = _run(hot_trace, qps=7.0, seed=3).run().summary()
    assert a == b and a["migrations"]["finished"] > 0


def test_sim_link_slower_than_prefill_means_no_migration(hot_trace: PreparedTrace):
    sim = _run(hot_trace, qps=6.0)
    assert sim.policy.migration is not None
    sim.policy.migration.link = Link(50e6, 0.01)  # 50 MB/s: a 6k-token prefix takes 7 s
    res = sim.run()
    assert res.migrations["planned"] == 0


def test_nomigrate_never_migrates(hot_trace: PreparedTrace):
    cfg = SimConfig(trace=hot_trace.source, policy="dualmap_nomigrate", mode="disaggregated", qps=6.0)
    res = Simulator(cfg, hot_trace).run()
    assert res.migrations == {} and res.summary()["migrated_hit_tokens"] == 0


def test_measured_copies_recalibrate_the_expected_transfer_time():
    view = make_view(2)
    req = make_request("r", [1, 2, 3, 4])
    view.add_blocks("p0", req.block_hashes)
    pl = planner()
    plan = pl.propose(req, "p1", view, 0.0)
    assert plan is not None
    modelled = pl.transfer_time(plan.nbytes)
    pl.on_planned(plan, 0.0)
    pl.on_started(plan, 0.0)
    pl.on_finished(plan, 0.1, seconds=10 * modelled)
    assert pl.transfer_scale == pytest.approx(10.0)
    assert pl.transfer_time(plan.nbytes) == pytest.approx(10 * modelled)
    again = pl.propose(req, "p1", view, 0.2)  # the next plan is priced with the scale
    assert again is not None and again.transfer_s == pytest.approx(10 * modelled)
