"""Instance health: one circuit breaker per engine, fed by active probes and passive failures.

Two kinds of evidence reach a breaker:

* passive, from the request path (scheduler.dispatch.pd_client): a refused or dropped connection is
  *hard* evidence (the process is gone) and opens the circuit at once; a timeout or a
  502/503/504 answer is *soft* and opens it after ``failure_threshold`` in a row (a plain 500 is
  one request's failure, not the instance's); any success resets the count;
* active: ``GET /health`` of every instance each ``probe_interval_s``. A failed probe is soft
  evidence. An open circuit is probed again (half-open) once ``open_s`` has passed: a good probe
  closes it, a bad one re-opens it for another ``open_s``.

Opening a circuit calls ``on_open`` (the Scheduler takes the instance out of both rings' candidate
choice and re-admits what waited for it); closing it calls ``on_close`` (it rejoins). Only the
probe closes a circuit: a request still finishing on an open instance proves little.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.background import cancel_and_wait
from scheduler.prom import Counter

log = logging.getLogger(__name__)


class BreakerState(str, Enum):
    CLOSED = "closed"  # in service
    OPEN = "open"  # out of service until the next half-open probe
    HALF_OPEN = "half_open"  # out of service; one probe decides


# Gauge values of dualmap_instance_circuit_state.
STATE_GAUGE = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 3  # soft failures in a row that open a circuit
    open_s: float = 2.0  # an open circuit waits this long before its half-open probe
    probe_interval_s: float = 2.0  # active /health period
    probe_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.open_s < 0 or self.probe_interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError("open_s must be >= 0, probe_interval_s and probe_timeout_s > 0")


class CircuitBreaker:
    """The state machine of one instance. Pure: every call is given the time."""

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.state = BreakerState.CLOSED
        self.failures = 0  # soft failures in a row while closed
        self.opened_at = 0.0

    def record_failure(self, now: float, *, hard: bool) -> bool:
        """Returns True if this failure opened the circuit."""
        if self.state is BreakerState.OPEN:
            return False
        if self.state is BreakerState.HALF_OPEN:
            self._open(now)
            return False  # it was already out of service
        self.failures += 1
        if hard or self.failures >= self.policy.failure_threshold:
            self._open(now)
            return True
        return False

    def record_success(self) -> bool:
        """A request or probe succeeded. Returns True if this closed the circuit (half-open only)."""
        if self.state is BreakerState.CLOSED:
            self.failures = 0
            return False
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.CLOSED
            self.failures = 0
            return True
        return False

    def begin_probe(self, now: float) -> bool:
        """Whether an active probe should run now; an open circuit past ``open_s`` turns half-open."""
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < self.policy.open_s:
                return False
            self.state = BreakerState.HALF_OPEN
        return True

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.failures = 0


Probe = Callable[[str], Awaitable[bool]]  # base URL -> healthy?


class HealthMonitor:
    """The breakers of every instance, the probe loop, and the health metrics.

    ``targets()`` is read every round (instance name -> base URL), so instances added or removed
    at runtime are followed without telling the monitor."""

    def __init__(
        self,
        targets: Callable[[], Mapping[str, str]],
        probe: Probe,
        *,
        on_open: Callable[[str], None],
        on_close: Callable[[str], None],
        policy: BreakerPolicy | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._targets = targets
        self._probe = probe
        self._on_open, self._on_close = on_open, on_close
        self.clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._task: asyncio.Task[None] | None = None
        self.failures = Counter("dualmap_instance_failures", "Failures seen per instance, by kind "
                                "(connect, timeout, http_503, stream, probe, metrics_scrape, ...)",
                                ("instance", "kind"))  # fmt: skip
        self.transitions = Counter("dualmap_circuit_transitions",
                                   "Circuit-breaker state changes, by the state entered",
                                   ("instance", "state"))  # fmt: skip
        self.probes = Counter("dualmap_health_probes", "Active /health probes, by result",
                              ("instance", "result"))  # fmt: skip

    # -- evidence -----------------------------------------------------------------------------
    def breaker(self, instance: str) -> CircuitBreaker:
        b = self._breakers.get(instance)
        if b is None:
            b = self._breakers[instance] = CircuitBreaker(self.policy)
        return b

    def instances(self) -> list[str]:
        """The instances watched right now (the current membership)."""
        return sorted(self._targets())

    def state(self, instance: str) -> BreakerState:
        b = self._breakers.get(instance)
        return BreakerState.CLOSED if b is None else b.state

    def report_failure(self, instance: str, kind: str, *, hard: bool = False) -> None:
        self.failures.inc((instance, kind))
        b = self.breaker(instance)
        before = b.state
        opened = b.record_failure(self.clock(), hard=hard)
        if b.state is not before:
            self.transitions.inc((instance, b.state.value))
        if opened:
            log.warning("instance %s: circuit opened after %s failure; routing around it", instance, kind)
            self._on_open(instance)

    def report_success(self, instance: str) -> None:
        b = self._breakers.get(instance)
        if b is None:
            return  # never failed: nothing to reset (the hot path stays a dict lookup)
        if b.record_success():
            self.transitions.inc((instance, b.state.value))
            log.warning("instance %s: healthy again; back in the rings", instance)
            self._on_close(instance)

    # -- active probes ------------------------------------------------------------------------
    async def check_once(self) -> None:
        """Probe every instance whose breaker wants a probe now (all closed ones, and open ones
        whose wait is over), concurrently."""
        targets = dict(self._targets())
        for gone in set(self._breakers) - set(targets):
            del self._breakers[gone]
        now = self.clock()
        due = []
        for name, url in targets.items():
            b = self.breaker(name)
            before = b.state
            if b.begin_probe(now):
                if b.state is not before:
                    self.transitions.inc((name, b.state.value))
                due.append((name, url))
        results = await asyncio.gather(*(self._safe_probe(url) for _, url in due))
        for (name, _), ok in zip(due, results):
            if name not in self._breakers:
                continue  # removed while probing
            self.probes.inc((name, "ok" if ok else "failed"))
            if ok:
                self.report_success(name)
            else:
                self.report_failure(name, "probe")

    async def _safe_probe(self, url: str) -> bool:
        try:
            return await asyncio.wait_for(self._probe(url), self.policy.probe_timeout_s)
        except (OSError, asyncio.TimeoutError):
            return False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dualmap-health")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.probe_interval_s)
            try:
                await self.check_once()
            except Exception:  # one bad round (a listener's bug) must not end health checking
                log.exception("health: probe round failed")

    # -- metrics ------------------------------------------------------------------------------
    def collector(self) -> Collector:
        return _HealthCollector(self)


class _HealthCollector(Collector):
    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        gauge = GaugeMetricFamily("dualmap_instance_circuit_state",
                                  "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=["instance"])  # fmt: skip
        for name in m.instances():
            gauge.add_metric([name], STATE_GAUGE[m.state(name)])
        yield gauge
        yield m.failures.family()
        yield m.transitions.family()
        yield m.probes.family()
