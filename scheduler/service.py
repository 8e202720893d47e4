"""The live Scheduler: one ClusterView, the PrefillRouter (DualMap by default), a decode policy,
and the waiting room for late dispatch.

Everything here runs on one asyncio loop, so the view and the router need no locks. A request
handler calls ``acquire_prefill`` (admit; it may wait in a scheduler-side queue until
``take_dispatchable`` hands it to an instance), sends its prefill, calls ``complete_prefill``
(or ``abort_prefill``), then ``acquire_decode``/``release_decode`` around the decode leg.
``take_dispatchable`` runs after every admit and every finish, which is when a queue can move.

KV-event subscribers and the engine-metrics poller are injected (``intake``) so unit tests run
without ZMQ or real engines; ``default_intake`` builds the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from dualmap_pd.cluster import ClusterView, InstanceState, Role
from dualmap_pd.cost import CostModel, get_profile
from dualmap_pd.hashing import block_hashes, hash_block
from dualmap_pd.migration import Endpoint
from dualmap_pd.policies import DECODE_POLICIES, PREFILL_POLICIES, PolicyContext
from dualmap_pd.policies.decode import decode_load
from dualmap_pd.request import Decision, NoInstanceError, RoutedRequest
from dualmap_pd.router import DispatchLimits, PrefillRouter
from scheduler.http import errors
from scheduler.config import ClusterConfig, SchedulerOptions
from scheduler.intake.health import BreakerPolicy, HealthMonitor
from scheduler.dispatch.migration_runner import (
    MigrationMetrics, MigrationRunner, MigrationRunnerOptions, build_migrator,
)
from scheduler.membership.registry import Membership
from scheduler.dispatch.pd_client import PDClient
from scheduler.ports import BackgroundService
from scheduler.prom import KVTransferTotals, SchedulerMetrics
from scheduler.dispatch.tokenization import PromptTokenizer

if TYPE_CHECKING:
    from scheduler.intake.engine_metrics import EngineSnapshot

log = logging.getLogger(__name__)
# A scrape can fail once under load; three in a row (3 s at the poller's 1 s cadence) is down.
UNHEALTHY_AFTER_FAILED_SCRAPES = 3


IntakeFactory = Callable[["Scheduler"], Sequence[BackgroundService]]


class Scheduler:
    def __init__(
        self,
        config: ClusterConfig,
        tokenizer: PromptTokenizer,
        *,
        options: SchedulerOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        intake: IntakeFactory | None = None,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.config = config
        self.options = options or SchedulerOptions.from_config(config)
        self.tokenizer = tokenizer
        self.clock = clock
        self.view = ClusterView(config.block_size)
        self.urls: dict[str, str] = {}
        for inst in config.instances:
            self.view.add_instance(inst.name, inst.role)
            self.urls[inst.name] = inst.url
        opts = self.options
        self.cost = CostModel(get_profile(opts.cost_profile))
        self.ctx = PolicyContext(self.cost, slo_ttft=opts.slo_ttft, seed=opts.seed)
        self.prefill_policy = PREFILL_POLICIES.create(opts.prefill_policy, self.ctx)
        self.decode_policy = DECODE_POLICIES.create(opts.decode_policy, self.ctx)
        self.router = PrefillRouter(
            self.prefill_policy, self.view, DispatchLimits(max_engine_pending=opts.max_engine_pending)
        )
        self.metrics = metrics or SchedulerMetrics()
        self.metrics.watch_view(self.view, self.estimated_ttft)
        self._intake_factory = intake
        self._services: list[BackgroundService] = []
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self.health = HealthMonitor(
            self._health_targets, self._probe, on_open=self._leave_rings, on_close=self._rejoin,
            policy=BreakerPolicy(
                failure_threshold=opts.health_failure_threshold,
                open_s=opts.health_interval_s if opts.health_open_s is None else opts.health_open_s,
                probe_interval_s=opts.health_interval_s,
            ),
            clock=clock,
        )  # fmt: skip
        self.metrics.registry.register(self.health.collector())
        self.membership = Membership(self)  # runtime add/drain/remove (admin API, config watch)
        # Executes the policy's prefix-migration plans (None: off, and the policy plans none).
        self.migrations = self._build_migration_runner(
            MigrationRunnerOptions(opts.migration_backend, opts.migration_timeout_s)
        )
        # Request ids unique across restarts and replicas without a per-request uuid4.
        self._id_prefix = f"dm-{os.getpid():x}-{int(time.time() * 1000) & 0xFFFFFF:x}-"
        self._seq = 0
        self.started_wall = time.time()  # /v1/models "created"
        self.client: PDClient | None = None  # created in start(): it needs a running loop
        # NIXL totals of engine processes that have since restarted (their counters reset).
        self._kv_transfer_before: dict[str, KVTransferTotals] = {}

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self.client = PDClient(self.options)
        if self._intake_factory is not None:
            self._services = list(self._intake_factory(self))
        if self.migrations is not None:
            self._services.append(self.migrations)
        for svc in self._services:
            await svc.start()
        await self.health.start()
        await self.membership.start()

    async def stop(self) -> None:
        await self.membership.stop()
        await self.health.stop()
        for svc in reversed(self._services):
            try:
                await svc.stop()
            except Exception:  # one failing stop must not leave the others running
                log.exception("stopping %r failed", svc)
        self._services = []
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(errors.no_instance("prefill"))
        self._waiters.clear()
        if self.client is not None:
            await self.client.close()
            self.client = None

    # -- requests ---------------------------------------------------------------------------
    def new_request(self, prompt_ids: list[int], max_tokens: int | None, arrival: float) -> RoutedRequest:
        self._seq += 1
        bs = self.view.block_size
        hashes = block_hashes(prompt_ids, bs)
        req = RoutedRequest(
            request_id=f"{self._id_prefix}{self._seq}",
            prompt_tokens=len(prompt_ids),
            block_hashes=hashes,
            block_size=bs,
            arrival=arrival,
            # Prompts under one block have no block hash; route them by all their tokens.
            fallback_key=0 if hashes else hash_block(None, prompt_ids),
            expected_output_tokens=max_tokens,
        )
        if self.migrations is not None:  # a plan's prefix tokens are cut from this prompt
            self.migrations.remember(req, prompt_ids)
        return req

    async def acquire_prefill(self, req: RoutedRequest) -> str:
        """Admit ``req`` and wait until it may go to its prefill instance; returns the name.

        If the caller is cancelled (client gone) while waiting or right after dispatch, the
        request leaves the router so it holds no queue or engine slot."""
        rid = req.request_id
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        now = self.clock()
        try:
            decision = self.router.admit(req, now)
        except NoInstanceError:
            del self._waiters[rid]
            raise errors.no_instance("prefill") from None
        self.metrics.decision("prefill", decision.branch)
        self.membership.observe(req)
        self.dispatch_ready(now)
        try:
            return await fut
        except BaseException:
            self._waiters.pop(rid, None)
            self.abort_prefill(req)
            raise

    def dispatch_ready(self, now: float | None = None) -> None:
        """Hand every dispatchable queued request to its waiting handler (called after every
        routing event: admit, finish, a copy landing, an instance coming back)."""
        if now is None:
            now = self.clock()
        if self.migrations is not None:
            self.migrations.submit(self.router.take_migrations())
        while True:
            released = False
            for req, instance in self.router.take_dispatchable(now):
                fut = self._waiters.pop(req.request_id, None)
                if fut is None or fut.done():
                    # Its handler is gone; free the engine slot it was just given.
                    self.router.finish_prefill(req.request_id, now)
                    released = True
                    continue
                self.metrics.queue_wait_series.observe(max(0.0, now - req.enqueued_at))
                fut.set_result(instance)
            if not released:
                return

    def predicted_hit_tokens(self, instance: str, req: RoutedRequest) -> int:
        """Prompt tokens the engine should find cached. vLLM always computes at least the last
        prompt token, so a fully cached prompt hits one block less."""
        hit = self.view.hit_tokens(instance, req.block_hashes)
        bs = self.view.block_size
        return min(hit, (req.prompt_tokens - 1) // bs * bs)

    def complete_prefill(self, req: RoutedRequest, instance: str, seconds: float,
                         predicted_hit: int, engine_hit: int | None) -> None:  # fmt: skip
        now = self.clock()
        self.router.finish_prefill(req.request_id, now)
        cached = engine_hit if engine_hit is not None else predicted_hit
        self.cost.observe_prefill(instance, req.prompt_tokens - cached, cached, seconds)
        self.metrics.prefill_done(instance, seconds, req.prompt_tokens, predicted_hit, engine_hit)
        if self.migrations is not None:
            self.migrations.note_prefill(req, instance, cached)
        self.dispatch_ready(now)

    def abort_prefill(self, req: RoutedRequest) -> None:
        """The prefill failed or its client left: release its queue or engine slot."""
        now = self.clock()
        if self.router.finish_prefill(req.request_id, now) is not None:
            self.dispatch_ready(now)

    def acquire_decode(self, req: RoutedRequest, avoid: Collection[str] = ()) -> tuple[str, int]:
        """Pick the decode instance and count the request's load on it until release.
        ``avoid``: decoders that just failed this request; the least loaded other one is taken
        instead when the policy picks one of them (a failure under the circuit's threshold
        leaves a decoder eligible)."""
        try:
            decision = self.decode_policy.select(req, self.view, self.clock())
        except NoInstanceError:
            raise errors.no_instance("decode") from None
        if decision.instance in avoid:
            others = [st for st in self.view.eligible(Role.DECODE) if st.name not in avoid]
            if others:
                decision = Decision(min(others, key=decode_load).name, "retry_elsewhere")
        self.decode_policy.on_decision(req, decision, self.view, self.clock())
        self.metrics.decision("decode", decision.branch)
        # The KV the request may come to hold: its prompt plus its whole output budget.
        load = req.prompt_tokens + (req.expected_output_tokens or 0)
        st = self.view[decision.instance]
        st.running_requests += 1
        st.active_tokens += load
        return decision.instance, load

    def release_decode(self, instance: str, load: int) -> None:
        st = self.view.get(instance)
        if st is not None:
            st.running_requests = max(0, st.running_requests - 1)
            st.active_tokens = max(0, st.active_tokens - load)

    # -- health -----------------------------------------------------------------------------
    def mark_unhealthy(self, instance: str, reason: str = "unreachable") -> None:
        """Open the instance's circuit now (it comes back through a half-open probe)."""
        self.health.report_failure(instance, reason, hard=True)

    def _leave_rings(self, instance: str) -> None:
        """Its circuit opened: route around it, re-admit what waited for it, and cut the prefills
        it is running so their handlers retry them on the backup candidate now rather than at
        their timeout (a prefill leg is safe to repeat: the client has seen nothing yet)."""
        st = self.view.get(instance)
        if st is None or not st.healthy:
            return
        queued_ids = {item[2] for item in st.queue} if st.role is Role.PREFILL else set()
        self.view.set_health(instance, False)
        if st.role is not Role.PREFILL:
            return
        evicted = self.router.evict_instance(instance, self.clock())
        # Requests already in the engine are not re-admitted here: their own handlers see the
        # failure (or the abort below) and retry.
        self.readmit_queued([req for req in evicted if req.request_id in queued_ids])
        if self.client is not None and instance in self.urls:
            self.client.abort_active(self.urls[instance])

    def _rejoin(self, instance: str) -> None:
        if instance in self.view:
            self.view.set_health(instance, True)
            self.dispatch_ready()

    def _health_targets(self) -> dict[str, str]:
        return {name: self.urls[name] for name in self.view.names() if name in self.urls}

    async def _probe(self, url: str) -> bool:
        return self.client is not None and await self.client.healthy(url)

    def on_engine_snapshot(self, snap: EngineSnapshot) -> None:
        """One /metrics scrape of an engine (from the poller)."""
        if not snap.ok:
            if snap.consecutive_failures >= UNHEALTHY_AFTER_FAILED_SCRAPES:
                self.mark_unhealthy(snap.instance, "metrics_scrape")
            return
        if snap.restarted:
            # A new engine process: its counters start from zero again. Keep ours cumulative.
            log.warning("engine %s restarted (new process); its totals continue from here", snap.instance)
            self.metrics.engine_restarts.inc((snap.instance,))
            self._kv_transfer_before[snap.instance] = self.metrics.kv_transfer.get(snap.instance, KVTransferTotals())
        if snap.nixl_bytes_transferred_sum is not None:
            before = self._kv_transfer_before.get(snap.instance, KVTransferTotals())
            self.metrics.kv_transfer[snap.instance] = KVTransferTotals(
                bytes=before.bytes + snap.nixl_bytes_transferred_sum,
                seconds=before.seconds + (snap.nixl_xfer_time_sum or 0.0),
                transfers=before.transfers + (snap.nixl_transfers or 0.0),
            )

    # -- views ------------------------------------------------------------------------------
    def estimated_ttft(self, st: InstanceState) -> float:
        return self.prefill_policy.estimated_ttft(st, 0)

    # -- runtime membership (scheduler.membership.registry) -------------------------------------------
    @property
    def services(self) -> tuple[BackgroundService, ...]:
        return tuple(self._services)

    async def add_service(self, svc: BackgroundService) -> None:
        """Start and own one more intake service (an instance joined at runtime)."""
        await svc.start()
        self._services.append(svc)

    async def remove_service(self, svc: BackgroundService) -> None:
        if svc in self._services:
            self._services.remove(svc)
            await svc.stop()

    def readmit_queued(self, reqs: Sequence[RoutedRequest]) -> None:
        """Re-admit requests taken out of a queue (their instance is draining or gone): they
        fall to their backup candidate. A request no instance can take fails with 503."""
        now = self.clock()
        for req in reqs:
            fut = self._waiters.get(req.request_id)
            if fut is None or fut.done():
                continue  # its client is gone
            try:
                self.router.admit(req, now)
            except NoInstanceError:
                self._waiters.pop(req.request_id, None)
                fut.set_exception(errors.no_instance("prefill"))
        self.dispatch_ready(now)

    def take_queued(self, instance: str) -> list[RoutedRequest]:
        """Take back the requests waiting in a (draining or leaving) instance's queue."""
        return self.router.take_queued(instance)

    def evict_instance(self, instance: str) -> None:
        """Forget what the router holds for an instance that left."""
        self.router.evict_instance(instance, self.clock())

    def rings_changed(self) -> None:
        """Membership changed: let the policy see the new pools now."""
        self.router.sync_membership()

    def instance_url(self, name: str) -> str:
        return self.urls[name]

    # -- wiring -----------------------------------------------------------------------------
    def _build_migration_runner(self, options: MigrationRunnerOptions) -> MigrationRunner | None:
        """The runner of the policy's prefix-migration plans, or None with planning turned off
        (no backend, or a policy that does not migrate). Raises MigrationError for a backend
        unusable here."""
        policy = self.prefill_policy
        planner = policy.migration
        if not options.enabled or planner is None:
            policy.disable_migration()  # nobody would execute its plans: plan none, hold none
            return None
        cfg = self.config
        migrator = build_migrator(options.backend.strip(), cfg.served_model_name, cfg.block_size, options.timeout_s)
        metrics = MigrationMetrics(planner, self.view)
        self.metrics.registry.register(metrics)

        def endpoint(name: str) -> Endpoint | None:
            url = self.urls.get(name)
            return Endpoint(name, url) if url is not None else None

        def healthy(name: str) -> bool:
            st = self.view.get(name)
            return st is not None and st.healthy

        return MigrationRunner(
            planner, migrator, endpoint, self.dispatch_ready, metrics,
            options=options, clock=self.clock, healthy=healthy,
        )  # fmt: skip


