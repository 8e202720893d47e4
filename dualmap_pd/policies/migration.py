"""When to copy a prefix's KV cache to another prefill instance instead of recomputing it.

Published DualMap moves a queued request off a hot instance to its backup candidate, where it
recomputes the prefix it shared with the requests left behind. With migration the prefix's KV
blocks are copied over the prefill-to-prefill link instead (NIXL; ~70x faster than recomputing on
the paper's profile), and the moved request, and those after it, hit the cache there.

``MigrationPlanner`` is the decision half. It is pure when asked (``propose``, ``expected_hit_blocks``,
``hold_until``) and learns only through hooks called after a decision was carried out:
``on_planned`` (the router emitted the plan), ``on_started``, ``on_finished``, ``on_failed``.
Executing a plan (the simulator's link model, or scheduler/dispatch/migration_runner.py with a real
``PrefixMigrator``) is someone else's job.

While a copy is on its way, its blocks count on the target as *arriving at* the plan's expected
ready time. A request placed there either waits for them or recomputes them, whichever the cost
model says is faster (``expected_hit_blocks``); the router holds a waiting request in its queue
until the copy lands (``hold_until``).

The prefix to copy is the longest run of the request's leading blocks some eligible instance
holds: a block is cached only because an earlier request computed it, so that run is exactly the
part this request shares with earlier traffic. Whether copying pays is priced, not guessed: the
prefill time the target saves for this request, plus for the requests expected to follow it with
the same prefix, against the transfer time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.cost import CostModel, Link
from dualmap_pd.options import option
from dualmap_pd.request import RoutedRequest




@dataclass(frozen=True)
class MigrationConfig:
    """Limits and thresholds of prefix migration (the help texts document each knob)."""

    max_per_instance: int = option(
        2, "concurrent migrations an instance may take part in (as source or target)"
    )
    max_bytes_in_flight: int = option(
        16 * 2**30, "KV bytes of all planned or running migrations together, cluster-wide"
    )
    min_blocks: int = option(2, "never copy fewer missing blocks than this (not worth a round trip)")
    min_gain_ratio: float = option(
        2.0, "copy only if the prefill time it saves is at least this many times the transfer time"
    )
    horizon_s: float = option(
        10.0, "future requests with the prefix expected within this many seconds count as saved work"
    )
    stale_after_s: float = option(
        120.0, "a plan neither finished nor failed after this long is dropped (its executor is gone)"
    )
    rate_smoothing_s: float = option(10.0, "time constant of the arrival-rate estimate (seconds)")
    transfer_smoothing: float = option(
        0.3, "weight of a measured migration in the running measured/modelled transfer-time ratio"
    )

    def validate(self) -> MigrationConfig:
        if self.max_per_instance < 1:
            raise ValueError(f"max_per_instance must be >= 1, got {self.max_per_instance}")
        if self.max_bytes_in_flight <= 0:
            raise ValueError(f"max_bytes_in_flight must be positive, got {self.max_bytes_in_flight}")
        if self.min_blocks < 1:
            raise ValueError(f"min_blocks must be >= 1, got {self.min_blocks}")
        for name in ("min_gain_ratio", "horizon_s", "stale_after_s", "rate_smoothing_s", "transfer_smoothing"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self


@dataclass(frozen=True)
class MigrationPlan:
    """Copy the leading ``block_hashes`` of a prompt from ``source`` to ``target``.

    The target already holds (or is already receiving) the first ``have_blocks``; the rest are
    what moves. ``request_id`` names the request whose prompt carries the prefix: the live runner
    takes the prefix's token ids from it.
    """

    plan_id: int
    source: str
    target: str
    request_id: str
    block_hashes: tuple[int, ...]
    have_blocks: int
    block_size: int
    nbytes: int
    planned_at: float
    transfer_s: float  # modelled link time of the missing blocks
    saving_s: float  # modelled prefill time saved (this request and expected followers)

    @property
    def prefix_tokens(self) -> int:
        return len(self.block_hashes) * self.block_size

    @property
    def missing_hashes(self) -> tuple[int, ...]:
        return self.block_hashes[self.have_blocks :]

    @property
    def missing_blocks(self) -> int:
        return len(self.block_hashes) - self.have_blocks


@dataclass
class MigrationStats:
    planned: int = 0
    started: int = 0
    finished: int = 0
    failed: int = 0
    expired: int = 0
    bytes_moved: int = 0
    blocks_moved: int = 0
    failures: Counter[str] = field(default_factory=Counter)


@dataclass
class _InFlight:
    plan: MigrationPlan
    ready_at: float  # when its blocks are expected on the target
    began_at: float  # planned, then started
    started: bool = False


class MigrationPlanner:
    """Decides which prefix copies pay off, and tracks the ones in flight."""

    def __init__(self, cost: CostModel, config: MigrationConfig | None = None, link: Link | None = None) -> None:
        self.cost = cost
        self.config = (config or MigrationConfig()).validate()
        self.link = link or cost.profile.link
        self.stats = MigrationStats()
        self._inflight: dict[int, _InFlight] = {}
        self._per_instance: Counter[str] = Counter()
        self._bytes_in_flight = 0
        # target -> block hash -> (expected ready time, plan id) of blocks on their way there.
        self._arriving: dict[str, dict[int, tuple[float, int]]] = {}
        self._next_id = 0
        # Arrival-rate estimate (requests/s), exponentially smoothed over rate_smoothing_s.
        self._rate = 0.0
        self._last_arrival: float | None = None
        # Measured / modelled migration time (live: two engine round trips on top of the link;
        # 1.0 until a migration was measured), so waits and go/no-go use what copies really take.
        self.transfer_scale = 1.0
        self._transfers_seen = 0

    # -- queries (pure) ---------------------------------------------------------------------
    @property
    def bytes_in_flight(self) -> int:
        return self._bytes_in_flight

    @property
    def arrival_rate(self) -> float:
        return self._rate

    def in_flight(self) -> list[MigrationPlan]:
        return [f.plan for f in self._inflight.values()]

    def busy(self, instance: str) -> int:
        """Migrations ``instance`` takes part in now (as source or target)."""
        return self._per_instance[instance]

    def _arriving_run(self, req: RoutedRequest, instance: str, view: ClusterView) -> tuple[int, int, float, float]:
        """(cached leading blocks, cached-or-arriving leading blocks, latest ready time and
        latest start of the copies bringing the arriving ones)."""
        cached = view.request_hit_blocks(req, instance)
        arriving = self._arriving.get(instance)
        if not arriving:
            return cached, cached, 0.0, 0.0
        # A tight loop: a copied prefix can be a thousand blocks, and each plan's blocks share
        # one ready time, so plans are priced once after the walk.
        hashes, have = req.block_hashes, view[instance].cached_blocks
        get, end = arriving.get, len(hashes)
        plans: dict[int, float] = {}
        n = cached
        while n < end:
            h = hashes[n]
            hit = get(h)
            if hit is not None:
                plans[hit[1]] = hit[0]
            elif h not in have:  # not arriving and not arrived part-way (live events): stop
                break
            n += 1
        ready, began = 0.0, 0.0
        for plan_id, at in plans.items():
            ready = max(ready, at)
            entry = self._inflight.get(plan_id)
            if entry is not None:
                began = max(began, entry.began_at)
        return cached, n, ready, began

    def _wait_deadline(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> tuple[int, int, float | None]:
        """(cached, reachable, time until which waiting for the arriving blocks beats recomputing
        them, or None). On time: the expected landing, if the wait is shorter than recomputing.
        Late (its expected time passed, no word yet): wait at most what recomputing would have
        cost, counted from the copy's start, then recompute (a wait bounded by the alternative's
        cost, whatever the copy really takes)."""
        cached, reachable, ready, began = self._arriving_run(req, instance, view)
        if reachable == cached:
            return cached, reachable, None
        recompute = self.cost.per_token_prefill(instance) * (reachable - cached) * view.block_size
        if ready > now:
            return cached, reachable, ready if ready - now < recompute else None
        deadline = began + recompute
        return cached, reachable, deadline if deadline > now else None

    def expected_hit_blocks(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> int:
        """Leading blocks of ``req`` that ``instance`` will serve from cache: its cached ones,
        plus blocks still arriving if waiting for them beats recomputing them."""
        cached, reachable, deadline = self._wait_deadline(req, instance, view, now)
        return reachable if deadline is not None else cached

    def hold_until(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> float | None:
        """If ``req`` should wait in the queue for a copy still on its way to ``instance``, the
        time until which it waits (the executor dispatches again when the copy lands or fails);
        None if it may be dispatched now."""
        return self._wait_deadline(req, instance, view, now)[2]

    def is_in_flight(self, plan_id: int) -> bool:
        return plan_id in self._inflight

    def expected_uses(self, target_share: float) -> float:
        """Requests expected to use a prefix copy: the one being placed, plus the followers with
        the same prefix that reach the target within the horizon (``target_share`` of all
        arrivals)."""
        return 1.0 + target_share * self._rate * self.config.horizon_s

    def propose(
        self, req: RoutedRequest, target: str, view: ClusterView, now: float, target_share: float = 0.0
    ) -> MigrationPlan | None:
        """A copy of ``req``'s shared prefix to ``target`` if one pays off within the limits.

        ``target_share`` is the fraction of all arrivals expected to carry the prefix to the
        target (the policy derives it from the hot-prefix detector); it prices the followers
        that will use the copy too."""
        cfg = self.config
        st = view.get(target)
        if st is None or not st.eligible or st.role is not Role.PREFILL:
            return None
        if self._per_instance[target] >= cfg.max_per_instance:
            return None
        _, have, _, _ = self._arriving_run(req, target, view)
        busy = self._per_instance
        full = [name for name, n in busy.items() if n >= cfg.max_per_instance]
        best, holders = view.longest_run(req.block_hashes, exclude=[target, *full])
        if best < have + cfg.min_blocks:
            return None
        source = min(holders)  # among equal runs the smallest name: never the index's order
        missing_tokens = (best - have) * view.block_size
        nbytes = self.cost.kv_bytes(missing_tokens)
        if self._bytes_in_flight + nbytes > cfg.max_bytes_in_flight:
            return None
        transfer = self.transfer_time(nbytes)
        saving = self.cost.per_token_prefill(target) * missing_tokens * self.expected_uses(target_share)
        if saving < cfg.min_gain_ratio * transfer:
            return None
        return MigrationPlan(
            plan_id=self._next_id + 1,
            source=source,
            target=target,
            request_id=req.request_id,
            block_hashes=tuple(req.block_hashes[:best]),
            have_blocks=have,
            block_size=view.block_size,
            nbytes=nbytes,
            planned_at=now,
            transfer_s=transfer,
            saving_s=saving,
        )

    def transfer_time(self, nbytes: int) -> float:
        """Expected time of a copy of ``nbytes``: the link model, recalibrated by measurements."""
        return self.link.transfer_time(nbytes) * self.transfer_scale

    def achievable_hit_blocks(
        self, req: RoutedRequest, target: str, view: ClusterView, now: float, target_share: float = 0.0
    ) -> int:
        """Leading blocks ``target`` would serve from cache if ``req`` went there: those it
        holds or expects, or the prefix a worthwhile copy would bring."""
        have = self.expected_hit_blocks(req, target, view, now)
        plan = self.propose(req, target, view, now, target_share)
        return max(have, len(plan.block_hashes)) if plan is not None else have

    # -- hooks (state changes, after the decision) ------------------------------------------
    def observe_arrival(self, now: float) -> None:
        """A request was admitted (feeds the arrival-rate estimate); also expires lost plans."""
        last = self._last_arrival
        self._last_arrival = now
        if last is not None:
            gap = max(now - last, 1e-6)
            tau = max(self.config.rate_smoothing_s, 1e-6)
            # Each arrival adds 1/tau and the estimate decays over the gap (an exponentially
            # weighted count): simultaneous arrivals, common in traces, do not blow it up.
            w = min(1.0, gap / tau)
            self._rate = (1 - w) * self._rate + w / gap
        self._expire(now)

    def on_planned(self, plan: MigrationPlan, now: float) -> None:
        """The router emitted ``plan``: its blocks count as arriving, it counts against limits."""
        if plan.plan_id in self._inflight:
            raise ValueError(f"migration plan {plan.plan_id} planned twice")
        self._next_id = max(self._next_id, plan.plan_id)
        self._inflight[plan.plan_id] = _InFlight(plan, now + plan.transfer_s, now)
        self._per_instance[plan.source] += 1
        self._per_instance[plan.target] += 1
        self._bytes_in_flight += plan.nbytes
        arriving = self._arriving.setdefault(plan.target, {})
        for h in plan.missing_hashes:
            arriving.setdefault(h, (now + plan.transfer_s, plan.plan_id))
        self.stats.planned += 1

    def on_started(self, plan: MigrationPlan, now: float, expected_ready_at: float | None = None) -> None:
        """The executor began the copy (it may land later than planned if its link is busy)."""
        entry = self._inflight.get(plan.plan_id)
        if entry is None or entry.started:
            return
        entry.started = True
        entry.began_at = now
        entry.ready_at = expected_ready_at if expected_ready_at is not None else now + self.transfer_time(plan.nbytes)
        arriving = self._arriving.get(plan.target, {})
        for h in plan.missing_hashes:
            if arriving.get(h, (0.0, -1))[1] == plan.plan_id:
                arriving[h] = (entry.ready_at, plan.plan_id)
        self.stats.started += 1

    def on_finished(
        self, plan: MigrationPlan, now: float, bytes_moved: int | None = None, seconds: float | None = None
    ) -> None:
        """The copy landed: the target's cache index learns of the blocks from the engine (KV
        events live, the simulated engine in the simulator), so only the bookkeeping goes.
        ``seconds``, when measured, recalibrates the expected transfer time."""
        if seconds is not None and seconds > 0:
            modelled = self.link.transfer_time(plan.nbytes)
            if modelled > 0:
                ratio = seconds / modelled
                w = self.config.transfer_smoothing
                self.transfer_scale = ratio if self._transfers_seen == 0 else (1 - w) * self.transfer_scale + w * ratio
                self._transfers_seen += 1
        if self._release(plan):
            self.stats.finished += 1
            self.stats.bytes_moved += plan.nbytes if bytes_moved is None else bytes_moved
            self.stats.blocks_moved += plan.missing_blocks

    def on_failed(self, plan: MigrationPlan, now: float, reason: str) -> None:
        """The copy did not happen; requests waiting for it recompute."""
        if self._release(plan):
            self.stats.failed += 1
            self.stats.failures[reason] += 1

    def _release(self, plan: MigrationPlan) -> bool:
        entry = self._inflight.pop(plan.plan_id, None)
        if entry is None:
            return False
        self._per_instance[plan.source] -= 1
        self._per_instance[plan.target] -= 1
        for name in (plan.source, plan.target):
            if self._per_instance[name] <= 0:
                del self._per_instance[name]
        self._bytes_in_flight -= plan.nbytes
        arriving = self._arriving.get(plan.target)
        if arriving is not None:
            for h in plan.missing_hashes:
                if arriving.get(h, (0.0, -1))[1] == plan.plan_id:
                    del arriving[h]
            if not arriving:
                del self._arriving[plan.target]
        return True

    def _expire(self, now: float) -> None:
        limit = self.config.stale_after_s
        stale = [f.plan for f in self._inflight.values() if now - f.plan.planned_at > limit]
        for plan in stale:
            if self._release(plan):
                self.stats.expired += 1
