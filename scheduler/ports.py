"""The narrow interfaces the Scheduler offers its components.

The request path (``dispatch.pd_client``) and the membership registry (``membership.registry``)
are built by the Scheduler and call back into it; each sees only the part it uses, typed by a
Protocol here, so neither imports ``scheduler.service`` (no import cycle, not even a type-only
one) and a test can hand either a small stand-in. The migration runner needs less still and gets
plain callables (see ``Scheduler._build_migration_runner``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dualmap_pd.cluster import ClusterView
    from dualmap_pd.policies.base import PrefillPolicy
    from dualmap_pd.request import RoutedRequest
    from scheduler.config import ClusterConfig
    from scheduler.dispatch.pd_client import PDClient
    from scheduler.prom import SchedulerMetrics


class BackgroundService(Protocol):
    """A KV-event subscriber, metrics poller, ...: started and stopped with the Scheduler."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class FailureReporter(Protocol):
    """Per-instance circuit breakers (``intake.health.HealthMonitor``), as the request path
    feeds them: each call's outcome counts for or against its instance."""

    def report_failure(self, instance: str, reason: str, hard: bool = False) -> None: ...

    def report_success(self, instance: str) -> None: ...


class RequestLifecycle(Protocol):
    """What the prefill -> decode handoff needs: one request's way through the Scheduler.

    admit and wait (``acquire_prefill``), then ``complete_prefill`` or ``abort_prefill``;
    ``acquire_decode`` and ``release_decode`` around the decode leg."""

    clock: Callable[[], float]
    metrics: SchedulerMetrics
    health: FailureReporter

    @property
    def client(self) -> PDClient | None: ...

    def new_request(self, prompt_ids: list[int], max_tokens: int | None, arrival: float) -> RoutedRequest: ...

    async def acquire_prefill(self, req: RoutedRequest) -> str: ...

    def predicted_hit_tokens(self, instance: str, req: RoutedRequest) -> int: ...

    def complete_prefill(self, req: RoutedRequest, instance: str, seconds: float,
                         predicted_hit: int, engine_hit: int | None) -> None: ...  # fmt: skip

    def abort_prefill(self, req: RoutedRequest) -> None: ...

    def acquire_decode(self, req: RoutedRequest, avoid: Collection[str] = ()) -> tuple[str, int]: ...

    def release_decode(self, instance: str, load: int) -> None: ...

    def mark_unhealthy(self, instance: str, reason: str = "unreachable") -> None: ...

    def instance_url(self, name: str) -> str: ...


class PoolHost(Protocol):
    """What runtime membership changes: the pools, their URLs and intake, and the config.

    The registry adds and removes instances in ``view`` and ``urls``, re-admits the queue of a
    draining instance (``readmit_queued``), tells the router the rings changed, and starts or
    stops the intake of an instance that joined or left."""

    view: ClusterView
    urls: dict[str, str]
    config: ClusterConfig
    clock: Callable[[], float]
    metrics: SchedulerMetrics
    prefill_policy: PrefillPolicy

    @property
    def services(self) -> tuple[BackgroundService, ...]: ...

    async def add_service(self, svc: BackgroundService) -> None: ...

    async def remove_service(self, svc: BackgroundService) -> None: ...

    def readmit_queued(self, reqs: Sequence[RoutedRequest]) -> None: ...

    def take_queued(self, instance: str) -> list[RoutedRequest]: ...

    def evict_instance(self, instance: str) -> None: ...

    def rings_changed(self) -> None: ...

