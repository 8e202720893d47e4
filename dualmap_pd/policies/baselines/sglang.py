"""SGLang router's ``cache_aware`` policy.

Source: github sgl-project/sglang, sgl-router/src/policies/cache_aware.rs (``select_worker``) and
sgl-router/src/policies/tree.rs (the approximate radix tree). Per request:

  loads = worker.load() for every worker          # requests in flight on the worker
  imbalanced = (max - min) > balance_abs_threshold and max > balance_rel_threshold * min
  if imbalanced: worker = argmin load (shortest queue)           # tree still updated
  else:
      matched, tenant = tree.prefix_match(text)                  # longest match over all workers
      if matched / len(text) > cache_threshold: worker = tenant
      else: worker = tree.get_smallest_tenant()                  # least cached text
  tree.insert(text, worker)

Defaults are the router's user-facing ones, sgl-router/py_src/sglang_router/router_args.py
(``RouterArgs``): cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5,
eviction_interval_secs 120, max_tree_size 2**26 (the Rust ``CacheAwareConfig::default()`` in
policies/mod.rs has older values, 0.5 / 32 / 1.1 / 30 s / 10,000, that the launcher overrides).

Mapping to this project:
- The tree holds *routed* prompts, not engine caches: per instance, the block hashes of prompts the
  router sent there (chained hashes make a set of blocks behave exactly as a radix tree of token
  prefixes), with a global block -> instances index so matching walks the prompt once. Each
  instance's tree is bounded by ``max_tree_tokens`` (SGLang's max_tree_size is in characters;
  2**26 characters ~ 2**24 tokens at ~4 characters a token) and evicts least-recently-used leaves
  first (tree.rs ``evict_tenant_by_size``), eagerly after each insert rather than every 120 s.
- Match ratio = matched tokens / prompt tokens (SGLang: matched / total characters).
- Load = requests in flight on the instance, as SGLang's ``WorkerLoadGuard`` counts them (from
  dispatch until the worker is done with the request): ``inflight_requests`` where the intake
  keeps it (the simulator counts dispatch -> prefill done on a prefill instance, dispatch ->
  completion when colocated), never less than the router's own count of engine-pending
  prefills, plus requests still in the router's queue.
- Deterministic choices where SGLang's are arbitrary: a tie between workers holding the deepest
  match (SGLang takes the first key of a concurrent hash map) goes to the less loaded one, then
  view order; the smallest tree breaks ties by load, then view order; shortest queue by view order
  (SGLang's ``min_by_key`` takes the first index).
- The imbalance check uses eligible instances only; SGLang's includes unhealthy workers, whose
  zero load would flag imbalance spuriously.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.policies.base import PREFILL_POLICIES, PolicyContext, PrefillPolicy
from dualmap_pd.policies.baselines.common import PrefillCache
from dualmap_pd.request import Decision, NoInstanceError, RoutedRequest

_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SGLangCacheAwareConfig:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_tokens: int = 2**24  # per instance; SGLang's 2**26 characters at ~4 chars/token
    count_inflight: bool = True  # use InstanceState.inflight_requests when the intake keeps it


class ApproxTree:
    """Per-instance LRU sets of routed block hashes, plus a global block -> instances index."""

    def __init__(self) -> None:
        self.blocks: dict[str, OrderedDict[int, None]] = {}
        self.holders: dict[int, set[str]] = {}

    def size(self, tenant: str) -> int:
        od = self.blocks.get(tenant)
        return len(od) if od is not None else 0

    def insert(self, tenant: str, block_hashes: Sequence[int], max_blocks: int) -> None:
        od = self.blocks.setdefault(tenant, OrderedDict())
        holders = self.holders
        # Touch the deepest block first and the root last: an ancestor is then always at least as
        # recent as its descendants, so popping the LRU end removes leaves before their parents.
        for h in reversed(block_hashes):
            if h in od:
                od.move_to_end(h)
            else:
                od[h] = None
                holders.setdefault(h, set()).add(tenant)
        while len(od) > max_blocks:
            h, _ = od.popitem(last=False)
            self._drop(h, tenant)

    def _drop(self, h: int, tenant: str) -> None:
        s = self.holders.get(h)
        if s is not None:
            s.discard(tenant)
            if not s:
                del self.holders[h]

    def remove_tenant(self, tenant: str) -> None:
        for h in self.blocks.pop(tenant, ()):
            self._drop(h, tenant)

    def deepest(self, block_hashes: Sequence[int], allowed: set[str] | dict[str, int]) -> tuple[int, set[str]]:
        """(matched blocks, tenants holding that many) over tenants in ``allowed``."""
        if not block_hashes:
            return 0, set()
        holders = self.holders
        alive = {t for t in holders.get(block_hashes[0], _EMPTY) if t in allowed}
        if not alive:
            return 0, set()
        depth = 1
        for h in block_hashes[1:]:
            nxt = alive & holders.get(h, _EMPTY)
            if not nxt:
                break
            alive = nxt
            depth += 1
        return depth, alive


@PREFILL_POLICIES.register
class SGLangCacheAwarePolicy(PrefillPolicy):
    """SGLang router cache_aware (sgl-router/src/policies/cache_aware.rs); see module docstring."""

    name = "sglang_cache_aware"

    def __init__(self, ctx: PolicyContext, config: SGLangCacheAwareConfig | None = None) -> None:
        super().__init__(ctx)
        self.config = config or SGLangCacheAwareConfig()
        self.tree = ApproxTree()
        self._cache = PrefillCache()

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        cfg = self.config
        eligible = self._cache.get(view).eligible
        if not eligible:
            raise NoInstanceError("no healthy prefill instance")
        if cfg.count_inflight:
            # inflight_requests already includes the engine-pending prefills where the intake
            # keeps it (the simulator does); max() avoids counting them twice and falls back to
            # the router's own count where it does not.
            loads = {
                st.name: len(st.queue) + max(st.engine_pending_requests, st.inflight_requests) for st in eligible
            }
        else:
            loads = {st.name: len(st.queue) + st.engine_pending_requests for st in eligible}
        hi, lo = max(loads.values()), min(loads.values())
        # ``loads`` is in view order and every scan below keeps the first strict minimum.
        if hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold:
            pick = min(loads, key=loads.__getitem__)
            return Decision(pick, "shortest_queue", (pick,), scores={pick: float(loads[pick])})
        depth, tenants = self.tree.deepest(req.block_hashes, loads)
        rate = depth * view.block_size / req.prompt_tokens if req.prompt_tokens > 0 else 0.0
        if tenants and rate > cfg.cache_threshold:
            pick = min((n for n in loads if n in tenants), key=loads.__getitem__)
            return Decision(pick, "cache_match", (pick,), depth * view.block_size, scores={pick: rate})
        trees = self.tree.blocks
        pick, best = "", (0, 0)
        for name, load in loads.items():  # runs per instance: inlined
            od = trees.get(name)
            key = (len(od) if od else 0, load)
            if not pick or key < best:
                pick, best = name, key
        return Decision(pick, "smallest_tree", (pick,), scores={pick: float(best[0])})

    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        # SGLang inserts the prompt for the chosen worker in every branch (even shortest queue).
        max_blocks = max(1, self.config.max_tree_tokens // view.block_size)
        self.tree.insert(decision.instance, req.block_hashes, max_blocks)

    def on_membership_change(self, view: ClusterView) -> None:
        self._cache.refresh(view)
        # A removed worker's tree is dropped (cache_aware.rs remove_worker -> remove_tenant);
        # an unhealthy one keeps it but is never chosen while ineligible.
        present = set(view.names(Role.PREFILL))
        for tenant in [t for t in self.tree.blocks if t not in present]:
            self.tree.remove_tenant(tenant)
