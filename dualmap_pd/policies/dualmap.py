"""DualMap (ICLR 2026, arXiv 2602.06502; authors' code github ASISys/DualMap).

Each request's prefix key maps through two independent consistent-hash rings to two candidate
instances. The candidate holding more of the prompt's KV cache wins (cache affinity) unless its
estimated TTFT would break the SLO threshold, in which case the candidate with the lower estimate
wins (SLO switch). Requests wait in scheduler-side queues and are dispatched late, so when an
instance becomes a hot spot its queued requests can still move to their other candidate
(hotspot rebalancing). Hot prefixes get deeper keys (see hotprefix.py).

Branch labels: ``affinity`` (kept the better-cached candidate), ``load_tiebreak`` (no cache
difference; took the less loaded), ``slo_switch`` (left the better-cached candidate to meet the
SLO), ``slo_violation`` (both over the threshold, took the faster), ``single`` (only one
eligible instance), ``rebalanced`` (moved by hotspot rebalancing).

Two registered variants: ``dualmap_nomigrate`` is DualMap as published (a request moved to its
backup recomputes its prefix there); ``dualmap`` adds hot-prefix KV migration (policies/migration.py):
the SLO switch and the rebalancer price the backup with the prefix a worthwhile copy would bring,
and every placement that needs such a copy emits a migration plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.hotprefix import AUTHORS_EXTEND_SHARE, HotPrefixConfig, HotPrefixDetector
from dualmap_pd.policies.base import PREFILL_POLICIES, PolicyContext, PrefillPolicy
from dualmap_pd.policies.migration import MigrationConfig, MigrationPlan, MigrationPlanner
from dualmap_pd.request import Decision, Move, NoInstanceError, RoutedRequest
from dualmap_pd.ring import DualRing


@dataclass(frozen=True)
class DualMapConfig:
    """Defaults follow the authors' code (DUALMAP.md, "How the authors' code runs its
    evaluation"); the earlier choices of this project stay available as the named values."""

    vnodes: int = 160  # virtual nodes per instance on each ring (authors' MD5 ring)
    # Switch away from the affinity candidate when its estimated TTFT exceeds this fraction of
    # the SLO. The paper's prose says the SLO itself; the authors' code uses SLO / 2.
    switch_fraction: float = 0.5
    # Rebalancing triggers: an instance's queued + pending uncached work exceeds one SLO of work,
    # or its oldest queued request has waited this long (both from the paper).
    max_queue_wait_s: float = 3.0
    min_queue_to_rebalance: int = 2
    # Hot-prefix share threshold: the authors' code's 0.0612 (the paper's prose: 2/n, which is
    # ``HotPrefixConfig(extend_share=None)``).
    hot_prefix: HotPrefixConfig = field(default_factory=lambda: HotPrefixConfig(extend_share=AUTHORS_EXTEND_SHARE))
    # Rebalancing gain of a queued request: its TTFT on the source counts the work queued ahead
    # of it ("position", authors' code) or the source's whole backlog ("backlog", earlier here).
    rebalance_gain: Literal["position", "backlog"] = "position"
    # Targets that are overloaded or hold a request waiting >= max_queue_wait_s are skipped, and
    # a request whose other candidate is unfit tries the neighbour instance (authors' code);
    # False: the other candidate whatever its state (earlier here).
    check_targets: bool = True
    # Instances checked for a hot spot on each scheduling event: "all" (authors' code) or
    # "involved": the admitted request's candidates and the finishing instance (earlier here).
    rebalance_scope: Literal["all", "involved"] = "all"
    # Equal-hit tie-break: fewer running decode blocks (active tokens), then a seeded random pick
    # ("decode_blocks", authors' code), or pending + active tokens ("pending_and_active", earlier).
    tiebreak: Literal["decode_blocks", "pending_and_active"] = "decode_blocks"
    # With migration only (policy "dualmap"): the rebalancer may also move a queued request to
    # the least-loaded instance, its prefix copied there, not only to its backup candidate.
    rebalance_to_least_loaded: bool = True


