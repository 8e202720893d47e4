"""The prefill-policy interface and the name registry.

A policy is a small object with one decision method, ``select``, which must not change any
state (neither its own nor the view's). State that a policy learns from its own decisions (a
round-robin cursor, a radix tree of routed prompts, a hot-prefix window) is updated in
``on_decision``, which the router calls after it has acted on the decision. Policies that use
scheduler-side queues (late dispatch) also order those queues and may propose rebalancing moves;
the router applies the moves.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

from dualmap_pd.cluster import ClusterView, InstanceState, Role
from dualmap_pd.cost import CostModel
from dualmap_pd.request import Decision, Move, RoutedRequest

if TYPE_CHECKING:
    from dualmap_pd.policies.migration import MigrationPlan, MigrationPlanner


@dataclass
class PolicyContext:
    """What every policy may use: the cost model, the TTFT SLO and a seeded RNG."""

    cost: CostModel
    slo_ttft: float = 5.0
    seed: int = 0

    def rng(self, salt: str) -> random.Random:
        """An RNG private to one component, so adding randomness in one place never shifts
        another's sequence."""
        return random.Random(f"{self.seed}:{salt}")


class PrefillPolicy(ABC):
    """Chooses the prefill instance of a request."""

    name: ClassVar[str] = ""
    # True: requests wait in scheduler-side queues and are sent to the engine late (DualMap).
    # False: requests go to the engine at once and queue there (every baseline, as published).
    late_dispatch: ClassVar[bool] = False
    # Prefix-migration planner (policies/migration.py) of policies that copy KV between
    # prefill instances; its hooks are called by whoever executes the plans. Setting it to None
    # turns migration off (nothing would execute the plans).
    migration: MigrationPlanner | None = None

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        """Pick an eligible prefill instance. Pure: must not change any state."""

    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        """Learn from a decision the router has carried out."""

    def on_membership_change(self, view: ClusterView) -> None:
        """Instances joined, left, or changed health/draining state."""

    def on_prefill_done(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> None:
        """A request's prefill finished on ``instance``."""

    def queue_priority(self, req: RoutedRequest, instance: str, view: ClusterView) -> tuple:
        """Sort key of a request in an instance's scheduler-side queue (smaller goes first)."""
        return (req.arrival,)

    def rebalance_instances(self, involved: Sequence[str], long_queues: Sequence[str]) -> Sequence[str]:
        """Instances to check for a hot spot on a scheduling event that ``involved`` these;
        ``long_queues``: every instance with at least two queued requests, in view order."""
        return involved

    def rebalance(
        self,
        view: ClusterView,
        queued: Mapping[str, Sequence[RoutedRequest]],
        check: Sequence[str],
        now: float,
    ) -> list[Move]:
        """Moves of queued requests off overloaded instances among ``check``. Pure."""
        return []

    # Prefix migration (only policies with a planner override these) -------------------------
    def disable_migration(self) -> None:
        """Nothing will execute migration plans (a live scheduler without a backend): plan
        none and hold no request for a copy from now on."""
        self.migration = None

    def migration_for(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> MigrationPlan | None:
        """A prefix copy to ``instance`` that placing ``req`` there calls for. Pure."""
        return None

    def expected_hit_tokens(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> int:
        """Prompt tokens ``instance`` is expected to serve from cache (cached, or on their way
        if waiting for them is faster than recomputing)."""
        return view.request_hit_tokens(req, instance)

    def hold_until(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> float | None:
        """Keep ``req`` queued until this time (a prefix copy it should wait for), or None."""
        return None

    # Helpers shared by policies -------------------------------------------------------------
    def estimated_ttft(self, st: InstanceState, uncached_tokens: int) -> float:
        """DualMap's estimator: per-token prefill cost x (work queued ahead + own uncached)."""
        return self.ctx.cost.per_token_prefill(st.name) * (st.pending_work_tokens() + uncached_tokens)


class DecodePolicy(ABC):
    """Chooses the decode instance of a request (independent of prefixes)."""

    name: ClassVar[str] = ""

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        """Pick an eligible decode instance."""

    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        """Learn from a decision the router has carried out."""


P = TypeVar("P", bound=type)


class PolicyRegistry:
    """Policies by name. One registry per kind; filled by the ``register`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._by_name: dict[str, type] = {}

    def register(self, cls: P) -> P:
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__name__} has no name")
        if name in self._by_name and self._by_name[name] is not cls:
            raise ValueError(f"{self.kind} policy {name!r} registered twice")
        self._by_name[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> type:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} policy {name!r}; known: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, ctx: PolicyContext, **options: object):
        return self.get(name)(ctx, **options)


PREFILL_POLICIES = PolicyRegistry("prefill")
DECODE_POLICIES = PolicyRegistry("decode")


def eligible_or_raise(view: ClusterView, role: Role) -> list[InstanceState]:
    from dualmap_pd.request import NoInstanceError

    eligible = view.eligible(role)
    if not eligible:
        raise NoInstanceError(f"no healthy {role.value} instance")
    return eligible


def argmin(items: Sequence[InstanceState], key: Callable[[InstanceState], object]) -> InstanceState:
    """The item with the smallest key; ties go to the earliest (callers pass a stable order)."""
    best = items[0]
    best_key = key(best)
    for it in items[1:]:
        k = key(it)
        if k < best_key:  # type: ignore[operator]
            best, best_key = it, k
    return best
