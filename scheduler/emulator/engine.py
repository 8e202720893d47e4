"""The timing model of one emulated engine: vLLM-style continuous batching, priced by a profile.

``EngineCore`` keeps vLLM's scheduler shape without computing anything: requests wait FCFS,
are admitted while KV capacity (``kv_capacity_tokens``) and ``max_num_seqs`` allow, and every
step runs each decoding request (one token) plus prefill chunks up to the profile's
``max_batch_tokens`` (chunked prefill; decode tokens count against the budget, as in vLLM). A
step lasts ``cost.prefill_time(chunk tokens, cached tokens loaded) + cost.decode_step_time(batch,
context)``, the same pricing as the simulator's engine (dualmap_pd/sim/engine.py), so the
emulator and the simulator agree by construction on an idle-enough cluster and differ only by
what the service around them adds. The step loop *sleeps* for that long on an injectable
``Clock``: 64 engines fit on two cores, and tests run on a fast clock.

The prefix cache is the simulator's LRU ``PrefixCache`` over chained xxh3 block hashes (the
hashes double as the engine hashes in KV events). A request's hit is fixed when it is admitted:
its leading cached full blocks, capped so one token is always computed (as vLLM does). When
its prefill ends the prompt's full blocks are stored and ``on_blocks`` hears what was stored
and evicted (the HTTP layer turns that into BlockStored/BlockRemoved). A request that arrives
with its KV from elsewhere (``pulled_tokens``, the decode leg of P/D) skips prefill: it waits
out the transfer at the profile's link speed and joins the decode batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dualmap_pd.cost import CostModel
from dualmap_pd.hashing import block_hashes
from dualmap_pd.sim.prefix_cache import PrefixCache

DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default concurrent-sequence limit


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class ScaledClock:
    """Wall time divided by ``speed``: ``speed=100`` makes a modelled second last 10 ms."""

    speed: float = 1.0

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError(f"clock speed must be positive, got {self.speed}")

    def now(self) -> float:
        return time.monotonic() * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)


def prompt_blocks(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of ``tokens`` (what the cache stores and matches)."""
    return block_hashes(tokens, block_size)