@PREFILL_POLICIES.register
class DualMapPolicy(PrefillPolicy):
    """DualMap as published: dual rings, SLO-aware selection, late dispatch, rebalancing."""

    name = "dualmap_nomigrate"
    late_dispatch = True

    def __init__(self, ctx: PolicyContext, config: DualMapConfig | None = None) -> None:
        super().__init__(ctx)
        self.config = config or DualMapConfig()
        self.rings = DualRing(vnodes=self.config.vnodes)
        self.hot = HotPrefixDetector(self.config.hot_prefix)
        self._rng = ctx.rng("dualmap-tiebreak")
        self._excluded: frozenset[str] = frozenset()

    # -- membership ---------------------------------------------------------------------------
    def on_membership_change(self, view: ClusterView) -> None:
        names = view.names(Role.PREFILL)
        self.rings.sync(names)
        self.hot.set_instance_count(len(names))
        self._excluded = frozenset(view.ineligible_names(Role.PREFILL))

    # -- selection ----------------------------------------------------------------------------
    def candidates_for(self, req: RoutedRequest) -> tuple[int, tuple[str, ...]]:
        depth = self.hot.key_depth(req.block_hashes)
        return depth, self.rings.candidates(req.routing_key(depth), self._excluded)

    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        depth, cands = self.candidates_for(req)
        if not cands:
            raise NoInstanceError("no healthy prefill instance")
        hits = [view.request_hit_tokens(req, c) for c in cands]
        # Affinity follows what is cached; the TTFT estimates price what each candidate would
        # have to compute (with migration, less than its cache alone says).
        reach = [self.achievable_hit_tokens(req, c, view, now) for c in cands]
        ttfts = [self.estimated_ttft(view[c], req.prompt_tokens - h) for c, h in zip(cands, reach)]
        scores = {c: t for c, t in zip(cands, ttfts)}
        if len(cands) == 1:
            return Decision(cands[0], "single", cands, hits[0], ttfts[0], scores)
        if hits[0] != hits[1]:
            pick = 0 if hits[0] > hits[1] else 1
            branch = "affinity"
        else:
            # Equal hits: fewer running KV blocks, then random (authors' rule).
            if self.config.tiebreak == "decode_blocks":
                load = [view[c].active_tokens for c in cands]
            else:
                load = [view[c].pending_work_tokens() + view[c].active_tokens for c in cands]
            pick = 0 if load[0] < load[1] else 1 if load[1] < load[0] else self._rng.randrange(2)
            branch = "load_tiebreak"
        threshold = self.config.switch_fraction * self.ctx.slo_ttft
        if ttfts[pick] > threshold:
            other = 1 - pick
            if ttfts[other] < ttfts[pick]:
                branch = "slo_switch" if ttfts[other] <= threshold else "slo_violation"
                pick = other
            else:
                branch = "slo_violation"
        return Decision(cands[pick], branch, cands, hits[pick], ttfts[pick], scores)

    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        self.hot.observe(req.block_hashes, self.hot.key_depth(req.block_hashes))

    def queue_priority(self, req: RoutedRequest, instance: str, view: ClusterView) -> tuple:
        # Longest cache hit first (it is cheapest and its blocks may be evicted), then arrival.
        return (-view.request_hit_blocks(req, instance), req.arrival)

    # -- hotspot rebalancing ------------------------------------------------------------------
    def _oldest_wait(self, queued: Sequence[RoutedRequest], now: float) -> float:
        return max((now - r.arrival for r in queued), default=0.0)

    def rebalance_instances(self, involved: Sequence[str], long_queues: Sequence[str]) -> Sequence[str]:
        # min_queue_to_rebalance >= 2 is checked per source in rebalance().
        return involved if self.config.rebalance_scope == "involved" else long_queues

    def rebalance(
        self,
        view: ClusterView,
        queued: Mapping[str, Sequence[RoutedRequest]],
        check: Sequence[str],
        now: float,
    ) -> list[Move]:
        cost = self.ctx.cost
        cfg = self.config
        moves: list[Move] = []
        # Work added to targets by earlier moves of this round (re-estimation).
        added: dict[str, int] = {}
        # (request, target) -> tokens the target would not compute: fixed for the round (moves
        # change loads, not caches), and with migration each one prices a possible copy.
        reach: dict[tuple[str, str], int] = {}
        # Oldest wait per instance, for this round (moves only shorten a source's queue).
        oldest = _OldestWait(queued, now)
        for src in check:
            reqs = list(queued.get(src, ()))
            if len(reqs) < cfg.min_queue_to_rebalance or not view[src].healthy:
                continue
            budget = cost.token_budget(self.ctx.slo_ttft, src)
            src_work = view[src].pending_work_tokens() + added.get(src, 0)
            aged = self._oldest_wait(reqs, now) >= cfg.max_queue_wait_s
            if src_work <= budget and not aged:
                continue
            pt_src = cost.per_token_prefill(src)
            neighbour = self._neighbour(src, view) if cfg.check_targets else None
            fit: dict[str, bool] = {}  # target fitness, until a move changes its load
            while reqs:
                best: tuple[float, int, str, int] | None = None
                spare = self._spare_target(src, view, added)
                ahead = view[src].engine_pending_tokens  # work before each request, in queue order
                for i, r in enumerate(reqs):
                    ahead += r.queued_uncached
                    t_src = pt_src * (ahead if cfg.rebalance_gain == "position" else src_work)
                    backup = self._move_target(r, src, neighbour, view, oldest, added, fit)
                    # A request goes to a spare instance at most once: without that cap,
                    # overloaded clusters bounce requests (and copies of their prefixes) around.
                    for target in (backup, spare) if spare != backup and r.moves == 0 else (backup,):
                        if target is None:
                            continue
                        hit_t = reach.get((r.request_id, target))
                        if hit_t is None:
                            hit_t = reach[r.request_id, target] = self.achievable_hit_tokens(r, target, view, now)
                        unc_t = max(0, r.prompt_tokens - hit_t)
                        t_work = view[target].pending_work_tokens() + added.get(target, 0)
                        gain = t_src - cost.per_token_prefill(target) * (t_work + unc_t)
                        if best is None or gain > best[0]:
                            best = (gain, i, target, unc_t)
                if best is None or best[0] <= 0:
                    break
                gain, i, target, unc_t = best
                r = reqs.pop(i)
                moves.append(Move(r.request_id, src, target, gain))
                src_work -= r.queued_uncached
                added[src] = added.get(src, 0) - r.queued_uncached
                added[target] = added.get(target, 0) + unc_t
                fit.pop(target, None)
                if src_work <= budget and (not reqs or self._oldest_wait(reqs, now) < cfg.max_queue_wait_s):
                    break
        return moves

    def _move_target(
        self,
        req: RoutedRequest,
        src: str,
        neighbour: str | None,
        view: ClusterView,
        oldest: _OldestWait,
        added: Mapping[str, int],
        fit: dict[str, bool],
    ) -> str | None:
        """Where a queued request may move: its other candidate; with ``check_targets``, only if
        that one is fit, else the neighbour instance ((source + 1) mod n), else nowhere."""
        backup = self._backup(req, src, view)
        if not self.config.check_targets:
            return backup
        for target in (backup, neighbour):
            if target is None:
                continue
            ok = fit.get(target)
            if ok is None:
                ok = fit[target] = self._fit_target(target, view, oldest, added)
            if ok:
                return target
        return None

    def _neighbour(self, src: str, view: ClusterView) -> str | None:
        """The next eligible prefill instance after ``src`` in membership order (wrapping)."""
        names = view.names(Role.PREFILL)
        if src not in names:
            return None
        i = names.index(src)
        for name in names[i + 1 :] + names[:i]:
            if view[name].eligible:
                return name
        return None

    def _fit_target(self, name: str, view: ClusterView, oldest: _OldestWait, added: Mapping[str, int]) -> bool:
        """Not overloaded (one SLO of work) and no request there waiting >= max_queue_wait_s."""
        st = view[name]
        if st.pending_work_tokens() + added.get(name, 0) > self.ctx.cost.token_budget(self.ctx.slo_ttft, name):
            return False
        return oldest[name] < self.config.max_queue_wait_s

    def achievable_hit_tokens(self, req: RoutedRequest, target: str, view: ClusterView, now: float) -> int:
        """Prompt tokens ``target`` would not compute if ``req`` went there (published: its
        cache hit; a moved request recomputes the rest)."""
        return view.request_hit_tokens(req, target)

    def _spare_target(self, src: str, view: ClusterView, added: Mapping[str, int]) -> str | None:
        """A move target besides each request's backup (published DualMap: none)."""
        return None

    def _backup(self, req: RoutedRequest, src: str, view: ClusterView) -> str | None:
        """The request's other candidate, or, if that is gone, the next eligible instance on
        ring B (the authors' code falls back to a neighbour too)."""
        for c in req.candidates:
            if c != src and c in view and view[c].eligible:
                return c
        excl = set(self._excluded) | {src}
        return self.rings.ring_b.lookup(req.routing_key(self.hot.key_depth(req.block_hashes)), excl)


