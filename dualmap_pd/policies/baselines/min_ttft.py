"""Mooncake's conductor: route every request to the prefill instance with the minimum estimated TTFT.

Source: Qin et al., "Mooncake: Trading More Storage for Less Computation -- A KVCache-centric
Architecture for Serving LLM Chatbot", FAST'25 (arXiv 2407.00079), section 6.1 "Prefill Global
Scheduling", Algorithm 1 "KVCache-centric Scheduling Algorithm". DualMap's evaluation uses it as
the "min-TTFT" baseline (DUALMAP.md).

Algorithm 1, per request:
  best_prefix_len, best_matched_instance <- FindBestPrefixMatch(P, block_keys)
  for instance in P:
      prefix_len <- instance.prefix_len; T_queue <- EstimatePrefillQueueTime(instance)
      if best_prefix_len > prefix_len * kvcache_balancing_threshold:       # transfer branch
          T_transfer <- EstimateKVCacheTransferTime(instance, best_matched_instance,
                                                    best_prefix_len - prefix_len)
          TTFT <- T_transfer + T_queue + EstimatePrefillExecutionTime(len, best_prefix_len)
      else:                                                                 # local branch
          TTFT <- T_queue + EstimatePrefillExecutionTime(len, prefix_len)
  p <- argmin TTFT; (then SLO check / early rejection, and
  TransferKVCache(best_matched_instance -> p) if the transfer branch won)

Here: prefix lengths come from the global cache index (``view.hit_blocks_all``: one walk of the
prompt however many instances there are); T_queue is the sum of the waiting requests' prefill
times (pending uncached tokens x per-token cost + one step overhead per request, the paper's
"sum of queued requests' prefill times"); prefill and transfer times come from the shared
``CostModel`` (the paper fits a regression offline; the simulator prices work with this model).

Deviations, each deliberate:
- The transfer branch is an option (``kv_transfer``), off by default: it only helps if whoever
  executes the decision actually moves the KV. When on, the decision carries the move in
  ``Decision.scores`` (see ``common.TRANSFER_FROM`` / ``transfer_of``) and the chosen instance is
  charged the transfer time and credited the moved prefix. With it off this is exactly the
  paper's cache-aware branch for every instance (what DualMap's evaluation ran: its published
  system moves no KV between instances).
- The paper does not publish ``kvcache_balancing_threshold``; the default 1.0 prices a transfer
  for any instance whose local hit is shorter than the best one, and an instance takes the
  transfer branch only if its estimate beats its own local (recompute) estimate, so a slow link
  never makes an instance look worse than recomputing would.
- No early rejection (HTTP 429): the router must place every request; SLO misses are measured.
- Transfer time ignores sender congestion (the paper notes it is hard to predict).
- Ties (equal estimates, e.g. every instance idle with no hit) go to a seeded random pick, as in
  the DualMap authors' evaluation code, not to the first instance in view order (which sent
  everything to one instance at low load). The authors' code seeds a fresh RNG on every call;
  here it is seeded per (run seed, request), so ties spread over instances and runs repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.policies.base import PREFILL_POLICIES, PolicyContext, PrefillPolicy
from dualmap_pd.policies.baselines.common import TRANSFER_FROM, PrefillCache, request_rng
from dualmap_pd.request import Decision, NoInstanceError, RoutedRequest


@dataclass(frozen=True)
class MinTTFTConfig:
    kv_transfer: bool = False  # Mooncake's cache-load-balancing branch (see module docstring)
    balancing_threshold: float = 1.0  # kvcache_balancing_threshold (not published; >= 1)

    def __post_init__(self) -> None:
        if self.balancing_threshold < 1.0:
            raise ValueError("balancing_threshold must be >= 1 (a transfer must lengthen the hit)")


@PREFILL_POLICIES.register
class MinTTFTPolicy(PrefillPolicy):
    """Mooncake conductor (FAST'25, Algorithm 1): minimum estimated TTFT over all instances."""

    name = "min_ttft"

    def __init__(self, ctx: PolicyContext, config: MinTTFTConfig | None = None) -> None:
        super().__init__(ctx)
        self.config = config or MinTTFTConfig()
        self._cache = PrefillCache()

    def on_membership_change(self, view: ClusterView) -> None:
        self._cache.refresh(view)

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        cost = self.ctx.cost
        prof = cost.profile
        pt, ct, ov = prof.prefill_s_per_token, prof.cached_s_per_token, prof.prefill_overhead_s
        scales = cost.prefill_scale
        bs = view.block_size
        P = req.prompt_tokens
        hits = view.hit_blocks_all(req.block_hashes)

        # FindBestPrefixMatch: any live instance can serve its cache (draining ones too).
        best_tok, best_src = 0, None
        if self.config.kv_transfer:
            for name in sorted(hits):  # sorted: ties resolve the same way in every run
                tok = min(P, hits[name] * bs)
                st = view.get(name)
                if tok > best_tok and st is not None and st.healthy and st.role is Role.PREFILL:
                    best_tok, best_src = tok, name
        thr = self.config.balancing_threshold
        # Prefill execution time of a request with no hit, before the instance's scale.
        miss_time = ov + pt * P if P > 0 else 0.0

        best_t = float("inf")
        choice = None
        choice_hit = 0
        choice_moved = 0
        ties: list[tuple[str, int, int]] = []  # others whose estimate equals best_t
        hit_of = hits.get
        for st in self._cache.get(view).eligible:  # runs per instance: fields read inline
            name = st.name
            t_queue = pt * (st.queued_uncached_tokens + st.engine_pending_tokens) + ov * (
                len(st.queue) + st.engine_pending_requests
            )
            blocks = hit_of(name)
            if blocks is None and best_src is None and not scales:
                t = t_queue + miss_time  # the common case at scale: no hit, nothing to move
                if t < best_t:
                    best_t, choice, choice_hit, choice_moved = t, name, 0, 0
                    ties = []
                elif t == best_t:
                    ties.append((name, 0, 0))
                continue
            scale = scales.get(name, 1.0) if scales else 1.0
            local = min(P, blocks * bs) if blocks else 0
            if local:
                t = scale * (t_queue + ov + pt * (P - local) + ct * local)
            else:
                t = scale * (t_queue + miss_time)
            moved = 0
            if best_src is not None and name != best_src and best_tok > local * thr:
                # Transfer branch; kept only if it beats recomputing here ("when it beats
                # recompute"), which Algorithm 1 leaves to the threshold.
                gap = best_tok - local
                t_pref = ov + pt * (P - best_tok) + ct * best_tok
                t_x = scale * (t_queue + t_pref) + cost.transfer_time(cost.kv_bytes(gap))
                if t_x < t:
                    t, moved = t_x, gap
            if t < best_t:
                best_t, choice, choice_hit, choice_moved = t, name, (best_tok if moved else local), moved
                ties = []
            elif t == best_t:
                ties.append((name, best_tok if moved else local, moved))
        if choice is None:
            raise NoInstanceError("no healthy prefill instance")
        if ties:  # a seeded random pick among the equal minima (see the module docstring)
            ties.append((choice, choice_hit, choice_moved))
            rng = request_rng(self.ctx.seed, "min-ttft-tie", req.request_id)
            choice, choice_hit, choice_moved = ties[rng.randrange(len(ties))]
        scores = {choice: best_t}
        branch = "min_ttft"
        if choice_moved:
            scores[TRANSFER_FROM + best_src] = float(choice_moved)  # type: ignore[operator]
            branch = "min_ttft_transfer"
        return Decision(choice, branch, (choice,), choice_hit, best_t, scores)
