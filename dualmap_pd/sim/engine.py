"""One simulated engine (vLLM-style continuous batching with chunked prefill).

Each engine step runs every decoding request (one token each) plus prefill chunks, FCFS, up to
the profile's ``max_batch_tokens`` (decode tokens count against the budget, as in vLLM). A step
costs ``cost.prefill_time(chunk tokens, cached tokens loaded) + cost.decode_step_time(batch,
context)``. A request's cache hit is fixed when it first gets a chunk: the longest prefix of its
block hashes in the engine's LRU cache. When its prefill finishes, its blocks are stored (LRU
eviction) and the stored/evicted hashes are reported to the ClusterView, as KV events are live.

Decode-only stretches (no prefill work waiting) are simulated as one *run* of K steps up to the
next decode completion: the step times form an arithmetic series (the batch and its per-step
context growth are fixed until a request finishes or joins), so the run's end is closed-form. If
work arrives mid-run, the run is cut at the end of the step in progress, exactly where a
step-by-step engine would first see the work. ``aggregate_decode=False`` steps one token at a
time (used to test the equivalence).

The engine's load is the requests it holds and their prompt tokens (``running_requests``,
``active_tokens``, ``kv_usage`` of its own ``state``, which no scheduler reads directly), updated
when a request starts or ends, not per generated token (outputs are ~1% of context on the
traces): that keeps every policy decision identical whether decode is aggregated or not. Its KV
events and load changes go to an observer (sim/observation.py), which decides when each
scheduler's view sees them. A prefill step may take longer or shorter than the cost model says
(``noise``: a seeded factor per step); schedulers keep estimating with the model.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from dualmap_pd.cluster import InstanceState
from dualmap_pd.cost import CostModel
from dualmap_pd.sim.prefix_cache import PrefixCache
from dualmap_pd.sim.state import SimRequest


class EngineObserver(Protocol):
    """Where an engine publishes (sim/observation.py's Observer; a ClusterView in tests)."""

    def add_blocks(self, name: str, hashes: list[int], parents: list[int | None]) -> None: ...

    def remove_blocks(self, name: str, hashes: list[int]) -> None: ...

    def load_changed(self, name: str) -> None: ...


class Engine:
    def __init__(
        self,
        state: InstanceState,
        observer: EngineObserver,
        cost: CostModel,
        cache: PrefixCache | None,
        kv_capacity_bytes: float,
        aggregate_decode: bool = True,
        noise: Callable[[], float] | None = None,
    ) -> None:
        self.name = state.name
        self.state = state  # the engine's own load (truth)
        self.observer = observer
        self.noise = noise  # factor on each prefill step's modelled time (None: exact)
        self.cost = cost
        self.cache = cache  # None: decode-only engine (no prefill)
        self.kv_capacity_bytes = kv_capacity_bytes
        self.aggregate_decode = aggregate_decode
        profile = cost.profile
        self._block_size = profile.block_size
        self._max_batch_tokens = profile.max_batch_tokens
        self._kv_bytes_per_token = profile.kv_bytes_per_token
        self._step_base = profile.decode_step_base_s
        self._step_per_ctx = profile.decode_s_per_context_token
        # Cached blocks that a prefix migration brought (not computed here), for hit accounting.
        self.migrated: set[int] = set()
        # Prefill side: dispatched, not started (FCFS) / started, not finished.
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []
        # Decode side: (step index at which it emits its last token, seq, request).
        self._decoding: list[tuple[int, int, SimRequest]] = []
        self._joins: list[SimRequest] = []  # arrived mid-step; join at the step's end
        self._seq = 0
        self.steps_done = 0  # decode steps this engine has run (clock of _decoding)
        self.ctx_sum = 0  # exact context tokens of decoding requests
        # The step or decode run in flight.
        self.busy = False
        self.version = 0  # bumped when a scheduled end is replaced (stale events are dropped)
        self.end_time = 0.0
        self._chunks: list[tuple[SimRequest, int]] = []
        self._run_t0 = 0.0
        self._run_steps = 0
        self._run_n = 0
        self._run_ctx0 = 0
        # Accounting.
        self.prefill_tokens_computed = 0
        self.steps_run = 0
        self.events_run = 0

    # -- load as the view sees it ---------------------------------------------------------------
    def hold(self, req: SimRequest) -> None:
        """The engine now holds ``req`` (prefill started, or a decode slot taken)."""
        st = self.state
        st.running_requests += 1
        st.active_tokens += req.prompt_tokens
        st.kv_usage = min(1.0, st.active_tokens * self._kv_bytes_per_token / self.kv_capacity_bytes)
        self.observer.load_changed(self.name)

    def release(self, req: SimRequest) -> None:
        st = self.state
        st.running_requests -= 1
        st.active_tokens -= req.prompt_tokens
        st.kv_usage = min(1.0, st.active_tokens * self._kv_bytes_per_token / self.kv_capacity_bytes)
        self.observer.load_changed(self.name)

    # -- work intake ----------------------------------------------------------------------------
    def submit(self, req: SimRequest) -> None:
        """A request dispatched for prefill (FCFS behind earlier ones)."""
        self.waiting.append(req)

    def join_decode(self, req: SimRequest) -> None:
        """A request starts decoding here: now if idle, else at the end of the current step."""
        if self.busy:
            self._joins.append(req)
        else:
            self._add_decoder(req)

    def _add_decoder(self, req: SimRequest) -> None:
        self._seq += 1
        # The first token came from the prefill; output_tokens - 1 decode steps remain.
        heapq.heappush(self._decoding, (self.steps_done + req.output_tokens - 1, self._seq, req))
        self.ctx_sum += req.prompt_tokens + 1

    @property
    def n_decoding(self) -> int:
        return len(self._decoding)

    @property
    def needs_boundary(self) -> bool:
        """New work is waiting for the next step boundary."""
        return bool(self._joins) or (self.cache is not None and bool(self.waiting))

    # -- stepping -------------------------------------------------------------------------------
    def plan(self, now: float) -> float | None:
        """Start the next step (or decode run) at ``now``; returns its end time, None if idle."""
        if self.busy:
            raise RuntimeError(f"{self.name}: plan() while a step is in flight")
        n = len(self._decoding)
        chunks = self._allocate_chunks(n, now) if (self.waiting or self.prefilling) else []
        if chunks:
            computed = 0
            cached = 0
            for req, take in chunks:
                computed += take
                if take and req.remaining_prefill == req.uncached_tokens:  # first chunk: load its hit
                    cached += req.hit_tokens
            prefill = self.cost.prefill_time(computed, cached, self.name)
            if self.noise is not None:
                prefill *= self.noise()
            duration = prefill + self.cost.decode_step_time(n, self.ctx_sum)
            steps = 1
        elif n:
            steps = 1
            if self.aggregate_decode and not (self.waiting or self.prefilling):
                steps = max(1, self._decoding[0][0] - self.steps_done)
            duration = -1.0
        else:
            return None
        self.busy = True
        self._chunks = chunks
        self._run_t0 = now
        self._run_steps = steps
        self._run_n = n
        self._run_ctx0 = self.ctx_sum
        self.end_time = now + duration if duration >= 0 else self._run_end(steps)
        return self.end_time

    def _allocate_chunks(self, n_decoding: int, now: float) -> list[tuple[SimRequest, int]]:
        budget = self._max_batch_tokens - n_decoding
        chunks: list[tuple[SimRequest, int]] = []
        for req in self.prefilling:
            if budget <= 0:
                return chunks
            take = min(req.remaining_prefill, budget)
            chunks.append((req, take))
            budget -= take
        while budget > 0 and self.waiting:
            req = self.waiting.popleft()
            self._start_prefill(req, now)
            take = min(req.remaining_prefill, budget)
            chunks.append((req, take))
            budget -= take
        return chunks

    def _start_prefill(self, req: SimRequest, now: float) -> None:
        cache = self.cache
        if cache is None:
            raise RuntimeError(f"{self.name} is a decode-only engine")
        hit_blocks = cache.match(req.routed.block_hashes)
        hit = hit_blocks * self._block_size
        if self.migrated:
            migrated = self.migrated
            served = sum(1 for h in req.routed.block_hashes[:hit_blocks] if h in migrated)
            req.migrated_hit_tokens = min(served * self._block_size, max(0, req.prompt_tokens - 1))
        # At least one token is always computed (the engine needs the last position's logits).
        uncached = max(1, req.prompt_tokens - hit)
        req.uncached_tokens = uncached
        req.hit_tokens = req.prompt_tokens - uncached
        req.remaining_prefill = uncached
        req.prefill_instance = self.name
        req.prefill_started_at = now
        self.prefilling.append(req)
        self.hold(req)

    def _run_end(self, k: int) -> float:
        """End time of step k of the current decode run (closed form of the step series)."""
        if k == 1:
            return self._run_t0 + self.cost.decode_step_time(self._run_n, self._run_ctx0)
        n, c0 = self._run_n, self._run_ctx0
        return self._run_t0 + k * self._step_base + self._step_per_ctx * (k * c0 + n * k * (k - 1) // 2)

    def truncate(self, now: float) -> float | None:
        """Cut a decode run at the end of the step in progress at ``now``, so new work starts
        there. Returns the new end time, or None if nothing changed."""
        if not self.busy or self._run_steps <= 1 or self._chunks:
            return None
        k = self._first_step_ending_at_or_after(now)
        if k >= self._run_steps:
            return None
        self._run_steps = k
        self.version += 1
        self.end_time = self._run_end(k)
        return self.end_time

    def _first_step_ending_at_or_after(self, now: float) -> int:
        n, c0, pc = self._run_n, self._run_ctx0, self._step_per_ctx
        # T(k) - now = a k^2 + b k + c, increasing in k >= 1.
        a = pc * n / 2
        b = self._step_base + pc * c0 - a
        c = self._run_t0 - now
        if a > 0:
            k = math.ceil((-b + math.sqrt(max(0.0, b * b - 4 * a * c))) / (2 * a))
        else:
            k = math.ceil(-c / b) if b > 0 else 1
        k = min(max(k, 1), self._run_steps)
        # Guard against rounding in the root.
        while k > 1 and self._run_end(k - 1) >= now:
            k -= 1
        while k < self._run_steps and self._run_end(k) < now:
            k += 1
        return k

    def finish_step(self) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the step (or run) that just ended: (prefills finished, decodes finished)."""
        if not self.busy:
            raise RuntimeError(f"{self.name}: finish_step() with no step in flight")
        self.busy = False
        k, n = self._run_steps, self._run_n
        self.steps_run += k
        self.events_run += 1
        decodes_done: list[SimRequest] = []
        if n:
            self.steps_done += k
            self.ctx_sum += n * k
            heap = self._decoding
            while heap and heap[0][0] <= self.steps_done:
                req = heapq.heappop(heap)[2]
                self.ctx_sum -= req.prompt_tokens + req.output_tokens
                decodes_done.append(req)
        prefills_done: list[SimRequest] = []
        if self._chunks:
            for req, take in self._chunks:
                req.remaining_prefill -= take
                self.prefill_tokens_computed += take
                if req.remaining_prefill == 0:
                    prefills_done.append(req)
                    self._store_prompt(req)
            if prefills_done:
                self.prefilling = [r for r in self.prefilling if r.remaining_prefill > 0]
            self._chunks = []
        if self._joins:
            for req in self._joins:
                self._add_decoder(req)
            self._joins = []
        return prefills_done, decodes_done

    def _store_prompt(self, req: SimRequest) -> None:
        cache = self.cache
        if cache is None:
            return
        self._insert(cache, req.routed.block_hashes)

    def receive_blocks(self, block_hashes: list[int] | tuple[int, ...]) -> list[int]:
        """A migrated prefix landed: cache it like a computed one; returns the blocks stored."""
        cache = self.cache
        if cache is None:
            raise RuntimeError(f"{self.name} is a decode-only engine")
        stored = self._insert(cache, block_hashes)
        self.migrated.update(stored)
        return stored

    def _insert(self, cache: PrefixCache, block_hashes: list[int] | tuple[int, ...]) -> list[int]:
        stored, evicted = cache.insert(block_hashes)
        if evicted:
            self.observer.remove_blocks(self.name, evicted)
            if self.migrated:
                self.migrated.difference_update(evicted)
        if stored:
            # block_hashes is a chain from a prompt's first block: each block's parent is the
            # one before it.
            parent_of = dict(zip(block_hashes[1:], block_hashes))
            self.observer.add_blocks(self.name, stored, [parent_of.get(h) for h in stored])
        return stored
