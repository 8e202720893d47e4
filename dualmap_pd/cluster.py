"""The scheduler's view of the cluster: per-instance caches, queues and engine load.

The same view is fed by KV events and engine metrics in the live scheduler and by the simulated
engines in the simulator. Policies read it; only the router and the intake code write it.
"""

from __future__ import annotations

import heapq
from itertools import takewhile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dualmap_pd.request import RoutedRequest


# Parent of a block added without its chain (never a block hash: those are unsigned).
UNKNOWN_PARENT = -1


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(eq=False)
class InstanceState:
    """Everything the router tracks for one engine instance."""

    name: str
    role: Role
    healthy: bool = True
    draining: bool = False
    # Exact (KV events) or estimated (routing history) set of cached block hashes.
    cached_blocks: set[int] = field(default_factory=set)
    # Bumped whenever cached_blocks changes, so a request's memoised hit count can be reused
    # until the cache it was measured against changes.
    cache_epoch: int = 0
    # Chain structure of cached_blocks. While every cached block's parent is cached too
    # (gap_blocks == 0, the normal state: engines evict a chain's tail before its head), a
    # prompt's cached blocks are exactly a leading run and matching it is a binary search.
    block_parent: dict[int, int | None] = field(default_factory=dict)  # None: a chain's first
    cached_children: dict[int, int] = field(default_factory=dict)  # block -> its cached children
    gap_blocks: int = 0  # cached blocks whose parent is not cached (or was never told)
    # Scheduler-side queue (late dispatch): request ids in the order the policy wants them sent.
    queue: list[str] = field(default_factory=list)
    queued_uncached_tokens: int = 0
    # Dispatched to the engine, prefill not finished.
    engine_pending_requests: int = 0
    engine_pending_tokens: int = 0
    # Requests the engine is running (decoding, or in a colocated engine both phases).
    running_requests: int = 0
    active_tokens: int = 0  # context tokens of running requests (decode load)
    kv_usage: float = 0.0  # 0..1, from engine metrics
    # Load counters used by some baselines (e.g. Preble's window, SGLang's in-flight count).
    inflight_requests: int = 0

    @property
    def eligible(self) -> bool:
        """May receive new work."""
        return self.healthy and not self.draining

    def pending_work_tokens(self) -> int:
        """Uncached tokens waiting before a new request: scheduler queue + engine backlog."""
        return self.queued_uncached_tokens + self.engine_pending_tokens


