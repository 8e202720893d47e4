"""Runtime membership of the prefill and decode pools: add, drain, undrain, remove.

Used by the admin API (scheduler/http/admin.py) and the config-file watcher
(scheduler/membership/config_watch.py). Everything runs on the Scheduler's event loop, like the router.

- add: the instance joins the view (and so the rings: only the arcs next to its points move);
  its KV events and /metrics are subscribed when the running intake has such services. An
  instance that does not answer /health yet joins as unhealthy and takes work once the health
  loop sees it up.
- drain: the instance takes no new work. Requests waiting in its scheduler-side queue are taken
  back and re-admitted at once, so they fall to their backup candidate (none is lost); requests
  already sent to its engine finish there.
- remove: at once when the instance is idle; otherwise it is drained and removed as soon as it
  becomes idle (``force`` removes at once: what its engine is still doing may then fail).
- undrain: takes work again (and cancels a pending removal).

Every change is counted by kind and measured: the fraction of recently routed prefixes whose
candidate pair changed (dualmap_pd/churn.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from dualmap_pd.churn import CandidateChurnTracker, ChurnReport
from dualmap_pd.cluster import InstanceState, Role
from dualmap_pd.policies.dualmap import DualMapConfig, DualMapPolicy
from dualmap_pd.request import RoutedRequest
from scheduler.config import ConfigError, InstanceConfig
from scheduler.http.errors import ApiError
from scheduler.membership.metrics import MembershipMetrics

if TYPE_CHECKING:
    from scheduler.membership.config_watch import ConfigWatcher
    from scheduler.ports import PoolHost

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 0.5  # how often instances waiting for removal are checked for idleness


def unknown_instance(name: str) -> ApiError:
    return ApiError(404, f"no instance named {name!r}", param="name", code="instance_not_found",
                    kind="admin_unknown_instance")  # fmt: skip


def membership_conflict(message: str, param: str | None = None) -> ApiError:
    return ApiError(409, message, param=param, code="membership_conflict", kind="admin_conflict")


class IntakeFollower:
    """Keeps the running intake (KV-event subscribers, the /metrics poller) in step with the
    membership: a new instance gets what the configured ones got, a removed one loses it."""

    def __init__(self, scheduler: PoolHost) -> None:
        self._scheduler = scheduler

    async def attach(self, inst: InstanceConfig) -> None:
        from scheduler.intake.engine_metrics import EngineMetricsPoller
        from scheduler.intake.kv_events import KVEventSubscriber

        sched = self._scheduler
        services = sched.services
        for svc in services:
            if isinstance(svc, EngineMetricsPoller):
                svc.set_endpoint(inst.name, inst.url)
        subscribes = any(isinstance(svc, KVEventSubscriber) for svc in services)
        if inst.role == "prefill" and inst.kv_events_endpoint is not None and subscribes:
            await sched.add_service(KVEventSubscriber(
                inst.name, inst.kv_events_endpoint, sched.view, sched.config.block_size,
                replay_endpoint=inst.kv_events_replay_endpoint,
            ))  # fmt: skip

    async def detach(self, name: str) -> None:
        from scheduler.intake.engine_metrics import EngineMetricsPoller
        from scheduler.intake.kv_events import KVEventSubscriber

        for svc in self._scheduler.services:
            if isinstance(svc, EngineMetricsPoller):
                svc.remove_endpoint(name)
            elif isinstance(svc, KVEventSubscriber) and svc.instance == name:
                await self._scheduler.remove_service(svc)


class Membership:
    def __init__(self, scheduler: PoolHost, intake: IntakeFollower | None = None) -> None:
        self._sched = scheduler
        self._intake = intake or IntakeFollower(scheduler)
        policy = scheduler.prefill_policy
        vnodes = policy.config.vnodes if isinstance(policy, DualMapPolicy) else DualMapConfig().vnodes
        self.churn = CandidateChurnTracker(scheduler.config.admin.recent_prefixes, vnodes)
        self.metrics = MembershipMetrics(scheduler.view)
        scheduler.metrics.registry.register(self.metrics)
        self._retiring: set[str] = set()  # drained, removed once idle
        self._busy: set[str] = set()  # an add or remove is awaiting its intake change
        self._reaper: asyncio.Task[None] | None = None
        self._watcher: ConfigWatcher | None = None
        self._sync_churn()

    # -- lifecycle (with the Scheduler) -----------------------------------------------------
    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_loop(), name="dualmap-membership-reaper")
        cfg = self._sched.config
        if cfg.admin.watch_config and cfg.source is not None:
            from scheduler.membership.config_watch import ConfigWatcher

            self._watcher = ConfigWatcher(cfg.source, self, interval_s=cfg.admin.watch_interval_s)
            await self._watcher.start()

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None

    # -- observation (request path) ---------------------------------------------------------
    def observe(self, req: RoutedRequest) -> None:
        """Remember the request's routing key for churn measurement: the key DualMap routes it
        by (deeper than one block for a hot prefix, whose requests would otherwise all count as
        one key), or its first block under other policies."""
        policy = self._sched.prefill_policy
        depth = policy.hot.key_depth(req.block_hashes) if isinstance(policy, DualMapPolicy) else 1
        self.churn.record(req.routing_key(depth))

    # -- queries ----------------------------------------------------------------------------
    def _state(self, name: str) -> InstanceState:
        st = self._sched.view.get(name)
        if st is None:
            raise unknown_instance(name)
        return st

    def in_flight(self, st: InstanceState) -> int:
        """Work the instance still has: queued and engine-pending prefills, or running decodes."""
        if st.role is Role.PREFILL:
            return len(st.queue) + st.engine_pending_requests
        return st.running_requests

    def describe(self, name: str) -> dict[str, Any]:
        st = self._state(name)
        return {
            "name": st.name, "role": st.role.value, "url": self._sched.urls.get(name),
            "healthy": st.healthy, "draining": st.draining, "removing": name in self._retiring,
            "in_flight": self.in_flight(st), "queued": len(st.queue),
            "engine_pending": st.engine_pending_requests, "running": st.running_requests,
            "cached_blocks": len(st.cached_blocks),
        }  # fmt: skip

    def names(self) -> list[str]:
        return self._sched.view.names()

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(st.name) for st in self._sched.view.instances()]

    def last_churn(self) -> dict[str, Any]:
        r = self.metrics.last_report
        return {"prefixes_checked": r.checked, "prefixes_moved": r.changed, "moved_fraction": r.fraction}

    # -- changes ----------------------------------------------------------------------------
    async def add(self, inst: InstanceConfig) -> dict[str, Any]:
        sched = self._sched
        if inst.name in sched.view or inst.name in self._busy:
            raise membership_conflict(f"instance {inst.name!r} already exists", "name")
        current = getattr(sched.config, inst.role)
        try:
            new_config = sched.config.with_overrides(**{inst.role: (*current, inst)})
        except ConfigError as exc:  # a port already used by another instance, ...
            raise membership_conflict(str(exc)) from None
        healthy = sched.client is None or await sched.client.healthy(inst.url)
        if inst.name in sched.view or inst.name in self._busy:  # added while we probed
            raise membership_conflict(f"instance {inst.name!r} already exists", "name")
        self._busy.add(inst.name)
        try:
            self._sync_churn()
            sched.urls[inst.name] = inst.url
            sched.view.add_instance(inst.name, inst.role)
            sched.config = new_config
            self._changed(inst.role, "join")
            if not healthy:  # out of the candidates until a health probe lets it in
                sched.mark_unhealthy(inst.name)
            await self._intake.attach(inst)
        finally:
            self._busy.discard(inst.name)
        log.warning("membership: %s %s joined at %s (healthy=%s)", inst.role, inst.name, inst.url, healthy)
        return self.describe(inst.name)

    def drain(self, name: str) -> dict[str, Any]:
        """Stop new work; returns the instance's state and how many queued requests were
        re-admitted (to their backup candidate)."""
        st = self._state(name)
        readmitted = 0
        if not st.draining:
            self._sync_churn()
            self._sched.view.set_draining(name, True)
            self._changed(st.role.value, "drain")
            if st.role is Role.PREFILL:
                waiting = self._sched.take_queued(name)
                readmitted = len(waiting)
                self._sched.readmit_queued(waiting)
            log.warning("membership: %s draining (%d in flight, %d re-admitted elsewhere)",
                        name, self.in_flight(st), readmitted)  # fmt: skip
        return {**self.describe(name), "readmitted": readmitted}

    def undrain(self, name: str) -> dict[str, Any]:
        st = self._state(name)
        self._retiring.discard(name)
        if st.draining:
            self._sync_churn()
            self._sched.view.set_draining(name, False)
            self._changed(st.role.value, "undrain")
        return self.describe(name)

    async def remove(self, name: str, force: bool = False) -> dict[str, Any]:
        """Remove now if idle (or ``force``); else drain and remove once idle."""
        st = self._state(name)
        others = [s for s in self._sched.view.instances(st.role) if s.name != name]
        if not others:
            raise membership_conflict(f"{name} is the last {st.role.value} instance; add another first", "name")
        if name in self._busy:
            raise membership_conflict(f"{name} is being added or removed right now", "name")
        if force or self.in_flight(st) == 0:
            info = self.describe(name)
            await self._remove_now(name)
            return {**info, "status": "removed"}
        self.drain(name)
        self._retiring.add(name)
        return {**self.describe(name), "status": "removing"}

    async def _remove_now(self, name: str) -> None:
        sched = self._sched
        st = sched.view[name]
        self._busy.add(name)
        self._retiring.discard(name)
        try:
            if not st.draining:
                self.drain(name)  # no new work while the intake detaches; re-admits its queue
            await self._intake.detach(name)
            if name not in sched.view:
                return
            self._sync_churn()
            if st.role is Role.PREFILL:
                # Anything that slipped into its queue meanwhile is re-admitted; requests in its
                # engine keep their handlers, which see the engine's answer or failure.
                sched.readmit_queued(sched.take_queued(name))
                sched.evict_instance(name)
            sched.view.remove_instance(name)
            sched.urls.pop(name, None)
            sched.metrics.kv_transfer.pop(name, None)
            role = st.role.value
            remaining = tuple(i for i in getattr(sched.config, role) if i.name != name)
            if len(remaining) < len(getattr(sched.config, role)):
                sched.config = sched.config.with_overrides(**{role: remaining})
            self._changed(role, "leave")
        finally:
            self._busy.discard(name)
        log.warning("membership: %s removed", name)

    # -- internals --------------------------------------------------------------------------
    def _prefill_rings_state(self) -> tuple[list[str], set[str]]:
        view = self._sched.view
        return view.names(Role.PREFILL), view.ineligible_names(Role.PREFILL)

    def _sync_churn(self) -> ChurnReport:
        return self.churn.sync(*self._prefill_rings_state())

    def _changed(self, role: str, kind: str) -> None:
        """Count a change, let the policy see it now, and measure candidate churn."""
        self._sched.rings_changed()
        report = self._sync_churn() if role == Role.PREFILL.value else None
        self.metrics.ring_change(role, kind, report)
        if report is not None:
            log.warning("membership: %s %s moved %d of %d recent prefixes (%.1f%%)", kind, role,
                        report.changed, report.checked, 100 * report.fraction)  # fmt: skip

    async def reap(self) -> None:
        """Remove every retiring instance that has become idle."""
        for name in sorted(self._retiring):
            st = self._sched.view.get(name)
            if st is None:
                self._retiring.discard(name)
            elif self.in_flight(st) == 0 and name not in self._busy:
                await self._remove_now(name)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                await self.reap()
            except Exception:  # one failed removal must not stop the others forever
                log.exception("membership: removing a drained instance failed")
