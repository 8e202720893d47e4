"""How many recently seen prefixes changed their candidate pair when the prefill pool changed.

DualMap's rings promise that a join or leave of one instance out of n re-maps about 1/n of the
prefixes; everything else keeps its two candidates and therefore its cached KV. This tracker
checks the promise on the live traffic: it remembers a bounded set of recent routing keys and,
at every membership change, compares each key's candidate pair before and after.

It keeps its own ``DualRing``. Rings are deterministic (same members, salts and vnodes give the
same ring in any process), so this mirror picks exactly the candidates the DualMap policy picks,
and it works the same when a baseline policy without rings is serving.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from dualmap_pd.ring import DualRing


@dataclass(frozen=True, slots=True)
class ChurnReport:
    """One membership change, measured over the recent keys."""

    checked: int  # recent keys compared
    changed: int  # keys whose (unordered) candidate pair differs

    @property
    def fraction(self) -> float:
        return self.changed / self.checked if self.checked else 0.0


class RecentKeys:
    """The last ``capacity`` distinct routing keys, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._keys: OrderedDict[int, None] = OrderedDict()

    def record(self, key: int) -> None:
        keys = self._keys
        if key in keys:
            keys.move_to_end(key)
            return
        keys[key] = None
        if len(keys) > self.capacity:
            keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._keys))


class CandidateChurnTracker:
    """Mirrors the prefill rings and measures candidate changes over recent keys.

    ``sync`` moves the mirror to a new (members, excluded) state and reports the change. Call it
    once before applying a change (to absorb health changes that happened since the last sync,
    so they are not blamed on this change) and once after.
    """

    def __init__(self, capacity: int = 4096, vnodes: int = 160) -> None:
        self.recent = RecentKeys(capacity)
        self._rings = DualRing(vnodes=vnodes)
        self._excluded: frozenset[str] = frozenset()

    def record(self, key: int) -> None:
        self.recent.record(key)

    def _pairs(self, keys: list[int]) -> list[frozenset[str]]:
        return [frozenset(self._rings.candidates(k, self._excluded)) for k in keys]

    def sync(self, members: Iterable[str], excluded: Iterable[str] = ()) -> ChurnReport:
        members = sorted(members)
        excluded_set = frozenset(excluded)
        if set(members) == self._rings.members and excluded_set == self._excluded:
            return ChurnReport(len(self.recent), 0)
        keys = list(self.recent)
        before = self._pairs(keys)
        self._rings.sync(members)
        self._excluded = excluded_set
        after = self._pairs(keys)
        return ChurnReport(len(keys), sum(1 for b, a in zip(before, after) if b != a))
