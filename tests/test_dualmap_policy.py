import pytest

from dualmap_pd.hotprefix import HotPrefixConfig
from dualmap_pd.policies import PREFILL_POLICIES
from dualmap_pd.policies.dualmap import DualMapConfig, DualMapMigratePolicy, DualMapPolicy
from dualmap_pd.request import NoInstanceError
from dualmap_pd.router import PrefillRouter
from tests.policy_helpers import make_ctx, make_request, make_view, snapshot

# 0.16 ms/token: 1 s of prefill work is 6,250 tokens; SLO 5 s -> switch threshold 2.5 s.
TOKENS_PER_S = 6250


def setup(n=4, **cfg):
    view = make_view(n)
    pol = DualMapPolicy(make_ctx(), DualMapConfig(**cfg))
    router = PrefillRouter(pol, view)
    return view, pol, router


def test_registered_by_name():
    # "dualmap" is this project's DualMap (with prefix migration); the published one keeps a name.
    assert PREFILL_POLICIES.get("dualmap_nomigrate") is DualMapPolicy
    assert PREFILL_POLICIES.get("dualmap") is DualMapMigratePolicy
    assert DualMapPolicy.migration is None


def test_affinity_prefers_the_candidate_with_the_longer_hit():
    view, pol, _ = setup()
    req = make_request("r", [1, 2, 3, 4])
    _, (a, b) = pol.candidates_for(req)
    view.add_blocks(b, req.block_hashes[:8])
    view.add_blocks(a, req.block_hashes[:4])
    d = pol.select(req, view, 0.0)
    assert (d.instance, d.branch, d.hit_tokens) == (b, "affinity", 1024)
    assert d.candidates == (a, b)


def test_slo_switch_when_affinity_candidate_would_break_the_threshold():
    view, pol, _ = setup()
    req = make_request("r", [1, 2, 3, 4])
    _, (a, b) = pol.candidates_for(req)
    view.add_blocks(a, req.block_hashes)
    view[a].engine_pending_tokens = 3 * TOKENS_PER_S  # 3 s > 2.5 s threshold
    d = pol.select(req, view, 0.0)
    assert (d.instance, d.branch) == (b, "slo_switch")
    # Just under the threshold: stays.
    view[a].engine_pending_tokens = int(2.4 * TOKENS_PER_S)
    assert pol.select(req, view, 0.0).branch == "affinity"


def test_slo_violation_takes_the_faster_when_both_are_over():
    view, pol, _ = setup()
    req = make_request("r", [1, 2, 3, 4])
    _, (a, b) = pol.candidates_for(req)
    view.add_blocks(a, req.block_hashes)
    view[a].engine_pending_tokens = 10 * TOKENS_PER_S
    view[b].engine_pending_tokens = 4 * TOKENS_PER_S
    d = pol.select(req, view, 0.0)
    assert (d.instance, d.branch) == (b, "slo_violation")
    view[b].engine_pending_tokens = 20 * TOKENS_PER_S
    d = pol.select(req, view, 0.0)
    assert (d.instance, d.branch) == (a, "slo_violation")


def test_equal_hits_go_to_the_less_loaded():
    view, pol, _ = setup(tiebreak="pending_and_active")
    req = make_request("r", [9, 9])
    _, (a, b) = pol.candidates_for(req)
    view[a].engine_pending_tokens = 500
    d = pol.select(req, view, 0.0)
    assert (d.instance, d.branch) == (b, "load_tiebreak")


def test_select_is_pure():
    view, pol, _ = setup()
    req = make_request("r", [1, 2])
    _, (a, _b) = pol.candidates_for(req)
    view.add_blocks(a, req.block_hashes[:3])
    before = snapshot(view)
    for _ in range(5):
        pol.select(req, view, 0.0)
    assert snapshot(view) == before
    assert req.candidates == () and req.queued_on is None


def test_unhealthy_candidate_falls_to_backup_and_none_left_raises():
    view, pol, router = setup(n=2)
    req = make_request("r", [1])
    _, (a, b) = pol.candidates_for(req)
    view.set_health(a, False)
    router.sync_membership()
    assert pol.select(req, view, 0.0).instance == b
    view.set_health(b, False)
    router.sync_membership()
    with pytest.raises(NoInstanceError):
        pol.select(req, view, 0.0)


def test_same_prefix_same_candidates_distinct_prefixes_spread():
    view, pol, _ = setup(n=8)
    first = {pol.candidates_for(make_request(f"x{i}", [42, i]))[1] for i in range(50)}
    assert len(first) == 1
    spread = {pol.candidates_for(make_request(f"y{i}", [i, 1]))[1][0] for i in range(400)}
    assert len(spread) == 8


def test_rebalancing_moves_queued_requests_to_their_backup_until_the_excess_is_gone():
    # Key extension off, so one prefix keeps one candidate pair however hot it gets.
    view, pol, router = setup(n=4, hot_prefix=HotPrefixConfig(extend_share=1.0))
    reqs = [make_request(f"r{i}", [7, 1000 + i], tokens=3000, arrival=0.0) for i in range(5)]
    _, (a, b) = pol.candidates_for(reqs[0])
    view.add_blocks(a, reqs[0].block_hashes[:4])
    view[a].engine_pending_requests = 2  # engines busy: everything waits in scheduler queues
    view[b].engine_pending_requests = 2
    for r in reqs:
        router.admit(r, 0.0)
    assert {r.queued_on for r in reqs} == {a} and router.stats.moves == 0
    # The engine on a turns out slow: its backlog jumps past one SLO of work.
    budget = pol.ctx.cost.token_budget(5.0)
    view[a].engine_pending_tokens = int(budget) - 4000
    moves = router.rebalance([a], 0.1)
    assert moves and all(m.source == a and m.target == b and m.gain_s > 0 for m in moves)
    # Moved one at a time until a is back within budget, and no further.
    assert view[a].pending_work_tokens() <= budget
    assert view[a].pending_work_tokens() + 3000 > budget - 3000
    assert view[b].pending_work_tokens() < budget
    assert sorted(len(view[n].queue) for n in (a, b)) == sorted([5 - len(moves), len(moves)])
    assert router.stats.decisions["rebalanced"] == len(moves)


def test_rebalance_does_nothing_below_the_trigger():
    view, pol, router = setup(n=4)
    reqs = [make_request(f"r{i}", [7, 1000 + i], tokens=1000) for i in range(3)]
    _, (a, _b) = pol.candidates_for(reqs[0])
    view[a].engine_pending_requests = 2
    for r in reqs:
        router.admit(r, 0.0)
    assert router.stats.moves == 0
    assert pol.rebalance(view, {a: router.queued_requests(a)}, [a], 0.1) == []


def test_aged_queue_triggers_rebalancing():
    view, pol, router = setup(n=4)
    reqs = [make_request(f"r{i}", [7, 1000 + i], tokens=1000) for i in range(4)]
    _, (a, b) = pol.candidates_for(reqs[0])
    view.add_blocks(a, reqs[0].block_hashes[:4])
    view[a].engine_pending_requests = 2
    view[a].engine_pending_tokens = 2000
    for r in reqs:
        router.admit(r, 0.0)
    assert router.stats.moves == 0
    moves = pol.rebalance(view, {a: router.queued_requests(a)}, [a], now=3.5)
    assert moves and all(m.source == a and m.target == b and m.gain_s > 0 for m in moves)