class ClusterView:
    """All instances of both pools, plus a global block -> holders index for fast matching."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self._instances: dict[str, InstanceState] = {}
        # Global index: block hash -> bitmask of the instances holding it. A walk keeps the
        # holders of every block so far as one int, so intersecting them costs one AND per block
        # however many instances hold a hot prefix (a set intersection costs one probe per holder).
        self._holder_bits: dict[int, int] = {}
        self._bit_of: dict[str, int] = {}  # instance -> its bit (a power of two)
        self._name_of_bit: dict[int, str] = {}
        self._free_bits: list[int] = []  # bits of removed instances, reused lowest first
        self.membership_version = 0
        self._gappy_bits = 0  # instances whose cache has gaps (gap_blocks > 0)
        self._unusable_bits: tuple[int, Role, int] | None = None  # memo: (version, role, bits)

    # -- membership -------------------------------------------------------------------------
    def add_instance(self, name: str, role: Role | str) -> InstanceState:
        if name in self._instances:
            raise ValueError(f"instance {name!r} already exists")
        st = InstanceState(name=name, role=Role(role))
        self._instances[name] = st
        bit = heapq.heappop(self._free_bits) if self._free_bits else 1 << len(self._bit_of)
        self._bit_of[name] = bit
        self._name_of_bit[bit] = name
        self.membership_version += 1
        return st

    def remove_instance(self, name: str) -> InstanceState:
        st = self._instances[name]
        self._drop_blocks(name, st.cached_blocks)
        del self._instances[name]
        st.cached_blocks = set()
        st.block_parent, st.cached_children, st.gap_blocks = {}, {}, 0
        bit = self._bit_of.pop(name)
        self._gappy_bits &= ~bit
        del self._name_of_bit[bit]
        heapq.heappush(self._free_bits, bit)
        self.membership_version += 1
        return st

    def set_health(self, name: str, healthy: bool) -> None:
        st = self._instances[name]
        if st.healthy != healthy:
            st.healthy = healthy
            self.membership_version += 1

    def set_draining(self, name: str, draining: bool) -> None:
        st = self._instances[name]
        if st.draining != draining:
            st.draining = draining
            self.membership_version += 1

    def __contains__(self, name: object) -> bool:
        return name in self._instances

    def __getitem__(self, name: str) -> InstanceState:
        return self._instances[name]

    def get(self, name: str) -> InstanceState | None:
        return self._instances.get(name)

    def instances(self, role: Role | str | None = None) -> Iterator[InstanceState]:
        r = Role(role) if role is not None else None
        return (s for s in self._instances.values() if r is None or s.role is r)

    def names(self, role: Role | str | None = None) -> list[str]:
        return [s.name for s in self.instances(role)]

    def eligible(self, role: Role | str) -> list[InstanceState]:
        return [s for s in self.instances(role) if s.eligible]

    def ineligible_names(self, role: Role | str) -> set[str]:
        return {s.name for s in self.instances(role) if not s.eligible}

    # -- cache index ------------------------------------------------------------------------
    def add_blocks(self, name: str, hashes: Sequence[int], parents: Sequence[int | None] | None = None) -> None:
        """``name`` now caches ``hashes``. ``parents[i]`` is the block before ``hashes[i]`` in
        its chain (None for a prompt's first block); without it the chain is unknown and that
        instance's prefix matches walk block by block until these blocks leave again."""
        st = self._instances[name]
        st.cache_epoch += 1
        index, bit, cached = self._holder_bits, self._bit_of[name], st.cached_blocks
        parent_of, children = st.block_parent, st.cached_children
        gaps = st.gap_blocks
        for i, h in enumerate(hashes):
            if h in cached:
                continue
            cached.add(h)
            index[h] = index.get(h, 0) | bit
            p = parents[i] if parents is not None else UNKNOWN_PARENT
            parent_of[h] = p
            if p is not None:
                if p == UNKNOWN_PARENT or p not in cached:
                    gaps += 1
                if p != UNKNOWN_PARENT:
                    children[p] = children.get(p, 0) + 1
            gaps -= children.get(h, 0)  # its cached children have their parent back
        self._set_gaps(st, gaps)

    def remove_blocks(self, name: str, hashes: Iterable[int]) -> None:
        st = self._instances[name]
        st.cache_epoch += 1
        cached, parent_of, children = st.cached_blocks, st.block_parent, st.cached_children
        gaps = st.gap_blocks
        removed = []
        for h in hashes:
            if h not in cached:
                continue
            cached.discard(h)
            removed.append(h)
            p = parent_of.pop(h)
            if p is not None:
                if p == UNKNOWN_PARENT or p not in cached:
                    gaps -= 1
                if p != UNKNOWN_PARENT:
                    left = children[p] - 1
                    if left:
                        children[p] = left
                    else:
                        del children[p]
            gaps += children.get(h, 0)  # its cached children lost their parent
        self._set_gaps(st, gaps)
        self._drop_blocks(name, removed)

    def clear_blocks(self, name: str) -> None:
        st = self._instances[name]
        st.cache_epoch += 1
        self._drop_blocks(name, st.cached_blocks)
        st.cached_blocks = set()
        st.block_parent, st.cached_children = {}, {}
        self._set_gaps(st, 0)

    def _set_gaps(self, st: InstanceState, gaps: int) -> None:
        st.gap_blocks = gaps
        bit = self._bit_of[st.name]
        self._gappy_bits = self._gappy_bits | bit if gaps else self._gappy_bits & ~bit

    def _drop_blocks(self, name: str, hashes: Iterable[int]) -> None:
        index, keep = self._holder_bits, ~self._bit_of[name]
        for h in hashes:
            left = index.get(h, 0) & keep
            if left:
                index[h] = left
            else:
                index.pop(h, None)

    def _names(self, bits: int) -> Iterator[str]:
        name_of = self._name_of_bit
        while bits:
            low = bits & -bits
            yield name_of[low]
            bits ^= low

    def hit_blocks(self, name: str, block_hashes: Sequence[int]) -> int:
        """Leading blocks of the prompt cached on ``name`` (chained hashes: stop at the first miss)."""
        st = self._instances[name]
        cached = st.cached_blocks
        if st.gap_blocks == 0:
            # No gaps: a cached block's whole chain is cached, so "block i is cached" holds for
            # a leading run of i and the run's end is found in log2(prompt blocks) probes.
            lo, hi = 0, len(block_hashes)
            while lo < hi:
                mid = (lo + hi) // 2
                if block_hashes[mid] in cached:
                    lo = mid + 1
                else:
                    hi = mid
            return lo
        # takewhile runs the membership tests in C: a third faster than a Python loop.
        return len(list(takewhile(cached.__contains__, block_hashes)))

    def hit_tokens(self, name: str, block_hashes: Sequence[int]) -> int:
        return self.hit_blocks(name, block_hashes) * self.block_size

    def request_hit_blocks(self, req: RoutedRequest, name: str) -> int:
        """``hit_blocks`` for a request, memoised on the request until ``name``'s cache
        changes: one decision asks for the same count several times (select, queue order,
        dispatch)."""
        epoch = self._instances[name].cache_epoch
        memo = req.hit_memo.get(name)
        if memo is not None and memo[0] == epoch:
            return memo[1]
        hits = self.hit_blocks(name, req.block_hashes)
        req.hit_memo[name] = (epoch, hits)
        return hits

    def request_hit_tokens(self, req: RoutedRequest, name: str) -> int:
        return self.request_hit_blocks(req, name) * self.block_size

    def hit_blocks_all(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Leading cached blocks on every instance holding at least the first block.

        Walks the prompt once through the global index instead of once per instance, so it
        costs O(prompt blocks) however large the cluster is.
        """
        result: dict[str, int] = {}
        get = self._holder_bits.get
        alive = get(block_hashes[0], 0) if block_hashes else 0  # holders of every block so far
        if not alive:
            return result
        depth = 0
        for h in block_hashes:
            held_by = get(h, 0)
            # Most blocks are held by exactly the holders so far: an int compare, no new int.
            if held_by != alive:
                still = alive & held_by
                if still != alive:
                    for gone in self._names(alive & ~still):
                        result[gone] = depth
                    alive = still
                    if not alive:
                        break
            depth += 1
        for name in self._names(alive):
            result[name] = depth
        return result

    def longest_run(self, block_hashes: Sequence[int], exclude: Iterable[str] = (), role: Role = Role.PREFILL) -> tuple[int, list[str]]:
        """The longest leading run of the prompt that a healthy ``role`` instance outside
        ``exclude`` caches in full, and every such instance caching it ((0, []) if none).

        Gap-free instances are searched together in O(log prompt blocks): for them "holds
        block i" implies "holds blocks 0..i", so "some of them holds block i" is true for a
        leading run of i. Instances with gaps are walked one by one.
        """
        skip = self._unusable(role)
        for name in exclude:
            skip |= self._bit_of.get(name, 0)
        gappy = self._gappy_bits & ~skip
        usable = ~(skip | gappy)
        get = self._holder_bits.get
        lo, hi = 0, len(block_hashes)
        while lo < hi:
            mid = (lo + hi) // 2
            if get(block_hashes[mid], 0) & usable:
                lo = mid + 1
            else:
                hi = mid
        best = lo
        names = list(self._names(get(block_hashes[lo - 1], 0) & usable)) if lo else []
        for name in self._names(gappy):
            n = self.hit_blocks(name, block_hashes)
            if n > best:
                best, names = n, [name]
            elif n == best and n:
                names.append(name)
        return best, names

    def _unusable(self, role: Role) -> int:
        """Bits of instances that are unhealthy or of another role (memoised per membership)."""
        memo = self._unusable_bits
        if memo is None or memo[0] != self.membership_version or memo[1] is not role:
            bits = 0
            for st in self._instances.values():
                if st.role is not role or not st.healthy:
                    bits |= self._bit_of[st.name]
            memo = self._unusable_bits = (self.membership_version, role, bits)
        return memo[2]

    def holders(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._names(self._holder_bits.get(block_hash, 0)))