def default_intake(kv_events: bool = True, engine_metrics: bool = True) -> IntakeFactory:
    """The real intake: one KV-event subscriber per prefill instance that publishes events,
    and the engine-metrics poller (both from scheduler.intake.kv_events / scheduler.intake.engine_metrics)."""

    def build(scheduler: Scheduler) -> list[BackgroundService]:
        cfg = scheduler.config
        services: list[BackgroundService] = []
        if kv_events:
            from scheduler.intake.kv_events import KVEventSubscriber

            for inst in cfg.prefill:
                if inst.kv_events_endpoint is None:
                    continue
                services.append(KVEventSubscriber(
                    inst.name, inst.kv_events_endpoint, scheduler.view, cfg.block_size,
                    replay_endpoint=inst.kv_events_replay_endpoint,
                ))  # fmt: skip
        if engine_metrics:
            services.extend(engine_metrics_services(scheduler))
        return services

    return build


def engine_metrics_services(scheduler: Scheduler) -> list[BackgroundService]:
    """The engines' /metrics poller: load (kv usage) into the view, NIXL totals into our
    /metrics, and repeated scrape failures into instance health."""
    from scheduler.intake.engine_metrics import EngineMetricsPoller

    cfg = scheduler.config
    poller = EngineMetricsPoller(
        scheduler.view, {inst.name: inst.url for inst in cfg.instances},
        model_name=cfg.served_model_name,
    )  # fmt: skip
    poller.add_listener(scheduler.on_engine_snapshot)
    return [poller]
