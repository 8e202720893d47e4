"""Test helpers around the emulator's KV-event publisher (scheduler/emulator/kv_events.py).

The wire code (vLLM's structs, encoder, ZMQ publisher with its replay socket) is the emulator's;
``FakeBlockPool`` is test-only: it emits the events a vLLM block pool would for a stream of
prompts, with seeded engine hashes (int or bytes like ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``),
one BlockStored per request for its newly cached full blocks with the last cached block as parent,
and LRU eviction (tail blocks first, as vLLM frees blocks in reverse) as single-hash BlockRemoved.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dualmap_pd.hashing import hash_block
from scheduler.emulator.kv_events import (  # noqa: F401 - re-exported for the tests
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVCacheEvent,
    KVEventBatch,
    KVEventEncoder,
    wire_structs,
)
from scheduler.emulator.kv_events import KVEventPublisher as FakeKVPublisher  # noqa: F401


@dataclass
class FakeBlockPool:
    """Produces vLLM-like KV events for prompts and knows which blocks the 'engine' holds.

    ``held`` maps engine hash -> our chained hash (dualmap_pd.hashing), the ground truth a
    subscriber's index must equal.
    """

    block_size: int = 128
    capacity_blocks: int | None = None
    int_hashes: bool = True
    seed: bytes = b"fake-engine"
    medium: str = "GPU"
    held: OrderedDict[bytes | int, int] = field(default_factory=OrderedDict)  # LRU order

    def engine_hash(self, parent: bytes | int | None, tokens: Sequence[int]) -> bytes | int:
        p = b"" if parent is None else (parent if isinstance(parent, bytes) else parent.to_bytes(8, "big"))
        digest = hashlib.sha256(self.seed + p + repr(list(tokens)).encode()).digest()
        return int.from_bytes(digest[:8], "big") if self.int_hashes else digest

    def chain(self, tokens: Sequence[int]) -> list[tuple[bytes | int, int]]:
        """(engine hash, our hash) of every full block of ``tokens``."""
        out: list[tuple[bytes | int, int]] = []
        eh: bytes | int | None = None
        oh: int | None = None
        bs = self.block_size
        for i in range(len(tokens) // bs):
            chunk = tokens[i * bs : (i + 1) * bs]
            eh, oh = self.engine_hash(eh, chunk), hash_block(oh, chunk)
            out.append((eh, oh))
        return out

    def run(self, pub: KVEventEncoder, tokens: Sequence[int]) -> list[Any]:
        """Cache ``tokens`` like one request; returns the events (not yet published)."""
        chain = self.chain(tokens)
        k = 0
        while k < len(chain) and chain[k][0] in self.held:
            k += 1
        events: list[Any] = []
        new = chain[k:]
        if self.capacity_blocks is not None:
            keep = {h for h, _ in chain[:k]}
            overflow = len(self.held) + len(new) - self.capacity_blocks
            for h in [h for h in self.held if h not in keep][: max(0, overflow)]:
                del self.held[h]
                events.append(pub.removed([h], medium=self.medium))
        if new:
            bs = self.block_size
            parent = chain[k - 1][0] if k else None
            events.append(pub.stored([h for h, _ in new], parent, tokens[k * bs : len(chain) * bs],
                                     bs, medium=self.medium))
        for h, o in reversed(chain):  # vLLM frees tail first: the tail is evicted first
            self.held[h] = o
            self.held.move_to_end(h)
        return events

    def evict(self, pub: KVEventEncoder, n: int) -> list[Any]:
        victims = list(self.held)[:n]
        for h in victims:
            del self.held[h]
        return [pub.removed([h], medium=self.medium) for h in victims]

    def clear(self, pub: KVEventEncoder) -> list[Any]:
        self.held.clear()
        return [pub.cleared()]

    def expected(self) -> set[int]:
        return set(self.held.values())
