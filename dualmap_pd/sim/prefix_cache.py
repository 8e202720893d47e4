"""An engine's prefix cache: LRU over KV blocks, bounded by the profile's capacity.

Mirrors what vLLM does with cached blocks: a prompt hits the longest run of its leading block
hashes that are cached; blocks are LRU-evicted; a request's blocks are touched tail-first, so
when its prefix ages out the tail goes before the head (vLLM frees blocks in reverse order for
the same reason: the head is what the next request with that prefix can reuse).

Blocks being read by a prefix migration are pinned (``pin``/``unpin``, counted): eviction passes
over them, as vLLM keeps a block whose remote read is pending until the read ends or its lease
expires.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        # Oldest first; values unused.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._pins: dict[int, int] = {}  # block hash -> readers holding it

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._lru

    def holds(self, block_hashes: Sequence[int]) -> bool:
        return all(h in self._lru for h in block_hashes)

    def pin(self, block_hashes: Sequence[int]) -> None:
        pins = self._pins
        for h in block_hashes:
            pins[h] = pins.get(h, 0) + 1

    def unpin(self, block_hashes: Sequence[int]) -> None:
        pins = self._pins
        for h in block_hashes:
            n = pins.get(h, 0) - 1
            if n > 0:
                pins[h] = n
            else:
                pins.pop(h, None)

    @property
    def pinned(self) -> int:
        return len(self._pins)

    def blocks(self) -> list[int]:
        """Cached block hashes, least recently used first."""
        return list(self._lru)

    def match(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks of the prompt that are cached; they are touched (used now)."""
        lru = self._lru
        n = 0
        for h in block_hashes:
            if h not in lru:
                break
            n += 1
        move = lru.move_to_end
        for i in range(n - 1, -1, -1):  # tail first: the head ends most recently used
            move(block_hashes[i])
        return n

    def insert(self, block_hashes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Store a finished prompt's blocks; returns (newly stored, evicted) hashes.

        A prompt longer than the whole cache keeps only its leading blocks (the useful part).
        The prompt's own blocks are the most recent, so eviction never removes them.
        """
        lru = self._lru
        keep = block_hashes[: self.capacity_blocks]
        stored: list[int] = []
        move = lru.move_to_end
        for i in range(len(keep) - 1, -1, -1):
            h = keep[i]
            if h in lru:
                move(h)
            else:
                lru[h] = None
                stored.append(h)
        evicted: list[int] = []
        excess = len(lru) - self.capacity_blocks
        if excess > 0:
            if not self._pins:
                pop = lru.popitem
                evicted = [pop(last=False)[0] for _ in range(excess)]
            else:
                pins = self._pins
                for h in lru:
                    if h not in pins:
                        evicted.append(h)
                        if len(evicted) == excess:
                            break
                for h in evicted:
                    del lru[h]
                stored = [h for h in stored if h in lru]  # pins may have pushed out new blocks
        return stored, evicted
