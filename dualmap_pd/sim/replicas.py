"""Scheduler replicas in the simulator: N routers over one set of engines.

Each replica is what one live ``dualmap-pd serve`` process holds (docs/replicas.md): its own
ClusterView, policy, cost model, queues and bookings. Replicas share nothing with each other;
each learns about the engines only through the observation channels (sim/observation.py): KV
events, polled engine metrics, and the answers to its own dispatches. Arrivals are spread over
them as an L4 load balancer would: round robin, or a seeded random pick per request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.cost import CostModel, HardwareProfile
from dualmap_pd.policies import DECODE_POLICIES, PREFILL_POLICIES, PolicyContext
from dualmap_pd.policies.base import DecodePolicy, PrefillPolicy
from dualmap_pd.router import DispatchLimits, PrefillRouter

ArrivalSpread = Literal["round_robin", "random"]


@dataclass
class Replica:
    index: int
    view: ClusterView
    cost: CostModel
    policy: PrefillPolicy
    router: PrefillRouter
    decode_policy: DecodePolicy | None


def build_replicas(
    n: int,
    profile: HardwareProfile,
    prefill_names: list[str],
    decode_names: list[str],
    policy: str,
    decode_policy: str | None,
    slo_ttft: float,
    seed: int,
    limits: DispatchLimits | None = None,
) -> list[Replica]:
    """``n`` independent schedulers. Replica 0 uses ``seed`` itself, so one replica is exactly
    the single scheduler of earlier runs; replica k > 0 seeds its policies with seed + k."""
    out = []
    for k in range(n):
        view = ClusterView(profile.block_size)
        for name in prefill_names:
            view.add_instance(name, Role.PREFILL)
        for name in decode_names:
            view.add_instance(name, Role.DECODE)
        cost = CostModel(profile)
        ctx = PolicyContext(cost, slo_ttft=slo_ttft, seed=seed + k)
        pol = PREFILL_POLICIES.create(policy, ctx)
        dec = DECODE_POLICIES.create(decode_policy, ctx) if decode_policy is not None else None
        out.append(Replica(k, view, cost, pol, PrefillRouter(pol, view, limits), dec))
    return out


class ArrivalBalancer:
    """Which replica each arriving request goes to (an L4 balancer in front of the replicas)."""

    def __init__(self, n: int, spread: ArrivalSpread, seed: int) -> None:
        if spread not in ("round_robin", "random"):
            raise ValueError(f"unknown arrival spread {spread!r}")
        self.n = n
        self.spread = spread
        self._next = 0
        self._rng = random.Random(f"{seed}:arrival-spread")

    def pick(self) -> int:
        if self.n == 1:
            return 0
        if self.spread == "random":
            return self._rng.randrange(self.n)
        k = self._next
        self._next = (k + 1) % self.n
        return k
