"""Decode balancing: prefixes do not matter on the decode side, only load does."""

from __future__ import annotations

from dualmap_pd.cluster import ClusterView, InstanceState, Role
from dualmap_pd.policies.base import DECODE_POLICIES, DecodePolicy, PolicyContext, eligible_or_raise
from dualmap_pd.request import Decision, RoutedRequest


def decode_load(st: InstanceState) -> float:
    """Context tokens the instance is decoding, inflated by how full its KV cache is: a nearly
    full cache will preempt, so it counts as busier than its token count says."""
    return (st.active_tokens + 1) * (1.0 + st.kv_usage)


@DECODE_POLICIES.register
class PowerOfTwoDecode(DecodePolicy):
    """Power of two choices (Mitzenmacher 2001): sample two decode instances, take the less
    loaded. Nearly as balanced as scanning all instances, without every router replica piling
    onto the same instance between load updates."""

    name = "power_of_two"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._rng = ctx.rng("decode-p2c")

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        pool = eligible_or_raise(view, Role.DECODE)
        if len(pool) == 1:
            return Decision(pool[0].name, "single", (pool[0].name,))
        a, b = self._rng.sample(pool, 2)
        pick = a if decode_load(a) <= decode_load(b) else b
        return Decision(pick.name, "least_loaded_of_two", (a.name, b.name), scores={a.name: decode_load(a), b.name: decode_load(b)})


@DECODE_POLICIES.register
class LeastLoadedDecode(DecodePolicy):
    """Scan every decode instance and take the least loaded (ties: first by name)."""

    name = "least_loaded"

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        pool = sorted(eligible_or_raise(view, Role.DECODE), key=lambda s: s.name)
        pick = min(pool, key=decode_load)
        return Decision(pick.name, "least_loaded", tuple(s.name for s in pool))
