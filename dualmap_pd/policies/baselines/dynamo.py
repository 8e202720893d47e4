"""NVIDIA Dynamo's KV router (``--router-mode kv``), prefill-pool worker selection.

Source: github ai-dynamo/dynamo, lib/kv-router/src/scheduling/selector.rs
(``DefaultWorkerSelector::worker_logit`` / ``select_worker``; formerly
lib/llm/src/kv_router/scheduler.rs) and lib/kv-router/src/scheduling/config.rs
(``KvRouterConfig::default``). For each worker, lower is better:

  prefill_blocks = max(0, (active_prefill_tokens + isl) / block_size
                          - overlap_score_credit * overlap_blocks)
  logit = prefill_load_scale * prefill_blocks
          + potential_decode_blocks                 # active_decode_blocks + request blocks
                                                    #   not already active on the worker
          + decode_active_request_weight * active_requests

With the defaults (overlap_score_credit 1.0, prefill_load_scale 1.0; these replace the older
single ``overlap_score_weight`` = 1.0, which the current config maps onto prefill_load_scale) this
is the documented "overlap_score_weight x uncached prefill blocks (+ the worker's pending prefill
blocks) + active blocks". router_temperature 0.0 (default): the minimum logit, ties broken
uniformly at random (reservoir sampling in select_worker); > 0: softmax sampling over
-(logit - min) / ((max - min) x temperature) (``softmax_sample_entries``).

Mapping to this project:
- overlap_blocks: the worker's cached prefix of the prompt (KV events -> ``view.hit_blocks_all``).
- active_prefill_tokens: uncached tokens routed to the worker and not yet prefilled
  (``pending_work_tokens``), which is what Dynamo's router tracks per worker.
- Active blocks are tracked by this policy the way Dynamo's router does (sequences/*.rs): a
  request's prompt blocks become active on its worker when routed and are released when its
  prefill finishes (in disaggregated serving the prefill worker is done then); with
  router_assume_kv_reuse (default true) blocks shared between active requests count once, and
  the new request's blocks already active on a worker are not added again.
- decode_active_request_weight: 0.0 as in the upstream defaults (term present for ablation).
- Not modelled: Dynamo's router-side queue (router_queue_threshold 16.0 x max_num_batched_tokens
  per worker; it only engages when every worker is that far behind), host/disk cache tiers.
- Tie-breaking and sampling draw from an RNG seeded by (run seed, request id), so ``select`` is
  pure and runs repeat exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from dualmap_pd.cluster import ClusterView
from dualmap_pd.policies.base import PREFILL_POLICIES, PolicyContext, PrefillPolicy
from dualmap_pd.policies.baselines.common import PrefillCache, request_rng
from dualmap_pd.request import Decision, NoInstanceError, RoutedRequest

_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DynamoKVConfig:
    overlap_score_credit: float = 1.0
    prefill_load_scale: float = 1.0
    router_temperature: float = 0.0
    decode_active_request_weight: float = 0.0
    assume_kv_reuse: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap_score_credit <= 1.0:
            raise ValueError("overlap_score_credit must be in [0, 1] (as Dynamo validates)")
        if self.prefill_load_scale < 0 or self.router_temperature < 0:
            raise ValueError("prefill_load_scale and router_temperature must be >= 0")


class ActiveBlocks:
    """Prompt blocks of requests routed to each worker whose prefill has not finished."""

    def __init__(self) -> None:
        self.refs: dict[str, Counter[int]] = {}  # worker -> block -> active requests using it
        self.holders: dict[int, set[str]] = {}  # block -> workers where it is active
        self.partial: Counter[str] = Counter()  # requests with a partial tail block, per worker
        self.requests: Counter[str] = Counter()  # active requests per worker
        self.count: dict[str, int] = {}  # unique active blocks (+ partial tails) per worker
        self.by_request: dict[str, tuple[str, tuple[int, ...], bool]] = {}

    def blocks(self, worker: str) -> int:
        """Unique active blocks (each request's partial tail block counts once)."""
        return self.count.get(worker, 0)

    def _recount(self, worker: str) -> None:
        n = len(self.refs.get(worker, ())) + self.partial[worker]
        if n:
            self.count[worker] = n
        else:
            self.count.pop(worker, None)

    def add(self, rid: str, worker: str, block_hashes: Sequence[int], partial: bool) -> None:
        self.remove(rid)  # a re-admitted request (its instance failed) moves
        refs = self.refs.setdefault(worker, Counter())
        for h in block_hashes:
            if refs[h] == 0:
                self.holders.setdefault(h, set()).add(worker)
            refs[h] += 1
        self.partial[worker] += partial
        self.requests[worker] += 1
        self.by_request[rid] = (worker, tuple(block_hashes), partial)
        self._recount(worker)

    def remove(self, rid: str) -> None:
        entry = self.by_request.pop(rid, None)
        if entry is None:
            return
        worker, block_hashes, partial = entry
        refs = self.refs.get(worker)
        if refs is not None:
            for h in block_hashes:
                n = refs[h] - 1
                if n > 0:
                    refs[h] = n
                    continue
                del refs[h]
                s = self.holders.get(h)
                if s is not None:
                    s.discard(worker)
                    if not s:
                        del self.holders[h]
        self.partial[worker] -= partial
        self.requests[worker] -= 1
        self._recount(worker)

    def drop_worker(self, worker: str) -> None:
        for rid in [r for r, e in self.by_request.items() if e[0] == worker]:
            self.remove(rid)

    def shared(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Leading prompt blocks already active on each worker (chained hashes: a shared block
        implies its whole prefix is shared)."""
        out: dict[str, int] = {}
        if not block_hashes:
            return out
        alive = set(self.holders.get(block_hashes[0], _EMPTY))
        depth = 0
        for h in block_hashes:
            if not alive:
                break
            still = alive & self.holders.get(h, _EMPTY)
            for gone in alive - still:
                out[gone] = depth
            alive = still
            depth += 1
        for w in alive:
            out[w] = depth
        return out


@PREFILL_POLICIES.register
class DynamoKVPolicy(PrefillPolicy):
    """NVIDIA Dynamo KV router cost function (selector.rs); see module docstring."""

    name = "dynamo_kv"

    def __init__(self, ctx: PolicyContext, config: DynamoKVConfig | None = None) -> None:
        super().__init__(ctx)
        self.config = config or DynamoKVConfig()
        self.active = ActiveBlocks()
        self._cache = PrefillCache()

    def on_membership_change(self, view: ClusterView) -> None:
        self._cache.refresh(view)
        # A removed or failed worker lost its sequences (the router re-admits them elsewhere).
        for worker in list(self.active.refs):
            st = view.get(worker)
            if st is None or not st.healthy:
                self.active.drop_worker(worker)

    def logits(self, req: RoutedRequest, view: ClusterView) -> dict[str, float]:
        """The cost of every eligible prefill instance, in view order."""
        cfg = self.config
        bs = view.block_size
        isl = req.prompt_tokens
        overlaps = view.hit_blocks_all(req.block_hashes)
        shared = self.active.shared(req.block_hashes) if cfg.assume_kv_reuse else {}
        request_blocks = -(-isl // bs)  # ceil: the partial tail block is allocated too
        credit, scale, w_req = cfg.overlap_score_credit, cfg.prefill_load_scale, cfg.decode_active_request_weight
        active_count, active_reqs = self.active.count.get, self.active.requests.get
        overlap, share = overlaps.get, shared.get
        out: dict[str, float] = {}
        eligible = self._cache.get(view).eligible
        if not overlaps and not shared and not w_req:
            for st in eligible:  # no hit, nothing shared: the common case at scale
                name = st.name
                prefill = (st.queued_uncached_tokens + st.engine_pending_tokens + isl) / bs
                out[name] = scale * prefill + active_count(name, 0) + request_blocks
            return out
        for st in eligible:  # runs per instance: everything inlined
            name = st.name
            prefill = (st.queued_uncached_tokens + st.engine_pending_tokens + isl) / bs - credit * overlap(name, 0)
            out[name] = (
                scale * (prefill if prefill > 0.0 else 0.0)
                + active_count(name, 0)
                + request_blocks
                - share(name, 0)
                + w_req * active_reqs(name, 0)
            )
        return out

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        logits = self.logits(req, view)
        if not logits:
            raise NoInstanceError("no healthy prefill instance")
        rng = request_rng(self.ctx.seed, "dynamo_kv", req.request_id)
        temp = self.config.router_temperature
        if temp == 0.0:
            best_v = min(logits.values())
            tied = [n for n, v in logits.items() if v == best_v]
            # Uniform among tied minima, as Dynamo's reservoir sampling over workers.
            best = tied[rng.randrange(len(tied))] if len(tied) > 1 else tied[0]
            branch = "min_cost"
        else:
            best = self._softmax_sample(logits, temp, rng.random())
            best_v = logits[best]
            branch = "softmax"
        hit = view.hit_tokens(best, req.block_hashes)
        return Decision(best, branch, (best,), hit, scores={best: best_v})

    @staticmethod
    def _softmax_sample(logits: dict[str, float], temperature: float, u: float) -> str:
        lo, hi = min(logits.values()), max(logits.values())
        names = list(logits)
        if lo == hi:
            return names[min(len(names) - 1, int(u * len(names)))]
        scale = 1.0 / ((hi - lo) * temperature)
        weights = [math.exp(-(logits[n] - lo) * scale) for n in names]
        target = u * sum(weights)
        acc = 0.0
        for n, w in zip(names, weights):
            acc += w
            if target <= acc:
                return n
        return names[-1]

    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        partial = req.prompt_tokens > len(req.block_hashes) * view.block_size
        self.active.add(req.request_id, decision.instance, req.block_hashes, partial)

    def on_prefill_done(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> None:
        self.active.remove(req.request_id)
