"""Executes the prefix-migration plans of the prefill policy with a real ``PrefixMigrator``.

The policy (dualmap_pd/policies/migration.py) decides; the router emits plans; this runner takes
them after every routing event (``Scheduler.dispatch_ready``), runs each as its own task through the
backend named in the options (an entry point of ``dualmap_pd.migrators``: ``nixl``, ``lmcache``;
this package never imports connectors/), and reports back to the planner: ``on_started``, then
``on_finished`` or ``on_failed``. After either, the scheduler dispatches again, so requests held
for the copy go out (to hit it, or to recompute if it failed).

On success nothing is written into the view: the target engine publishes BlockStored for the
pulled blocks and the KV-event intake indexes them, so the index only ever says what an engine
says. A plan names a request and its prefix's block hashes; the token ids come from the prompt
of that request, remembered when the request was created (``remember``; bounded, oldest first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dualmap_pd.migration import Endpoint, MigrationError, MigrationResult, PrefixMigrator, load_migrator_class
from dualmap_pd.policies.migration import MigrationPlan, MigrationPlanner
from dualmap_pd.request import RoutedRequest
from scheduler.prom import Counter, Histogram

if TYPE_CHECKING:
    from dualmap_pd.cluster import ClusterView

log = logging.getLogger(__name__)

MIGRATION_BACKENDS_OFF = ("", "off", "none")
# A migration is two engine round trips plus a NIXL pull: 10 ms .. 2 min.
SETTLE_POLL_S = 0.05  # re-dispatch cadence while a copy runs (held requests' waits may end)
MIGRATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class MigrationRunnerOptions:
    backend: str = "off"  # entry-point name of the PrefixMigrator (nixl, lmcache), or off
    timeout_s: float = 30.0  # a whole migration; beyond it the copy counts as failed
    remembered_prompts: int = 1024  # prompts kept for their token ids (most recent; 4 B/token)

    @property
    def enabled(self) -> bool:
        return self.backend.strip().lower() not in MIGRATION_BACKENDS_OFF


class PromptMemory:
    """Token ids of the most recent prompts, by request id (what a plan's prefix is cut from)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # Packed: a plan's request is one admitted moments ago, but a list of Python ints would
        # cost ~36 B a token for every remembered prompt.
        self._prompts: OrderedDict[str, array[int]] = OrderedDict()

    def remember(self, request_id: str, prompt_ids: Sequence[int]) -> None:
        self._prompts[request_id] = array("I", prompt_ids)
        self._prompts.move_to_end(request_id)
        while len(self._prompts) > self.capacity:
            self._prompts.popitem(last=False)

    def prefix(self, plan: MigrationPlan) -> list[int] | None:
        prompt = self._prompts.get(plan.request_id)
        if prompt is None or len(prompt) < plan.prefix_tokens:
            return None
        return prompt[: plan.prefix_tokens].tolist()

    def __len__(self) -> int:
        return len(self._prompts)


class MigrationMetrics(Collector):
    """Prometheus families of prefix migration (registered on the scheduler's registry)."""

    def __init__(self, planner: MigrationPlanner, view: ClusterView) -> None:
        self.planner = planner
        self.view = view
        self.started = Counter("dualmap_migrations_started", "Prefix migrations started", ("source", "target"))
        self.finished = Counter("dualmap_migrations_finished", "Prefix migrations that landed", ("source", "target"))
        self.failed = Counter("dualmap_migrations_failed", "Prefix migrations that failed (requests recompute)",
                              ("source", "target", "reason"))  # fmt: skip
        self.bytes = Counter("dualmap_migration_bytes", "KV bytes moved by prefix migrations", ("source", "target"))
        self.seconds = Histogram("dualmap_migration_seconds", "Wall time of a prefix migration", ("outcome",),
                                 MIGRATION_BUCKETS)  # fmt: skip
        self.migrated_hits = Counter("dualmap_migrated_hit_tokens",
                                     "Prompt tokens served from blocks a migration brought", ("instance",))  # fmt: skip
        # instance -> last block hash of each prefix copied there (replicated while still cached).
        self.replicated: dict[str, set[int]] = {}

    def collect(self) -> Iterator[Metric]:
        yield from (c.family() for c in (self.started, self.finished, self.failed, self.bytes, self.migrated_hits))
        yield self.seconds.family()
        rep = GaugeMetricFamily("dualmap_migration_prefixes_replicated",
                                "Prefixes copied to an instance by migration that it still caches", labels=["instance"])  # fmt: skip
        for name, keys in sorted(self.replicated.items()):
            st = self.view.get(name)
            held = st.cached_blocks if st is not None else set()
            rep.add_metric([name], sum(1 for k in keys if k in held))
        yield rep
        yield GaugeMetricFamily("dualmap_migrations_in_flight", "Prefix migrations planned or running",
                                value=len(self.planner.in_flight()))  # fmt: skip
        yield GaugeMetricFamily("dualmap_migration_bytes_in_flight", "KV bytes of migrations planned or running",
                                value=self.planner.bytes_in_flight)  # fmt: skip


class MigrationRunner:
    """Runs plans as tasks on the scheduler's loop; a BackgroundService (start/stop)."""

    def __init__(
        self,
        planner: MigrationPlanner,
        migrator: PrefixMigrator,
        endpoint: Callable[[str], Endpoint | None],
        on_settled: Callable[[], None],
        metrics: MigrationMetrics,
        *,
        options: MigrationRunnerOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        healthy: Callable[[str], bool] = lambda name: True,
    ) -> None:
        self.planner = planner
        self.migrator = migrator
        self.endpoint = endpoint
        self.on_settled = on_settled
        self.metrics = metrics
        self.options = options or MigrationRunnerOptions()
        self.clock = clock
        self.healthy = healthy
        self.prompts = PromptMemory(self.options.remembered_prompts)
        self._tasks: set[asyncio.Task[None]] = set()
        # instance -> block hashes migrations brought there (for hits served from them).
        self._migrated: dict[str, set[int]] = {}
        self._stopped = False
        # The backend's last answers (its timings per leg, for logs and diagnosis).
        self.recent: deque[MigrationResult] = deque(maxlen=32)

    # -- scheduler hooks --------------------------------------------------------------------
    def remember(self, req: RoutedRequest, prompt_ids: Sequence[int]) -> None:
        self.prompts.remember(req.request_id, prompt_ids)

    def submit(self, plans: Sequence[MigrationPlan]) -> None:
        """Start every plan (called with ``router.take_migrations()`` after routing events)."""
        for plan in plans:
            if self._stopped:
                self._fail(plan, "scheduler_stopping", 0.0)
                continue
            task = asyncio.get_running_loop().create_task(self._run(plan), name=f"migration-{plan.plan_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def note_prefill(self, req: RoutedRequest, instance: str, hit_tokens: int) -> None:
        """A prefill finished with ``hit_tokens`` from cache: count those from migrated blocks."""
        migrated = self._migrated.get(instance)
        if not migrated or hit_tokens <= 0:
            return
        n = min(hit_tokens // req.block_size, len(req.block_hashes))
        served = sum(1 for h in req.block_hashes[:n] if h in migrated)
        if served:
            self.metrics.migrated_hits.inc((instance,), served * req.block_size)

    @property
    def running(self) -> int:
        return len(self._tasks)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopped = False

    async def stop(self) -> None:
        self._stopped = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.migrator.close()

    # -- one migration ----------------------------------------------------------------------
    async def _run(self, plan: MigrationPlan) -> None:
        began = self.clock()
        tokens = self.prompts.prefix(plan)
        source, target = self.endpoint(plan.source), self.endpoint(plan.target)
        if tokens is None:
            self._fail(plan, "prefix_tokens_unknown", 0.0)
            return
        if source is None or target is None or not self.healthy(plan.source) or not self.healthy(plan.target):
            self._fail(plan, "instance_unavailable", 0.0)
            return
        self.planner.on_started(plan, began)
        self.metrics.started.inc((plan.source, plan.target))
        # Requests held for the copy wait until its modelled landing time or, if it is late, at
        # most as long as recomputing would take (MigrationPlanner.hold_until): re-dispatch
        # then, and every SETTLE_POLL_S while it runs, so a held request leaves when its wait
        # is up even if the copy never lands.
        self._arm_settle(plan, self.planner.transfer_time(plan.nbytes))
        try:
            result: MigrationResult = await asyncio.wait_for(
                self.migrator.migrate(tokens, source, target), self.options.timeout_s
            )
        except asyncio.CancelledError:
            self._fail(plan, "cancelled", self.clock() - began, settle=False)
            raise
        except TimeoutError:
            self._fail(plan, "timeout", self.clock() - began)
            return
        except Exception as exc:  # a backend bug must not take the scheduler down
            log.warning("migration %s -> %s raised %r", plan.source, plan.target, exc)
            self._fail(plan, "error", self.clock() - began)
            return
        seconds = result.seconds or (self.clock() - began)
        self.recent.append(result)
        log.info("migration %s -> %s: %r", plan.source, plan.target, result)
        if not result.ok:
            log.info("migration %s -> %s failed: %s", plan.source, plan.target, result.error)
            self._fail(plan, _reason(result.error), seconds)
            return
        nbytes = result.bytes_moved or plan.nbytes
        self.planner.on_finished(plan, self.clock(), nbytes, seconds)
        m = self.metrics
        m.finished.inc((plan.source, plan.target))
        m.bytes.inc((plan.source, plan.target), nbytes)
        m.seconds.child(("finished",)).observe(seconds)
        m.replicated.setdefault(plan.target, set()).add(plan.block_hashes[-1])
        self._migrated.setdefault(plan.target, set()).update(plan.missing_hashes)
        self.on_settled()

    def _arm_settle(self, plan: MigrationPlan, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self._settle_while_running, plan)

    def _settle_while_running(self, plan: MigrationPlan) -> None:
        if self._stopped or not self.planner.is_in_flight(plan.plan_id):
            return
        self.on_settled()
        self._arm_settle(plan, SETTLE_POLL_S)

    def _fail(self, plan: MigrationPlan, reason: str, seconds: float, settle: bool = True) -> None:
        self.planner.on_failed(plan, self.clock(), reason)
        self.metrics.failed.inc((plan.source, plan.target, reason))
        self.metrics.seconds.child(("failed",)).observe(seconds)
        if settle:
            self.on_settled()


def _reason(error: str | None) -> str:
    """A short, bounded metric label from a backend's error message."""
    if not error:
        return "backend"
    text = error.lower()
    for key in ("timeout", "timed out", "connect", "refused", "reset", "404", "500", "503"):
        if key in text:
            return "timeout" if key == "timed out" else key
    return "backend"


def build_migrator(backend: str, model: str, block_size: int, timeout_s: float, **kwargs: Any) -> PrefixMigrator:
    """The backend registered under ``backend``; raises MigrationError if it cannot work here."""
    cls = load_migrator_class(backend)
    try:
        return cls(model, block_size=block_size, timeout=timeout_s, **kwargs)
    except MigrationError:
        raise
    except (TypeError, ValueError) as exc:
        raise MigrationError(f"migration backend {backend!r} cannot start: {exc}") from exc
