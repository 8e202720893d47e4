"""The simulator's events: small objects on a heap of (time, seq, event).

Each event knows what it means and calls back into the simulator; the loop only pops and fires,
so policies, engines and modes change without touching it. ``seq`` (insertion order) breaks
time ties, which keeps runs exactly repeatable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dualmap_pd.policies.migration import MigrationPlan
    from dualmap_pd.sim.engine import Engine
    from dualmap_pd.sim.replicas import Replica
    from dualmap_pd.sim.simulator import Simulator
    from dualmap_pd.sim.state import SimRequest


class Event:
    __slots__ = ()

    def fire(self, sim: Simulator, now: float) -> None:
        raise NotImplementedError


class Arrival(Event):
    """Request ``index`` of the trace arrives (the next arrival is scheduled when it fires)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def fire(self, sim: Simulator, now: float) -> None:
        sim.on_arrival(self.index, now)


class StepDone(Event):
    """An engine step (or an aggregated decode run) ended. Dropped if the engine rescheduled
    its end since (a decode run cut short by new work)."""

    __slots__ = ("engine", "version")

    def __init__(self, engine: Engine, version: int) -> None:
        self.engine = engine
        self.version = version

    def fire(self, sim: Simulator, now: float) -> None:
        if self.version == self.engine.version and self.engine.busy:
            sim.on_step_done(self.engine, now)


class KVTransferDone(Event):
    """A prompt's KV arrived at its decode instance (disaggregated mode)."""

    __slots__ = ("request", "engine")

    def __init__(self, request: SimRequest, engine: Engine) -> None:
        self.request = request
        self.engine = engine

    def fire(self, sim: Simulator, now: float) -> None:
        sim.on_kv_arrived(self.request, self.engine, now)


class MigrationDone(Event):
    """A prefix migration's blocks arrived at its target prefill instance."""

    __slots__ = ("replica", "plan")

    def __init__(self, replica: Replica, plan: MigrationPlan) -> None:
        self.replica = replica
        self.plan = plan

    def fire(self, sim: Simulator, now: float) -> None:
        sim.on_migration_done(self.replica, self.plan, now)


class EngineReceives(Event):
    """A dispatched prefill leg reaches its engine (half a round trip after dispatch)."""

    __slots__ = ("request", "engine")

    def __init__(self, request: SimRequest, engine: Engine) -> None:
        self.request = request
        self.engine = engine

    def fire(self, sim: Simulator, now: float) -> None:
        sim.on_engine_receives(self.request, self.engine, now)


class PrefillsReported(Event):
    """A scheduler hears that prefills it dispatched finished (their HTTP responses)."""

    __slots__ = ("replica", "requests", "engine")

    def __init__(self, replica: Replica, requests: list[SimRequest], engine: Engine) -> None:
        self.replica = replica
        self.requests = requests
        self.engine = engine

    def fire(self, sim: Simulator, now: float) -> None:
        sim.on_prefills_reported(self.replica, self.requests, self.engine, now)
