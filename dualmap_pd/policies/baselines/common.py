"""Helpers shared by the baseline policies: membership caches, per-request RNGs, KV-transfer hints.

Nothing here holds state across runs; every cache is owned by one policy object.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from dualmap_pd.cluster import ClusterView, InstanceState, Role
from dualmap_pd.request import Decision

# A decision that wants the chosen instance to receive a prefix's KV cache from another instance
# before it prefills (Mooncake's cache-load-balancing branch) says so in ``Decision.scores``
# under the key ``TRANSFER_FROM + source`` with the number of prompt tokens to move as the value.
# ``scores`` is a plain str -> float mapping, so the source instance travels in the key.
TRANSFER_FROM = "kv_transfer_from:"


def transfer_of(decision: Decision) -> tuple[str, int] | None:
    """(source instance, tokens) of the KV transfer a decision asks for, or None."""
    for key, value in decision.scores.items():
        if key.startswith(TRANSFER_FROM):
            return key[len(TRANSFER_FROM):], int(value)
    return None


def request_rng(seed: int, salt: str, request_id: str) -> random.Random:
    """An RNG private to one request: ``select`` stays pure (no shared generator advances) and
    the same request in the same run always draws the same numbers."""
    return random.Random(f"{seed}:{salt}:{request_id}")


class PrefillCache:
    """The prefill instances (state objects, names, positions) and the eligible ones, in view
    order, cached per membership version.

    Any join, leave, health or draining change made through the view (``add_instance``,
    ``remove_instance``, ``set_health``, ``set_draining``: the only writers in this project) bumps
    ``view.membership_version``, so the cached eligible list is exact while the version matches.
    It saves a scan of every instance of both pools per decision (at 1,024 instances that scan
    dominates a decision). ``get`` never mutates, so ``select`` can use it: a stale cache is
    bypassed, not refreshed; ``refresh`` is called from ``on_membership_change`` (the router calls
    it before any decision after a change).
    """

    def __init__(self) -> None:
        self.version = -1
        self.snap = _Snapshot([], [])

    def get(self, view: ClusterView) -> _Snapshot:
        if self.version == view.membership_version:
            return self.snap
        return _Snapshot.of(view)

    def refresh(self, view: ClusterView) -> None:
        self.snap = _Snapshot.of(view)
        self.version = view.membership_version


class _Snapshot:
    __slots__ = ("states", "eligible", "names", "index", "eligible_names", "eligible_set")

    def __init__(self, states: list[InstanceState], eligible: list[InstanceState]) -> None:
        self.states = states
        self.eligible = eligible
        self.names = [st.name for st in states]
        self.index: Mapping[str, int] = {n: i for i, n in enumerate(self.names)}
        self.eligible_names = [st.name for st in eligible]
        self.eligible_set = frozenset(self.eligible_names)

    @classmethod
    def of(cls, view: ClusterView) -> _Snapshot:
        states = list(view.instances(Role.PREFILL))
        return cls(states, [st for st in states if st.eligible])
