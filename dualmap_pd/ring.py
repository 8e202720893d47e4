"""Consistent-hash rings with virtual nodes, and the pair of independent rings DualMap uses.

Each instance owns ``vnodes`` points on a ring; a key belongs to the first point clockwise from
its hash. Adding or removing an instance only moves the keys on the arcs next to its own points
(about 1/n of keys), so every other instance keeps its cached prefixes.

Two rings built with different salts are independent: a key's owners on ring A and ring B are
(nearly) independent draws, which is what gives DualMap "the power of two choices".
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection, Iterable

from dualmap_pd.hashing import stable_hash

_MASK64 = (1 << 64) - 1


class ConsistentHashRing:
    """One ring. Lookups are O(log(n * vnodes)); membership changes rebuild the point list."""

    def __init__(self, salt: str, vnodes: int = 160, members: Iterable[str] = ()) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.salt = salt
        self.vnodes = vnodes
        self._members: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []
        self._point_cache: dict[str, list[int]] = {}
        self.add_many(members)

    def _member_points(self, member: str) -> list[int]:
        # Cached: every rebuild needs every member's points, and hashing them anew made
        # building a 1,024-instance ring take minutes.
        points = self._point_cache.get(member)
        if points is None:
            points = [stable_hash(f"{self.salt}|{member}|{i}") for i in range(self.vnodes)]
            self._point_cache[member] = points
        return points

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def add(self, member: str) -> None:
        self.add_many((member,))

    def remove(self, member: str) -> None:
        self.remove_many((member,))

    def add_many(self, members: Iterable[str]) -> None:
        """Add several members with one rebuild (same ring as adding them one by one)."""
        new = [m for m in members if m not in self._members]
        if new:
            self._members.update(new)
            self._rebuild()

    def remove_many(self, members: Iterable[str]) -> None:
        gone = [m for m in members if m in self._members]
        if gone:
            self._members.difference_update(gone)
            for m in gone:
                self._point_cache.pop(m, None)
            self._rebuild()

    def _rebuild(self) -> None:
        # Ties between two members' points (astronomically rare with 64-bit hashes) are broken by
        # name so that every process builds the identical ring.
        pairs = sorted((p, m) for m in self._members for p in self._member_points(m))
        self._points = [p for p, _ in pairs]
        self._owners = [m for _, m in pairs]

    def lookup(self, key: int, exclude: Collection[str] = ()) -> str | None:
        """Owner of ``key``: the first member clockwise not in ``exclude`` (None if none is left)."""
        if not self._points:
            return None
        n = len(self._points)
        start = bisect_right(self._points, key & _MASK64)
        if not exclude:
            return self._owners[start % n]
        if len(exclude) >= len(self._members) and self._members <= set(exclude):
            return None
        for step in range(n):
            owner = self._owners[(start + step) % n]
            if owner not in exclude:
                return owner
        return None


class DualRing:
    """Two independent rings: every key gets two distinct candidate instances when n >= 2.

    The second candidate is ring B's owner, or, if ring B picks the same instance as ring A, the
    next distinct instance clockwise on ring B (as in the authors' code).
    """

    def __init__(self, members: Iterable[str] = (), vnodes: int = 160) -> None:
        members = list(members)
        self.ring_a = ConsistentHashRing("dualmap-ring-a", vnodes, members)
        self.ring_b = ConsistentHashRing("dualmap-ring-b", vnodes, members)

    @property
    def members(self) -> frozenset[str]:
        return self.ring_a.members

    def add(self, member: str) -> None:
        self.ring_a.add(member)
        self.ring_b.add(member)

    def remove(self, member: str) -> None:
        self.ring_a.remove(member)
        self.ring_b.remove(member)

    def sync(self, members: Iterable[str]) -> tuple[set[str], set[str]]:
        """Make the membership equal to ``members``; returns (added, removed)."""
        wanted = set(members)
        current = set(self.members)
        for ring in (self.ring_a, self.ring_b):
            ring.add_many(sorted(wanted - current))
            ring.remove_many(sorted(current - wanted))
        return wanted - current, current - wanted

    def candidates(self, key: int, exclude: Collection[str] = ()) -> tuple[str, ...]:
        """The key's (primary, secondary) candidates.

        Excluded instances (unhealthy, draining) drop out and their place goes to the key's other
        candidate, so a request falls to its backup first; the gap is then filled by the next
        eligible instance clockwise on ring B. One candidate when only one instance is eligible,
        none when none is.
        """
        first = self.ring_a.lookup(key)
        if first is None:
            return ()
        second = self.ring_b.lookup(key, (first,)) or first
        if not exclude:
            return (first,) if second == first else (first, second)
        chosen = [c for c in dict.fromkeys((first, second)) if c not in exclude]
        if len(chosen) < 2:
            filler = self.ring_b.lookup(key, set(exclude) | set(chosen))
            if filler is not None:
                chosen.append(filler)
        return tuple(chosen)