class _OldestWait:
    """How long the oldest queued request of each instance has waited, computed once per
    rebalancing round (a queue is ordered by hit, not age, so it takes a scan)."""

    def __init__(self, queued: Mapping[str, Sequence[RoutedRequest]], now: float) -> None:
        self._queued, self._now = queued, now
        self._memo: dict[str, float] = {}

    def __getitem__(self, name: str) -> float:
        got = self._memo.get(name)
        if got is None:
            got = self._memo[name] = max((self._now - r.arrival for r in self._queued.get(name, ())), default=0.0)
        return got


@PREFILL_POLICIES.register
class DualMapMigratePolicy(DualMapPolicy):
    """DualMap with hot-prefix KV migration: a request placed away from the instance holding its
    prefix (SLO switch, rebalancing, a freshly extended hot key) gets the prefix copied there
    when the cost model says the copy beats recomputing it."""

    name = "dualmap"

    def __init__(
        self, ctx: PolicyContext, config: DualMapConfig | None = None, migration: MigrationConfig | None = None
    ) -> None:
        super().__init__(ctx, config)
        self.migration = MigrationPlanner(ctx.cost, migration)

    def _spare_target(self, src: str, view: ClusterView, added: Mapping[str, int]) -> str | None:
        """The least-loaded eligible instance. Without migration a request moved there loses its
        prefix (DualMap keeps moves on the backup candidate to keep at most two copies); with it,
        the prefix follows the request, so the rebalancer may also pick the instance with the
        most room. Moves there are still priced with what it would have to compute. None when
        even that instance has a full SLO of work: then the whole cluster is overloaded, and
        spreading requests (and copies of their prefixes, evicting other caches) only churns."""
        if not self._spare_moves_allowed():
            return None
        best, best_work = None, 0
        for st in view.instances(Role.PREFILL):
            if st.name == src or not st.eligible:
                continue
            work = st.pending_work_tokens() + added.get(st.name, 0)
            if best is None or work < best_work:
                best, best_work = st.name, work
        if best is None or best_work >= self.ctx.cost.token_budget(self.ctx.slo_ttft, best):
            return None
        return best

    def _spare_moves_allowed(self) -> bool:
        return self.migration is not None and self.config.rebalance_to_least_loaded

    def _prefix_share(self, req: RoutedRequest) -> float:
        """Share of all arrivals expected to bring the request's prefix to one instance: its
        routing key's share split over its two candidates or, for an extended (hot) key, the hot
        prefix's share (one block above the key, which is itself unique) spread over every
        instance."""
        depth = self.hot.key_depth(req.block_hashes)
        if depth == 0:
            return 0.0
        if depth > self.config.hot_prefix.base_depth:
            return self.hot.share(req.block_hashes[depth - 2]) / max(1, len(self.rings.members))
        return self.hot.share(req.block_hashes[depth - 1]) / 2

    # ``migration`` may be set to None (a live scheduler with no migration backend): then this
    # policy routes exactly as the published one.
    def achievable_hit_tokens(self, req: RoutedRequest, target: str, view: ClusterView, now: float) -> int:
        if self.migration is None:
            return view.request_hit_tokens(req, target)
        blocks = self.migration.achievable_hit_blocks(req, target, view, now, self._prefix_share(req))
        return blocks * view.block_size

    def expected_hit_tokens(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> int:
        if self.migration is None:
            return view.request_hit_tokens(req, instance)
        return self.migration.expected_hit_blocks(req, instance, view, now) * view.block_size

    def hold_until(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> float | None:
        if self.migration is None:
            return None
        return self.migration.hold_until(req, instance, view, now)

    def migration_for(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> MigrationPlan | None:
        if self.migration is None:
            return None
        return self.migration.propose(req, instance, view, now, self._prefix_share(req))

    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        super().on_decision(req, decision, view, now)
        if self.migration is not None:
            self.migration.observe_arrival(now)
