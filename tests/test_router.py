import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualmap_pd.policies.dualmap import DualMapPolicy
from dualmap_pd.request import NoInstanceError
from dualmap_pd.router import DispatchLimits, PrefillRouter
from tests.policy_helpers import make_ctx, make_request, make_view


def test_late_dispatch_holds_requests_beyond_the_engine_limit():
    view = make_view(1)
    router = PrefillRouter(DualMapPolicy(make_ctx()), view, DispatchLimits(max_engine_pending=2))
    for i in range(5):
        router.admit(make_request(f"r{i}", [i], tokens=500, arrival=i), float(i))
    sent = router.take_dispatchable(5.0)
    assert [r.request_id for r, _ in sent] == ["r0", "r1"]
    assert view["p0"].engine_pending_requests == 2 and len(view["p0"].queue) == 3
    assert router.take_dispatchable(5.0) == []
    router.finish_prefill("r0", 6.0)
    assert [r.request_id for r, _ in router.take_dispatchable(6.0)] == ["r2"]


def test_idle_engine_takes_a_request_larger_than_the_budget():
    view = make_view(1)
    router = PrefillRouter(DualMapPolicy(make_ctx(slo=1.0)), view)
    router.admit(make_request("big", [1] * 40, tokens=20_000), 0.0)  # 3.2 s > 1 s budget
    assert [r.request_id for r, _ in router.take_dispatchable(0.0)] == ["big"]


def test_queue_orders_longest_hit_first_then_arrival():
    view = make_view(1)
    router = PrefillRouter(DualMapPolicy(make_ctx()), view)
    view["p0"].engine_pending_requests = 2  # busy: everything queues
    cached = make_request("hit", [5, 6], arrival=2.0)
    view.add_blocks("p0", cached.block_hashes[:4])
    router.admit(make_request("a", [1], arrival=0.0), 0.0)
    router.admit(make_request("b", [2], arrival=1.0), 1.0)
    router.admit(cached, 2.0)
    assert [r.request_id for r in router.queued_requests("p0")] == ["hit", "a", "b"]


def test_duplicate_admission_is_rejected():
    view = make_view(2)
    router = PrefillRouter(DualMapPolicy(make_ctx()), view)
    router.admit(make_request("x", [1]), 0.0)
    with pytest.raises(ValueError):
        router.admit(make_request("x", [1]), 0.0)


def test_evicting_a_failed_instance_returns_every_request_for_readmission():
    view = make_view(2)
    router = PrefillRouter(DualMapPolicy(make_ctx()), view)
    reqs = [make_request(f"r{i}", [i % 3, i], tokens=600) for i in range(12)]
    for r in reqs:
        router.admit(r, 0.0)
    router.take_dispatchable(0.0)
    victim = reqs[0].queued_on or next(n for n in ("p0", "p1") if view[n].engine_pending_requests)
    on_victim = {r.request_id for r in reqs if r.queued_on == victim} | {
        r.request_id for r in reqs if router._in_engine.get(r.request_id, ("",))[0] == victim
    }
    view.set_health(victim, False)
    orphans = router.evict_instance(victim, 1.0)
    assert {o.request_id for o in orphans} == on_victim
    assert view[victim].engine_pending_requests == 0 and not view[victim].queue
    for o in orphans:
        o.queued_on = None
        d = router.admit(o, 1.0)
        assert d.instance != victim
    assert len(router) == 12


def test_no_eligible_instance_raises():
    view = make_view(1)
    router = PrefillRouter(DualMapPolicy(make_ctx()), view)
    view.set_health("p0", False)
    with pytest.raises(NoInstanceError):
        router.admit(make_request("x", [1]), 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(100, 9000), st.booleans()), min_size=1, max_size=60))
def test_every_admitted_request_is_dispatched_exactly_once(ops):
    """Whatever the mix of arrivals and completions, each request is sent once and none is lost."""
    view = make_view(3)
    router = PrefillRouter(DualMapPolicy(make_ctx()), view)
    sent: list[str] = []
    running: list[str] = []
    t = 0.0
    for i, (prefix, tokens, finish_one) in enumerate(ops):
        t += 0.05
        router.admit(make_request(f"r{i}", [prefix, 100 + i], tokens=tokens, arrival=t), t)
        for r, _ in router.take_dispatchable(t):
            sent.append(r.request_id)
            running.append(r.request_id)
        if finish_one and running:
            router.finish_prefill(running.pop(0), t)
    while running or len(router):
        t += 0.05
        if running:
            router.finish_prefill(running.pop(0), t)
        for r, _ in router.take_dispatchable(t):
            sent.append(r.request_id)
            running.append(r.request_id)
    assert sorted(sent) == sorted(f"r{i}" for i in range(len(ops)))
    assert all(s.engine_pending_requests == 0 and s.queued_uncached_tokens == 0 for s in view.instances())


def test_take_queued_returns_only_the_waiting_requests_of_a_draining_instance():
    view = make_view(2)
    router = PrefillRouter(DualMapPolicy(make_ctx()), view, DispatchLimits(max_engine_pending=1))
    reqs = [make_request(f"r{i}", [i % 3, i], tokens=600) for i in range(10)]
    for r in reqs:
        router.admit(r, 0.0)
    in_engine = {r.request_id: name for r, name in router.take_dispatchable(0.0)}
    victim = max(("p0", "p1"), key=lambda n: len(view[n].queue))
    waiting = {r.request_id for r in router.queued_requests(victim)}
    assert waiting
    view.set_draining(victim, True)
    taken = router.take_queued(victim)
    assert {r.request_id for r in taken} == waiting
    assert not view[victim].queue and view[victim].queued_uncached_tokens == 0
    assert view[victim].engine_pending_requests == 1  # its engine keeps what it was given
    for r in taken:
        assert router.admit(r, 1.0).instance != victim
    assert len(router) == 10
    busy = next(rid for rid, name in in_engine.items() if name == victim)
    assert router.finish_prefill(busy, 2.0) is not None
