"""Baseline prefill policies: each test pins one published rule so that breaking it fails here."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualmap_pd.cluster import ClusterView
from dualmap_pd.policies import PREFILL_POLICIES
from dualmap_pd.policies.baselines import (
    CacheAffinityPolicy,
    DynamoKVConfig,
    DynamoKVPolicy,
    LeastLoadedPolicy,
    MinTTFTConfig,
    MinTTFTPolicy,
    PrebleConfig,
    PreblePolicy,
    RoundRobinPolicy,
    SGLangCacheAwareConfig,
    SGLangCacheAwarePolicy,
    transfer_of,
)
from dualmap_pd.request import Decision, RoutedRequest
from dualmap_pd.router import PrefillRouter
from tests.policy_helpers import make_ctx, make_request, make_view, snapshot

BASELINES = [
    "round_robin",
    "least_loaded",
    "cache_affinity",
    "min_ttft",
    "preble",
    "sglang_cache_aware",
    "dynamo_kv",
]


def make(cls, view: ClusterView, config=None):
    ctx = make_ctx()
    pol = cls(ctx) if config is None else cls(ctx, config)
    pol.on_membership_change(view)
    return pol


def route(pol, req: RoutedRequest, view: ClusterView, instance: str, now: float = 0.0) -> None:
    """Tell a policy that ``req`` went to ``instance`` (as the router does after acting)."""
    pol.on_decision(req, Decision(instance, "forced", (instance,)), view, now)


def pend(view: ClusterView, name: str, tokens: int, requests: int = 1) -> None:
    view[name].engine_pending_tokens = tokens
    view[name].engine_pending_requests = requests


# -- registry and common properties -------------------------------------------------------------
@pytest.mark.parametrize("name", BASELINES)
def test_registered_and_dispatch_at_once(name):
    cls = PREFILL_POLICIES.get(name)
    assert cls.name == name
    assert cls.late_dispatch is False
    assert cls.__doc__ and cls.__module__.startswith("dualmap_pd.policies.baselines")


@st.composite
def random_cluster(draw):
    n_prefill = draw(st.integers(1, 6))
    view = make_view(n_prefill, draw(st.integers(0, 2)))
    states = draw(st.lists(st.sampled_from(["ok", "ok", "unhealthy", "draining"]), min_size=n_prefill, max_size=n_prefill))
    states[draw(st.integers(0, n_prefill - 1))] = "ok"  # at least one eligible
    for i, s in enumerate(states):
        name = f"p{i}"
        if s == "unhealthy":
            view.set_health(name, False)
        elif s == "draining":
            view.set_draining(name, True)
        pend(view, name, draw(st.integers(0, 50_000)), draw(st.integers(0, 300)))
        view[name].inflight_requests = draw(st.integers(0, 50))
        ids = draw(st.lists(st.integers(0, 6), max_size=6))
        if ids:
            view.add_blocks(name, make_request("c", ids).block_hashes)
    history = [
        make_request(f"h{k}", ids, arrival=k)
        for k, ids in enumerate(draw(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=6), max_size=8)))
    ]
    ids = draw(st.lists(st.integers(0, 6), max_size=8))
    tokens = draw(st.integers(1, 600)) + 512 * max(0, len(ids) - 1) if ids else draw(st.integers(1, 500))
    return view, history, make_request("r", ids, tokens=tokens, arrival=100.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cluster())
def test_every_policy_returns_an_eligible_instance_and_select_is_pure(case):
    view, history, req = case
    eligible = [s.name for s in view.eligible("prefill")]
    for name in PREFILL_POLICIES.names():
        pol = PREFILL_POLICIES.create(name, make_ctx())
        pol.on_membership_change(view)
        for k, h in enumerate(history):  # some learned state (trees, cursors, windows)
            route(pol, h, view, eligible[k % len(eligible)], now=float(k))
        before = snapshot(view)
        d1 = pol.select(req, view, 100.0)
        d2 = pol.select(req, view, 100.0)
        assert d1.instance in eligible, name
        assert d1 == d2, f"{name}: select is not repeatable"
        assert snapshot(view) == before, f"{name}: select mutated the view"


# -- round robin ---------------------------------------------------------------------------------
def test_round_robin_cycles_and_only_on_decision_moves_the_cursor():
    view = make_view(3)
    pol = make(RoundRobinPolicy, view)
    req = make_request("r", [1])
    assert pol.select(req, view, 0).instance == pol.select(req, view, 0).instance == "p0"
    seen = []
    for _ in range(6):
        d = pol.select(req, view, 0)
        pol.on_decision(req, d, view, 0)
        seen.append(d.instance)
    assert seen == ["p0", "p1", "p2", "p0", "p1", "p2"]


def test_round_robin_skips_ineligible_instances():
    view = make_view(4)
    pol = make(RoundRobinPolicy, view)
    view.set_health("p1", False)
    view.set_draining("p3", True)
    pol.on_membership_change(view)
    req = make_request("r", [1])
    seen = []
    for _ in range(4):
        d = pol.select(req, view, 0)
        pol.on_decision(req, d, view, 0)
        seen.append(d.instance)
    assert seen == ["p0", "p2", "p0", "p2"]


# -- least loaded --------------------------------------------------------------------------------
def test_least_loaded_takes_fewest_pending_tokens_and_ignores_cache():
    view = make_view(3)
    pol = make(LeastLoadedPolicy, view)
    req = make_request("r", [1, 2])
    view.add_blocks("p0", req.block_hashes)  # a full hit does not matter to this policy
    pend(view, "p0", 1001)
    pend(view, "p1", 1000, 5)
    view["p2"].queued_uncached_tokens = 1002  # scheduler-queued tokens count as pending too
    assert pol.select(req, view, 0).instance == "p1"
    pend(view, "p0", 1000, 4)  # tie on tokens: fewer pending requests wins
    assert pol.select(req, view, 0).instance == "p0"
    pend(view, "p1", 1000, 4)  # full tie: view order
    assert pol.select(req, view, 0).instance == "p0"


# -- cache affinity ------------------------------------------------------------------------------
def test_cache_affinity_maps_the_first_block_whatever_the_load():
    view = make_view(8)
    pol = make(CacheAffinityPolicy, view)
    a = make_request("a", [7, 1, 2])
    b = make_request("b", [7, 9, 9, 9])  # same first block, different rest
    owner = pol.select(a, view, 0).instance
    pend(view, owner, 10**7, 1000)
    assert pol.select(b, view, 0).instance == owner
    owners = {pol.select(make_request(f"k{i}", [100 + i]), view, 0).instance for i in range(64)}
    assert len(owners) > 4  # distinct prefixes spread over the ring


def test_cache_affinity_skips_an_unhealthy_owner_and_returns_after_recovery():
    view = make_view(8)
    pol = make(CacheAffinityPolicy, view)
    req = make_request("a", [7, 1])
    owner = pol.select(req, view, 0).instance
    view.set_health(owner, False)
    pol.on_membership_change(view)
    fallback = pol.select(req, view, 0).instance
    assert fallback != owner
    assert fallback == pol.ring.lookup(req.routing_key(1), {owner})
    view.set_health(owner, True)
    pol.on_membership_change(view)
    assert pol.select(req, view, 0).instance == owner


# -- min TTFT (Mooncake) -------------------------------------------------------------------------
def test_min_ttft_takes_a_loaded_hit_exactly_when_its_estimate_is_lower():
    view = make_view(2)
    pol = make(MinTTFTPolicy, view)
    req = make_request("r", list(range(8)))  # 4,096 tokens
    view.add_blocks("p0", req.block_hashes)
    p = make_ctx().cost.profile
    P = req.prompt_tokens
    idle_miss = p.prefill_overhead_s + p.prefill_s_per_token * P
    loaded_hit_fixed = 2 * p.prefill_overhead_s + p.cached_s_per_token * P  # 1 queued + own step
    breakeven = (idle_miss - loaded_hit_fixed) / p.prefill_s_per_token
    pend(view, "p0", int(breakeven) - 5)
    d = pol.select(req, view, 0)
    assert (d.instance, d.hit_tokens) == ("p0", P)
    assert d.estimated_ttft == pytest.approx(p.prefill_s_per_token * (int(breakeven) - 5) + loaded_hit_fixed)
    pend(view, "p0", int(breakeven) + 5)
    d = pol.select(req, view, 0)
    assert (d.instance, d.branch, d.hit_tokens) == ("p1", "min_ttft", 0)
    assert d.estimated_ttft == pytest.approx(idle_miss)
    assert transfer_of(d) is None


def test_min_ttft_kv_transfer_option_charges_the_move_and_reports_it():
    view = make_view(3)
    pol = make(MinTTFTPolicy, view, MinTTFTConfig(kv_transfer=True))
    req = make_request("r", list(range(8)))
    view.add_blocks("p0", req.block_hashes)
    view.add_blocks("p2", req.block_hashes[:8])  # a shorter local hit
    pend(view, "p0", 50_000)
    pend(view, "p2", 10)
    d = pol.select(req, view, 0)
    cost = make_ctx().cost
    p = cost.profile
    moved = 4096 - 1024
    expect_p1 = p.prefill_overhead_s + p.cached_s_per_token * 4096 + cost.transfer_time(cost.kv_bytes(4096))
    expect_p2 = (
        p.prefill_s_per_token * 10 + 2 * p.prefill_overhead_s + p.cached_s_per_token * 4096
        + cost.transfer_time(cost.kv_bytes(moved))
    )
    best = "p1" if expect_p1 < expect_p2 else "p2"
    assert (d.instance, d.branch, d.hit_tokens) == (best, "min_ttft_transfer", 4096)
    assert transfer_of(d) == ("p0", 4096 if best == "p1" else moved)
    assert d.estimated_ttft == pytest.approx(min(expect_p1, expect_p2))
    # The same cluster without the option recomputes on an idle instance.
    plain = make(MinTTFTPolicy, view).select(req, view, 0)
    assert plain.branch == "min_ttft" and transfer_of(plain) is None


# -- Preble --------------------------------------------------------------------------------------
def test_preble_exploits_only_when_the_cached_part_exceeds_the_new_part():
    view = make_view(2)
    pol = make(PreblePolicy, view)
    route(pol, make_request("a", [1, 2, 3, 4]), view, "p0", now=0.0)  # 2,048 tokens allocated to p0
    # p0 now carries that request's window load; p1 is idle, and no engine caches anything.
    exploit = make_request("b", [1, 2, 3, 4, 5, 6, 7])  # cached 2,048 > new 1,536
    d = pol.select(exploit, view, 1.0)
    assert (d.instance, d.branch) == ("p0", "exploit")
    boundary = make_request("c", [1, 2, 3, 4, 5, 6, 7, 8])  # cached 2,048 == new 2,048
    d = pol.select(boundary, view, 1.0)
    assert (d.instance, d.branch) == ("p1", "explore")


def test_preble_explore_cost_is_window_load_plus_miss_cost():
    view = make_view(3)
    pol = make(PreblePolicy, view)
    old = make_request("a", [9, 9, 9])
    route(pol, old, view, "p0", now=0.0)
    req = make_request("r", [1, 2])
    view.add_blocks("p2", req.block_hashes[:4])  # a hit lowers P_i on p2
    cost = make_ctx().cost
    d = pol.select(req, view, 1.0)
    assert (d.instance, d.branch) == ("p2", "explore")
    assert d.scores["p2"] == pytest.approx(cost.prefill_time(512, 512, "p2"))
    # Outside the 3-minute window the old request's load is gone: p0 ties with p1 again.
    view.clear_blocks("p2")
    assert pol.select(req, view, 1.0).instance == "p1"
    assert pol.select(req, view, 181.0).instance == "p0"


def _preble_with_two_groups(rebalance: bool):
    view = make_view(2)
    pol = make(PreblePolicy, view, PrebleConfig(rebalance=rebalance, warmup_requests_per_instance=0))
    t = 0.0
    for k, ids in enumerate([[10, 11, 12, 13], [10, 11, 12, 13, 14], [20, 21], [20, 21, 22]]):
        t += 1
        route(pol, make_request(f"g{k}", ids), view, "p0", now=t)
    return view, pol, t


def test_preble_rebalancing_moves_the_cheaper_prefix_to_the_lightest_instance():
    # p0 holds two prefix groups (2 requests each), p1 none: max >= 1.5 x min, so the cheaper
    # group (ids 20, 21) moves with its subtree; the larger one stays (moving it would invert).
    view, pol, t = _preble_with_two_groups(rebalance=True)
    assert pol.select(make_request("x", [20, 21, 22, 23]), view, t + 1).instance == "p1"
    assert pol.select(make_request("y", [10, 11, 12, 13, 14, 15]), view, t + 1).instance == "p0"
    # Without rebalancing, both stay on p0 (exploit of the allocation).
    view, pol, t = _preble_with_two_groups(rebalance=False)
    assert pol.select(make_request("x", [20, 21, 22, 23]), view, t + 1).instance == "p0"


def test_preble_does_not_rebalance_below_the_threshold():
    view = make_view(2)
    pol = make(PreblePolicy, view, PrebleConfig(warmup_requests_per_instance=0))
    base = [40, 41, 42, 43]
    on_p1 = [(base, None), (base + [44], None), (base + [45, 46], 3000)]
    on_p0 = [([10, 11, 12, 13] + tail, None) for tail in ([], [14], [15], [16])] + [([20], None), ([20, 21], None)]
    t = 0.0
    for k, (ids, tokens) in enumerate(on_p1 + on_p0):
        t += 1
        route(pol, make_request(f"g{k}", ids, tokens=tokens), view, "p1" if k < len(on_p1) else "p0", now=t)
    cost = make_ctx().cost
    small = cost.prefill_time(512) + cost.prefill_time(1024)  # the [20, 21] group on p0
    heavy, light = pol._load2["p0"], pol._load2["p1"]
    # Below 1.5x, although moving the small group would not invert the two instances: only the
    # threshold keeps it where it is.
    assert light < heavy < 1.5 * light and heavy - small >= light + small
    d = pol.select(make_request("x", [20, 21, 22]), view, t + 1)
    assert (d.instance, d.branch) == ("p0", "exploit")


@pytest.mark.parametrize("later_ttft, replicated", [(20.0, True), (8.0, False)])
def test_preble_replicates_a_single_hot_prefix_only_when_its_ttft_doubled(later_ttft, replicated):
    view = make_view(2)
    pol = make(PreblePolicy, view, PrebleConfig(warmup_requests_per_instance=0))
    ids = [1, 2, 3, 4]
    a1, a2 = make_request("a1", ids, arrival=0.0), make_request("a2", ids + [5], arrival=100.0)
    route(pol, a1, view, "p0", now=0.0)
    pol.on_prefill_done(a1, "p0", view, 5.0)  # TTFT 5 s in the older half of the window
    route(pol, a2, view, "p0", now=100.0)
    pol.on_prefill_done(a2, "p0", view, 100.0 + later_ttft)
    route(pol, make_request("a3", ids + [6], arrival=130.0), view, "p0", now=130.0)
    d = pol.select(make_request("a4", ids + [7]), view, 131.0)
    assert d.branch == "exploit"
    assert d.instance == ("p1" if replicated else "p0")


# -- SGLang cache_aware --------------------------------------------------------------------------
def _sglang(loads: tuple[int, int]):
    view = make_view(2)
    pol = make(SGLangCacheAwarePolicy, view)
    route(pol, make_request("seed", list(range(1, 11))), view, "p0")
    for name, load in zip(("p0", "p1"), loads):
        view[name].engine_pending_requests = load
    return view, pol


@pytest.mark.parametrize(
    "loads, expect",
    [
        ((130, 65), ("p1", "shortest_queue")),  # diff 65 > 64 and 130 > 97.5
        ((128, 64), ("p0", "cache_match")),  # diff 64 is not > 64
        ((195, 130), ("p0", "cache_match")),  # 195 is not > 1.5 x 130
        ((196, 130), ("p1", "shortest_queue")),  # both exceeded
        ((65, 0), ("p1", "shortest_queue")),
        ((64, 0), ("p0", "cache_match")),
    ],
)
def test_sglang_goes_to_shortest_queue_exactly_when_both_thresholds_are_exceeded(loads, expect):
    view, pol = _sglang(loads)
    d = pol.select(make_request("r", list(range(1, 11))), view, 0)
    assert (d.instance, d.branch) == expect


def test_sglang_load_is_in_flight_requests_plus_router_queue():
    view, pol = _sglang((0, 0))
    view["p0"].inflight_requests = 100
    view["p1"].queue.extend([((0.0,), i, f"q{i}") for i in range(35)])
    d = pol.select(make_request("r", list(range(1, 11))), view, 0)
    assert (d.instance, d.branch) == ("p1", "shortest_queue")  # 100 vs 35: diff 65, 100 > 52.5
    # Engine-pending prefills are part of the in-flight count, not added to it.
    view["p0"].engine_pending_requests = 100
    view["p1"].queue.clear()
    view["p1"].inflight_requests = view["p1"].engine_pending_requests = 36
    d = pol.select(make_request("r", list(range(1, 11))), view, 0)
    assert (d.instance, d.branch) == ("p0", "cache_match")  # 100 vs 36: diff 64 is not > 64


@pytest.mark.parametrize("tokens, expect", [(5119, ("p0", "cache_match")), (5120, ("p1", "smallest_tree"))])
def test_sglang_match_ratio_threshold(tokens, expect):
    view, pol = _sglang((0, 0))
    # 3 of 10 ids match p0's tree: 1,536 matched tokens; ratio 0.3 at 5,120 tokens is not > 0.3.
    d = pol.select(make_request("r", [1, 2, 3, 90, 91, 92, 93, 94, 95, 96], tokens=tokens), view, 0)
    assert (d.instance, d.branch) == expect


def test_sglang_tree_is_bounded_and_evicts_least_recently_used_leaves_first():
    view = make_view(1)
    pol = make(SGLangCacheAwarePolicy, view, SGLangCacheAwareConfig(max_tree_tokens=12 * 128))
    a = make_request("a", [1, 2])  # 8 blocks
    b = make_request("b", [3, 4])
    route(pol, a, view, "p0")
    route(pol, b, view, "p0")  # 16 blocks > 12: four of a's deepest blocks go
    assert pol.tree.size("p0") == 12
    assert pol.tree.deepest(a.block_hashes, {"p0"})[0] == 4
    assert pol.tree.deepest(b.block_hashes, {"p0"})[0] == 8


# -- Dynamo KV router ----------------------------------------------------------------------------
def test_dynamo_picks_the_argmin_of_its_cost_formula():
    view = make_view(3)
    pol = make(DynamoKVPolicy, view)
    req = make_request("r", list(range(8)))  # 32 blocks
    view.add_blocks("p0", req.block_hashes[:16])
    view.add_blocks("p2", req.block_hashes[:4])
    pend(view, "p2", 640)
    logits = pol.logits(req, view)
    # overlap_score_credit 1, prefill_load_scale 1: (pending + isl)/bs - overlap + active blocks
    assert logits == {"p0": (0 + 4096) / 128 - 16 + 32, "p1": 4096 / 128 + 32, "p2": (640 + 4096) / 128 - 4 + 32}
    assert pol.select(req, view, 0).instance == "p0"
    pend(view, "p0", 2047)
    assert pol.select(req, view, 0).instance == "p0"  # 63.99 < 64
    pend(view, "p0", 2049)
    assert pol.select(req, view, 0).instance == "p1"  # 64.01 > 64


def test_dynamo_tracks_active_blocks_until_prefill_finishes():
    view = make_view(2)
    pol = make(DynamoKVPolicy, view)
    first = make_request("a", list(range(8)))
    route(pol, first, view, "p0")
    second = make_request("b", list(range(8)) + [50])  # shares 32 active blocks on p0
    logits = pol.logits(second, view)
    assert logits["p0"] == pytest.approx(4608 / 128 + 32 + (36 - 32))
    assert logits["p1"] == pytest.approx(4608 / 128 + 36)
    pol.on_prefill_done(first, "p0", view, 1.0)
    assert pol.logits(second, view)["p0"] == pytest.approx(4608 / 128 + 36)


def test_dynamo_breaks_ties_at_random_but_repeatably():
    view = make_view(4)
    pol = make(DynamoKVPolicy, view)
    picks = [pol.select(make_request(f"r{i}", [i + 1]), view, 0).instance for i in range(40)]
    assert len(set(picks)) > 1
    assert picks == [pol.select(make_request(f"r{i}", [i + 1]), view, 0).instance for i in range(40)]


def test_dynamo_softmax_temperature_prefers_low_cost():
    view = make_view(2)
    pol = make(DynamoKVPolicy, view, DynamoKVConfig(router_temperature=0.1))
    pend(view, "p1", 128 * 200)
    picks = [pol.select(make_request(f"r{i}", [i + 1]), view, 0).instance for i in range(200)]
    # Logits differ by the whole range, so p1's weight is exp(-1/0.1) relative to p0's.
    assert picks.count("p1") <= 5
    assert math.exp(-10) < 1e-4


# -- through the router ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_runs_through_the_router(name):
    view = make_view(4)
    router = PrefillRouter(PREFILL_POLICIES.create(name, make_ctx()), view)
    for i in range(20):
        req = make_request(f"r{i}", [i % 3, i], arrival=float(i))
        router.admit(req, float(i))
        for r, inst in router.take_dispatchable(float(i)):
            view.add_blocks(inst, r.block_hashes)
        if i % 2:
            router.finish_prefill(f"r{i - 1}", float(i))
    assert sum(view[n].engine_pending_requests for n in view.names("prefill")) == len(router)
