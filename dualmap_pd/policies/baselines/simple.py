"""Load-only and affinity-only baselines: round robin, least loaded, cache affinity.

These are the non-adaptive ends of the design space DualMap's evaluation compares against
(DUALMAP.md, "Evaluation as published": cache affinity, least loaded with fewest pending prompt
tokens; round robin in the authors' code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.hotprefix import AUTHORS_EXTEND_SHARE, HotPrefixConfig, HotPrefixDetector
from dualmap_pd.policies.base import PREFILL_POLICIES, PolicyContext, PrefillPolicy
from dualmap_pd.policies.baselines.common import PrefillCache
from dualmap_pd.request import Decision, NoInstanceError, RoutedRequest
from dualmap_pd.ring import ConsistentHashRing


@PREFILL_POLICIES.register
class RoundRobinPolicy(PrefillPolicy):
    """Round robin over the eligible prefill instances (DualMap authors' code, github
    ASISys/DualMap, lists it among its baselines; SGLang's sgl-router round_robin.rs does the same).

    The cursor is a position in the view's (stable) instance order; ``select`` walks from it to
    the first eligible instance, so an unhealthy or draining instance is skipped without
    disturbing the rotation, and ``on_decision`` moves the cursor past the instance actually used.
    """

    name = "round_robin"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._cursor = 0
        self._cache = PrefillCache()

    def on_membership_change(self, view: ClusterView) -> None:
        self._cache.refresh(view)

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        states = self._cache.get(view).states
        n = len(states)
        start = self._cursor % n if n else 0
        for step in range(n):
            st = states[(start + step) % n]
            if st.eligible:
                return Decision(st.name, "round_robin", (st.name,))
        raise NoInstanceError("no healthy prefill instance")

    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        pos = self._cache.get(view).index.get(decision.instance)
        if pos is not None:
            self._cursor = pos + 1


@PREFILL_POLICIES.register
class LeastLoadedPolicy(PrefillPolicy):
    """Least loaded: the eligible instance with the fewest pending prompt tokens, as in DualMap's
    evaluation (DUALMAP.md: "least loaded (fewest pending prompt tokens)").

    Pending tokens are the uncached prompt tokens routed to the instance and not yet prefilled
    (scheduler queue + engine backlog, ``pending_work_tokens``): the work that actually stands
    between a new request and its prefill. Ties: fewer pending requests, then view order, so runs
    repeat exactly. Cache contents are ignored by design (the pure load-balancing end).
    """

    name = "least_loaded"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._cache = PrefillCache()

    def on_membership_change(self, view: ClusterView) -> None:
        self._cache.refresh(view)

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        best = None
        best_key = (0, 0)
        for st in self._cache.get(view).eligible:  # runs per instance: fields read inline
            key = (st.queued_uncached_tokens + st.engine_pending_tokens, len(st.queue) + st.engine_pending_requests)
            if best is None or key < best_key:
                best, best_key = st, key
        if best is None:
            raise NoInstanceError("no healthy prefill instance")
        return Decision(best.name, "least_loaded", (best.name,), scores={best.name: float(best_key[0])})


@dataclass(frozen=True)
class CacheAffinityConfig:
    vnodes: int = 160  # same ring density as one of DualMap's rings, so only the mapping count differs
    # The routing key: DualMap's adaptive hot-prefix key (the authors' cache-affinity baseline
    # uses the same detector, threshold 0.0612), or a fixed depth of ``key_depth`` blocks when
    # ``adaptive_key`` is False (this project's earlier baseline: the first block only).
    adaptive_key: bool = True
    hot_prefix: HotPrefixConfig = field(default_factory=lambda: HotPrefixConfig(extend_share=AUTHORS_EXTEND_SHARE))
    key_depth: int = 1


@PREFILL_POLICIES.register
class CacheAffinityPolicy(PrefillPolicy):
    """Pure cache affinity: one consistent-hash ring on the prompt's prefix key.

    The baseline DualMap generalises (DUALMAP.md section 1 and "Evaluation as published": cache
    affinity, hit ratio >= 1 - 1/m for m requests of one prefix). As the authors run it, the key
    is the same adaptive one DualMap uses (the first block, one block deeper for each hot prefix
    on the path; DUALMAP.md "The cache-affinity baseline routes by the same adaptive key"), so a
    trace whose first block is shared by every request does not all land on one instance. Every
    request with the same key goes to the same instance regardless of load; an unhealthy or
    draining owner is skipped by walking the ring clockwise to the next eligible instance (so
    keys move only off that owner).
    """

    name = "cache_affinity"

    def __init__(self, ctx: PolicyContext, config: CacheAffinityConfig | None = None) -> None:
        super().__init__(ctx)
        self.config = config or CacheAffinityConfig()
        self.ring = ConsistentHashRing("cache-affinity", self.config.vnodes)
        self.hot = HotPrefixDetector(self.config.hot_prefix)
        self._excluded: frozenset[str] = frozenset()
        self._version = -1

    def on_membership_change(self, view: ClusterView) -> None:
        self._sync(self.ring, view)
        self.hot.set_instance_count(len(self.ring.members))
        self._excluded = frozenset(view.ineligible_names(Role.PREFILL))
        self._version = view.membership_version

    @staticmethod
    def _sync(ring: ConsistentHashRing, view: ClusterView) -> None:
        wanted = set(view.names(Role.PREFILL))
        for m in sorted(wanted - ring.members):
            ring.add(m)
        for m in sorted(ring.members - wanted):
            ring.remove(m)

    def _depth(self, req: RoutedRequest) -> int:
        if self.config.adaptive_key:
            return self.hot.key_depth(req.block_hashes)
        return self.config.key_depth

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        ring, excluded = self.ring, self._excluded
        if self._version != view.membership_version:
            # Membership changed without on_membership_change (the router always calls it first;
            # direct callers may not). Build a throwaway ring rather than mutate state here.
            ring = ConsistentHashRing("cache-affinity", self.config.vnodes)
            self._sync(ring, view)
            excluded = frozenset(view.ineligible_names(Role.PREFILL))
        owner = ring.lookup(req.routing_key(self._depth(req)), excluded)
        if owner is None:
            raise NoInstanceError("no healthy prefill instance")
        return Decision(owner, "affinity", (owner,))

    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        if self.config.adaptive_key:
            self.hot.observe(req.block_hashes, self.hot.key_depth(req.block_hashes))
