"""The prefill router: runs a policy, owns the scheduler-side queues, dispatches late.

This is the one piece of scheduling machinery that both the live scheduler and the simulator
drive. Either side calls ``admit`` when a request arrives, ``take_dispatchable`` to learn which
queued requests may now go to their engine, ``finish_prefill`` when an engine reports the prefill
done, and ``evict_instance`` when an instance fails. Time is always passed in (``now``) so runs
repeat exactly.
"""

from __future__ import annotations

from bisect import insort
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.policies.base import PrefillPolicy
from dualmap_pd.policies.migration import MigrationPlan
from dualmap_pd.request import Decision, Move, NoInstanceError, RoutedRequest


@dataclass(frozen=True)
class DispatchLimits:
    """When a late-dispatch policy may hand a queued request to its engine.

    The engine may hold at most ``max_engine_pending`` requests whose prefill has not finished,
    and their uncached tokens must fit the instance's SLO token budget (SLO / per-token cost);
    an idle engine always takes the head of its queue, however large, so nothing starves.
    """

    max_engine_pending: int = 2


@dataclass
class RouterStats:
    decisions: Counter[str] = field(default_factory=Counter)
    moves: int = 0
    dispatched: int = 0


class PrefillRouter:
    def __init__(
        self,
        policy: PrefillPolicy,
        view: ClusterView,
        limits: DispatchLimits | None = None,
    ) -> None:
        self.policy = policy
        self.view = view
        self.limits = limits or DispatchLimits()
        self.stats = RouterStats()
        # Requests admitted and not yet finished prefill, by id.
        self._requests: dict[str, RoutedRequest] = {}
        # Per instance, the uncached tokens and the instance of each dispatched request.
        self._in_engine: dict[str, tuple[str, int]] = {}
        self._seq = 0
        # Prefix-migration plans emitted and not yet taken by their executor (take_migrations).
        self._migrations: list[MigrationPlan] = []
        # Instances whose queue holds >= 2 requests (the only ones rebalancing can relieve), and
        # each instance's position in the view, to list them in view order without a scan.
        self._long_queues: set[str] = set()
        self._position: dict[str, int] = {}
        self._membership_seen = -1
        self.sync_membership()

    # -- membership -------------------------------------------------------------------------
    def sync_membership(self) -> None:
        """Tell the policy about joins, leaves, health and draining changes (cheap if none)."""
        if self._membership_seen != self.view.membership_version:
            self._membership_seen = self.view.membership_version
            self._position = {name: i for i, name in enumerate(self.view.names())}
            self._long_queues &= self._position.keys()
            self.policy.on_membership_change(self.view)

    # -- admission --------------------------------------------------------------------------
    def admit(self, req: RoutedRequest, now: float) -> Decision:
        """Route a new request: it is queued on the chosen instance (late dispatch) or counted
        as sent to the engine at once (the caller then sends it)."""
        if req.request_id in self._requests:
            raise ValueError(f"request {req.request_id!r} already admitted")
        self.sync_membership()
        decision = self.policy.select(req, self.view, now)
        if decision.instance not in self.view or not self.view[decision.instance].eligible:
            raise NoInstanceError(f"policy chose unavailable instance {decision.instance!r}")
        req.candidates = decision.candidates or (decision.instance,)
        self._requests[req.request_id] = req
        self._plan_migration(req, decision.instance, now)
        self._enqueue(req, decision.instance, now)
        self.stats.decisions[decision.branch] += 1
        self.policy.on_decision(req, decision, self.view, now)
        if self.policy.late_dispatch:
            self.rebalance(req.candidates, now)
        return decision

    def _enqueue(self, req: RoutedRequest, instance: str, now: float) -> None:
        st = self.view[instance]
        uncached = req.prompt_tokens - self.policy.expected_hit_tokens(req, instance, self.view, now)
        req.queued_on = instance
        req.queued_uncached = max(0, uncached)
        req.enqueued_at = now
        self._seq += 1
        insort(st.queue, (self.policy.queue_priority(req, instance, self.view), self._seq, req.request_id))
        st.queued_uncached_tokens += req.queued_uncached
        if len(st.queue) == 2:
            self._long_queues.add(instance)

    def _dequeue(self, req: RoutedRequest) -> None:
        instance = req.queued_on
        if instance is None:
            return
        st = self.view[instance]
        for i, item in enumerate(st.queue):
            if item[2] == req.request_id:
                del st.queue[i]
                break
        st.queued_uncached_tokens -= req.queued_uncached
        if len(st.queue) < 2:
            self._long_queues.discard(instance)
        req.queued_on = None
        req.queued_uncached = 0

    # -- dispatch ---------------------------------------------------------------------------
    def take_dispatchable(self, now: float, instances: list[str] | None = None) -> list[tuple[RoutedRequest, str]]:
        """Pop every queued request that may now be sent to its engine; the caller sends them."""
        out: list[tuple[RoutedRequest, str]] = []
        names = instances if instances is not None else [s.name for s in self.view.instances(Role.PREFILL) if s.queue]
        for name in names:
            st = self.view.get(name)
            if st is None or not st.queue or not st.healthy:
                continue
            budget = self.policy.ctx.cost.token_budget(self.policy.ctx.slo_ttft, name)
            held = 0  # queue head entries left waiting for a prefix copy
            while len(st.queue) > held:
                req = self._requests[st.queue[held][2]]
                if self.policy.migration is not None and self.policy.hold_until(req, name, self.view, now) is not None:
                    held += 1  # the executor dispatches again when the copy lands or fails
                    continue
                uncached = max(0, req.prompt_tokens - self.policy.expected_hit_tokens(req, name, self.view, now))
                if self.policy.late_dispatch and st.engine_pending_requests > 0:
                    if st.engine_pending_requests >= self.limits.max_engine_pending:
                        break
                    if st.engine_pending_tokens + uncached > budget:
                        break
                self._dequeue(req)
                st.engine_pending_requests += 1
                st.engine_pending_tokens += uncached
                self._in_engine[req.request_id] = (name, uncached)
                self.stats.dispatched += 1
                out.append((req, name))
        return out

    def finish_prefill(self, request_id: str, now: float) -> RoutedRequest | None:
        """The engine finished (or abandoned) this request's prefill."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        if req.queued_on is not None:  # cancelled while still queued
            self._dequeue(req)
            return req
        placed = self._in_engine.pop(request_id, None)
        if placed is not None:
            name, uncached = placed
            st = self.view.get(name)
            if st is not None:
                st.engine_pending_requests = max(0, st.engine_pending_requests - 1)
                st.engine_pending_tokens = max(0, st.engine_pending_tokens - uncached)
                self.policy.on_prefill_done(req, name, self.view, now)
                if self.policy.late_dispatch:
                    self.rebalance([name], now)
        return req

    cancel = finish_prefill

    def evict_instance(self, name: str, now: float) -> list[RoutedRequest]:
        """Take every request queued on or dispatched to ``name`` back out of the router, so
        the caller can re-admit them (they fall to their backup candidate). Nothing is lost."""
        st = self.view.get(name)
        orphans: list[RoutedRequest] = []
        for rid, req in list(self._requests.items()):
            placed = self._in_engine.get(rid)
            if req.queued_on == name or (placed is not None and placed[0] == name):
                orphans.append(req)
                self._requests.pop(rid)
                self._in_engine.pop(rid, None)
                self._dequeue(req)
        if st is not None:
            st.engine_pending_requests = 0
            st.engine_pending_tokens = 0
        return orphans

    def take_queued(self, name: str) -> list[RoutedRequest]:
        """Take the requests still waiting in ``name``'s scheduler-side queue out of the router
        (a draining instance): the caller re-admits them, so they fall to their backup candidate.
        Requests already dispatched to the engine stay; they finish there."""
        st = self.view.get(name)
        if st is None:
            return []
        waiting = [self._requests.pop(item[2]) for item in list(st.queue)]
        for req in waiting:
            self._dequeue(req)
        return waiting

    # -- rebalancing ------------------------------------------------------------------------
    def rebalance(self, involved: tuple[str, ...] | list[str], now: float) -> list[Move]:
        """Let the policy move queued requests off hot spots among the instances it wants
        checked after an event that ``involved`` these."""
        self.sync_membership()
        position = self._position
        long_queues = sorted((n for n in self._long_queues if n in position), key=position.__getitem__)
        check = [n for n in self.policy.rebalance_instances(involved, long_queues) if n in self.view and len(self.view[n].queue) >= 2]
        if not check:
            return []
        moves = self.policy.rebalance(self.view, _Queues(self), check, now)
        for mv in moves:
            req = self._requests.get(mv.request_id)
            if req is None or req.queued_on != mv.source or mv.target not in self.view:
                continue
            self._dequeue(req)
            req.moves += 1
            self._plan_migration(req, mv.target, now)
            self._enqueue(req, mv.target, now)
            self.stats.decisions[mv.branch] += 1
            self.stats.moves += 1
        return moves

    # -- prefix migration -------------------------------------------------------------------
    def _plan_migration(self, req: RoutedRequest, instance: str, now: float) -> None:
        planner = self.policy.migration
        if planner is None:
            return
        plan = self.policy.migration_for(req, instance, self.view, now)
        if plan is not None:
            planner.on_planned(plan, now)
            self._migrations.append(plan)

    def take_migrations(self) -> list[MigrationPlan]:
        """Plans emitted since the last call; the caller executes them and reports each to
        ``policy.migration`` (on_started, then on_finished or on_failed), then dispatches."""
        plans, self._migrations = self._migrations, []
        return plans

    # -- introspection ----------------------------------------------------------------------
    def placed(self, request_id: str) -> tuple[str, int] | None:
        """(instance, uncached tokens booked) of a dispatched request whose prefill is not done."""
        return self._in_engine.get(request_id)

    def get(self, request_id: str) -> RoutedRequest | None:
        return self._requests.get(request_id)

    def queued_requests(self, name: str) -> list[RoutedRequest]:
        return [self._requests[item[2]] for item in self.view[name].queue]

    def __len__(self) -> int:
        return len(self._requests)


class _Queues(Mapping[str, list[RoutedRequest]]):
    """Every instance's queued requests, in queue order, built on first access (a rebalancing
    round looks at a few queues; the cluster may have a thousand)."""

    def __init__(self, router: PrefillRouter) -> None:
        self._router = router
        self._built: dict[str, list[RoutedRequest]] = {}

    def __getitem__(self, name: str) -> list[RoutedRequest]:
        got = self._built.get(name)
        if got is None:
            st = self._router.view.get(name)
            if st is None:
                raise KeyError(name)
            reqs = self._router._requests
            got = self._built[name] = [reqs[item[2]] for item in st.queue]
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(self._router.view.names(Role.PREFILL))

    def __len__(self) -> int:
        return len(self._router.view.names(Role.PREFILL))
