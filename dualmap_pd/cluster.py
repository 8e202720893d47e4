"""The scheduler's view of the cluster: per-instance caches, queues and engine load.

The same view is fed by KV events and engine metrics in the live scheduler and by the simulated
engines in the simulator. Policies read it; only the router and the intake code write it.
"""

from __future__ import annotations

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
        self._holders: dict[int, set[str]] = {}
        self.membership_version = 0
        # Bumped on every change to any instance's cached blocks (memo key for hit_blocks_all).
        self.cache_version = 0

    # -- membership -------------------------------------------------------------------------
    def add_instance(self, name: str, role: Role | str) -> InstanceState:
        if name in self._instances:
            raise ValueError(f"instance {name!r} already exists")
        st = InstanceState(name=name, role=Role(role))
        self._instances[name] = st
        self.membership_version += 1
        return st

    def remove_instance(self, name: str) -> InstanceState:
        st = self._instances.pop(name)
        self._drop_blocks(name, st.cached_blocks)
        st.cached_blocks = set()
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
        holders = self._holders
        for h in hashes:
            if h not in st.cached_blocks:
                st.cached_blocks.add(h)
                holders.setdefault(h, set()).add(name)

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
        holders = self._holders
        for h in hashes:
            s = holders.get(h)
            if s is not None:
                s.discard(name)
                if not s:
                    del holders[h]

    def hit_blocks(self, name: str, block_hashes: Sequence[int]) -> int:
        """Leading blocks of the prompt cached on ``name`` (chained hashes: stop at the first miss)."""
        cached = self._instances[name].cached_blocks
        n = 0
        for h in block_hashes:
            if h not in cached:
                break
            n += 1
        return n

    def hit_tokens(self, name: str, block_hashes: Sequence[int]) -> int:
        return self.hit_blocks(name, block_hashes) * self.block_size

    def request_hit_blocks(self, req: RoutedRequest, name: str) -> int:
        """``hit_blocks`` for a request, memoised on the request until ``name``'s cache
        changes: one decision asks for the same count several times (select, queue order,
        dispatch), and a long prompt costs one set lookup per block."""
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
        costs O(prompt blocks x holders) however large the cluster is.
        """
        result: dict[str, int] = {}
        if not block_hashes:
            return result
        get = self._holders.get
        alive = set(get(block_hashes[0], ()))
        depth = 0
        for h in block_hashes:
            holders = get(h)
            if holders is None:
                break
            # Most blocks are held by everyone still alive: a subset test allocates nothing.
            if not alive <= holders:
                still = alive & holders
                for gone in alive - still:
                    result[gone] = depth
                alive = still
                if not alive:
                    break
            depth += 1
        for name in alive:
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

    def holders(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._holders.get(block_hash, ()))