def cached_prefix_tokens(n_prompt: int, hit_blocks: int, block_size: int) -> int:
    """Tokens served from cache: whole blocks, never the whole prompt (one token is computed)."""
    return min(hit_blocks * block_size, (n_prompt - 1) // block_size * block_size) if n_prompt else 0


@dataclass(eq=False)
class EngineRequest:
    """One request inside the engine. ``tokens`` yields once per generated token."""

    prompt: Sequence[int]
    max_tokens: int
    pulled_tokens: int = 0  # > 0: KV of this many prompt tokens arrives over the link (P/D decode)
    hashes: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    remaining_prefill: int = 0
    generated: int = 0
    pull_seconds: float = 0.0
    loaded: bool = False  # its cache hit has been priced (on its first prefill chunk)
    tokens: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    @property
    def n_prompt(self) -> int:
        return len(self.prompt)

    def kv_tokens(self) -> int:
        return self.n_prompt + self.generated


# (prompt, its block hashes, newly stored hashes, evicted hashes)
BlocksListener = Callable[[Sequence[int], Sequence[int], list[int], list[int]], None]


@dataclass
class EngineCounters:
    """Cumulative counters the engine exports on /metrics (tests may move them by hand)."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    nixl_transfers: int = 0
    nixl_bytes: int = 0
    nixl_xfer_seconds: float = 0.0
    nixl_failed: int = 0
    requests_finished: int = 0  # generated max_tokens (vLLM's finished_reason "length")

    def record_pull(self, nbytes: int, seconds: float) -> None:
        self.nixl_transfers += 1
        self.nixl_bytes += nbytes
        self.nixl_xfer_seconds += seconds


class EngineCore:
    """Continuous batching with chunked prefill, on a profile's cost model (see module doc)."""

    def __init__(self, cost: CostModel, *, clock: Clock | None = None,
                 cache_blocks: int | None = None, kv_capacity_tokens: int | None = None,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, block_size: int | None = None,
                 on_blocks: BlocksListener | None = None) -> None:  # fmt: skip
        profile = cost.profile
        self.cost = cost
        self.clock: Clock = clock or ScaledClock()
        self.block_size = block_size or profile.block_size
        blocks = profile.prefix_cache_blocks if cache_blocks is None else cache_blocks
        self.cache = PrefixCache(blocks)
        self.kv_capacity_tokens = kv_capacity_tokens or blocks * self.block_size
        self.max_num_seqs = max_num_seqs
        self.on_blocks = on_blocks
        self.counters = EngineCounters()
        self.waiting: deque[EngineRequest] = deque()
        self.prefilling: list[EngineRequest] = []
        self.decoding: list[EngineRequest] = []
        self.pulling = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- state the metrics read -----------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + self.pulling

    def kv_tokens_held(self) -> int:
        return sum(r.kv_tokens() for r in self.prefilling) + sum(r.kv_tokens() for r in self.decoding)

    def kv_usage(self) -> float:
        return min(1.0, self.kv_tokens_held() / self.kv_capacity_tokens)

    # -- requests -------------------------------------------------------------------------------
    def lookup(self, prompt: Sequence[int]) -> tuple[list[int], int]:
        """(block hashes, cached tokens) of a prompt, counted as a prefix-cache query."""
        hashes = prompt_blocks(prompt, self.block_size)
        cached = cached_prefix_tokens(len(prompt), self.cache.match(hashes), self.block_size)
        self.counters.prefix_cache_queries += len(prompt)
        self.counters.prefix_cache_hits += cached
        return hashes, cached

    async def submit(self, req: EngineRequest) -> EngineRequest:
        """Queue ``req``; its tokens then arrive on ``req.tokens``. A pulled request first
        waits out its KV transfer (outside the batch, as NIXL reads run beside the model)."""
        if req.pulled_tokens > 0:
            self.pulling += 1
            try:
                nbytes = self.cost.kv_bytes(req.pulled_tokens)
                req.pull_seconds = self.cost.transfer_time(nbytes)
                await self.clock.sleep(req.pull_seconds)
                self.counters.record_pull(nbytes, req.pull_seconds)
            finally:
                self.pulling -= 1
        if req.cancelled:
            return req
        self.waiting.append(req)
        self._ensure_running()
        self._wake.set()
        return req

    def cancel(self, req: EngineRequest) -> None:
        """The client went away: drop the request wherever it is (its KV is freed)."""
        req.cancelled = True
        for queue in (self.prefilling, self.decoding):
            if req in queue:
                queue.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="emulated-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # -- the step loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not (self.waiting or self.prefilling or self.decoding):
                self._wake.clear()
                await self._wake.wait()
                continue
            chunks, duration = self.plan_step()
            await self.clock.sleep(duration)
            self.finish_step(chunks)

    def _admit(self) -> None:
        """Move waiting requests into the batch while sequences and KV capacity allow."""
        held = self.kv_tokens_held()
        while self.waiting and self.num_running < self.max_num_seqs:
            req = self.waiting[0]
            need = req.n_prompt + req.max_tokens
            if held + need > self.kv_capacity_tokens and self.num_running:
                return  # vLLM waits for blocks to free (a lone request is always admitted)
            self.waiting.popleft()
            held += need
            if req.pulled_tokens > 0:
                self.decoding.append(req)  # its KV arrived: the first step emits its first token
                continue
            req.hashes, req.cached_tokens = self.lookup(req.prompt)
            req.remaining_prefill = max(1, req.n_prompt - req.cached_tokens)
            self.prefilling.append(req)

    def plan_step(self) -> tuple[list[tuple[EngineRequest, int]], float]:
        """Admit what fits, pick this step's prefill chunks; returns (chunks, step seconds)."""
        self._admit()
        budget = self.cost.profile.max_batch_tokens - len(self.decoding)
        chunks: list[tuple[EngineRequest, int]] = []
        computed = cached = 0
        for req in self.prefilling:
            if budget <= 0:
                break
            take = min(req.remaining_prefill, budget)
            if not req.loaded:
                cached += req.cached_tokens  # its first chunk loads its cache hit
                req.loaded = True
            chunks.append((req, take))
            computed += take
            budget -= take
        context = sum(r.kv_tokens() for r in self.decoding)
        duration = self.cost.prefill_time(computed, cached) if chunks else 0.0
        duration += self.cost.decode_step_time(len(self.decoding), context)
        return chunks, duration

    def finish_step(self, chunks: list[tuple[EngineRequest, int]]) -> None:
        """Apply a step: decode tokens out, prefill chunks done, finished prompts cached."""
        for req in list(self.decoding):
            req.generated += 1
            self.counters.generation_tokens += 1
            req.tokens.put_nowait(req.generated)
            if req.generated >= req.max_tokens:
                self.decoding.remove(req)
                self.counters.requests_finished += 1
        for req, take in chunks:
            if req.cancelled:
                continue
            req.remaining_prefill -= take
            self.counters.prompt_tokens += take
            if req.remaining_prefill > 0:
                continue
            self.prefilling.remove(req)
            self._store(req)
            req.generated = 1  # the prefill step samples the first token
            self.counters.generation_tokens += 1
            req.tokens.put_nowait(1)
            if req.max_tokens > 1:
                self.decoding.append(req)
            else:
                self.counters.requests_finished += 1

    def _store(self, req: EngineRequest) -> None:
        stored, evicted = self.cache.insert(req.hashes)
        if self.on_blocks is not None and (stored or evicted):
            self.on_blocks(req.prompt, req.hashes, stored, evicted)
