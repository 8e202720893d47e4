"""The scheduler's view of the cluster: per-instance caches, queues and engine load.

The same view is fed by KV events and engine metrics in the live scheduler and by the simulated
engines in the simulator. Policies read it; only the router and the intake code write it.
"""

from __future__ import annotations

import heapq
from itertools import takewhile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dualmap_pd.request import RoutedRequest


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
        # Bumped on every change to any instance's cached blocks (memo key for hit_blocks_all).
        self.cache_version = 0

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
        bit = self._bit_of.pop(name)
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
    def add_blocks(self, name: str, hashes: Iterable[int]) -> None:
        st = self._instances[name]
        st.cache_epoch += 1
        self.cache_version += 1
        index, bit, cached = self._holder_bits, self._bit_of[name], st.cached_blocks
        for h in hashes:
            if h not in cached:
                cached.add(h)
                index[h] = index.get(h, 0) | bit

    def remove_blocks(self, name: str, hashes: Iterable[int]) -> None:
        st = self._instances[name]
        st.cache_epoch += 1
        self.cache_version += 1
        removed = [h for h in hashes if h in st.cached_blocks]
        st.cached_blocks.difference_update(removed)
        self._drop_blocks(name, removed)

    def clear_blocks(self, name: str) -> None:
        st = self._instances[name]
        st.cache_epoch += 1
        self.cache_version += 1
        self._drop_blocks(name, st.cached_blocks)
        st.cached_blocks = set()

    def _drop_blocks(self, name: str, hashes: Iterable[int]) -> None:
        self.cache_version += 1
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
        # takewhile runs the membership tests in C: a third faster than a Python loop.
        return len(list(takewhile(self._instances[name].cached_blocks.__contains__, block_hashes)))

    def hit_tokens(self, name: str, block_hashes: Sequence[int]) -> int:
        return self.hit_blocks(name, block_hashes) * self.block_size

    def request_hit_blocks(self, req: RoutedRequest, name: str) -> int:
        """``hit_blocks`` for a request, memoised on the request until ``name``'s cache
        changes: one decision asks for the same count several times (select, queue order,
        dispatch), and a long prompt costs one set lookup per block. A still-valid
        ``request_hit_blocks_all`` answer already holds every instance's count."""
        every = req.hit_all_memo
        if every is not None and every[0] == self.cache_version:
            return every[1].get(name, 0)
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

    def request_hit_blocks_all(self, req: RoutedRequest) -> Mapping[str, int]:
        """``hit_blocks_all`` for a request, memoised on it until any cache changes: a
        migration-aware decision prices several targets against the same holders."""
        memo = req.hit_all_memo
        if memo is not None and memo[0] == self.cache_version:
            return memo[1]
        hits = self.hit_blocks_all(req.block_hashes)
        req.hit_all_memo = (self.cache_version, hits)
        return hits

    def is_held(self, block_hash: int) -> bool:
        """Some instance caches this block."""
        return block_hash in self._holder_bits

    def holders(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._names(self._holder_bits.get(block_hash, 0)))
