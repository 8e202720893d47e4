"""The discrete-event simulator: trace arrivals -> PrefillRouter -> simulated engines.

The router (and through it the policy) is the very object the live scheduler drives: the
simulator calls ``admit`` on arrival, ``take_dispatchable`` to learn what may go to an engine,
and ``finish_prefill`` when an engine's prefill completes, then dispatches again (late
dispatch). Engines report stored/evicted prefix blocks to the ClusterView as KV events do live.

Modes: ``colocated`` (each engine prefills and decodes, as in the DualMap paper) and
``disaggregated`` (prefill engines ship the prompt's KV over the profile's link to a decode
engine chosen by the decode policy). Transfers out of one prefill engine share its link one at
a time (FIFO); the decode side is not a bottleneck in the model.

Prefix migration (policy ``dualmap``): the router emits plans, the same objects the live
scheduler's migration runner executes. Here a plan is a copy over the source's link (the same
FIFO as its P->D transfers): the source pins the blocks from the start until the copy lands, the
target then caches them (LRU, within its capacity) and tells the view, and requests that waited
for the copy are dispatched. A plan whose source no longer holds the prefix fails at once.

Deterministic for a config: no wall clock, the only randomness is the policies' seeded RNGs,
and time ties are broken by event insertion order.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dualmap_pd.cluster import InstanceState, Role
from dualmap_pd.cost import CostModel
from dualmap_pd.metrics import summarize
from dualmap_pd.policies.migration import MigrationPlan
from dualmap_pd.request import RoutedRequest
from dualmap_pd.router import DispatchLimits
from dualmap_pd.sim.config import SimConfig
from dualmap_pd.sim.engine import Engine
from dualmap_pd.sim.events import (
    Arrival,
    EngineReceives,
    Event,
    KVTransferDone,
    MigrationDone,
    PrefillsReported,
    StepDone,
)
from dualmap_pd.sim.observation import Deliver, Observer
from dualmap_pd.sim.prefix_cache import PrefixCache
from dualmap_pd.sim.replicas import ArrivalBalancer, Replica, build_replicas
from dualmap_pd.sim.state import SimRequest
from dualmap_pd.sim.workload import PreparedTrace, load_prepared
from dualmap_pd.trace import ArrivalScaling
from dualmap_pd.workload_prep import PreparedWorkload, prepare_workload

# progress(completed, total, simulated time)
ProgressFn = Callable[[int, int, float], None]


class SimulationError(RuntimeError):
    """The simulation broke one of its invariants (a bug, never bad input)."""


@dataclass
class SimResult:
    config: SimConfig
    requests: list[SimRequest]
    warmup: int
    offered_qps: float
    prefill_names: list[str]
    decode_names: list[str]
    decisions: Counter[str] = field(default_factory=Counter)
    decode_decisions: Counter[str] = field(default_factory=Counter)
    moves: int = 0
    kv_bytes_moved: int = 0
    sim_end_s: float = 0.0
    events: int = 0
    engine_steps: int = 0
    migrations: dict[str, int] = field(default_factory=dict)
    workload: PreparedWorkload | None = None

    @property
    def measured(self) -> list[SimRequest]:
        return self.requests[self.warmup :]

    def summary(self) -> dict[str, Any]:
        """Every metric as one flat, JSON-ready dict (times in seconds)."""
        cfg = self.config
        out: dict[str, Any] = {
            "policy": cfg.policy,
            "mode": cfg.mode,
            "profile": cfg.profile,
            "prefill_instances": len(self.prefill_names),
            "decode_instances": len(self.decode_names),
            "slo_ttft": cfg.slo_ttft,
            "seed": cfg.seed,
            "offered_qps": self.offered_qps,
            "requests": len(self.requests),
            "completed": sum(1 for r in self.requests if r.completions == 1),
            "warmup": self.warmup,
        }
        out["schedulers"] = cfg.schedulers
        out["observation"] = cfg.observation.effective.describe()
        if self.workload is not None:
            out["workload"] = self.workload.to_json()
            out["dropped_oversized"] = self.workload.dropped_oversized
        out.update(summarize(self.measured, cfg.slo_ttft, self.prefill_names))
        out["kv_bytes_moved"] = self.kv_bytes_moved
        out["migrations"] = dict(self.migrations)
        out["migrated_hit_tokens"] = sum(r.migrated_hit_tokens for r in self.measured)
        out["moves"] = self.moves
        out["decisions"] = dict(sorted(self.decisions.items()))
        out["decode_decisions"] = dict(sorted(self.decode_decisions.items()))
        out["sim_end_s"] = self.sim_end_s
        out["events"] = self.events
        out["engine_steps"] = self.engine_steps
        return out


class Simulator:
    def __init__(
        self,
        config: SimConfig,
        trace: PreparedTrace,
        progress: ProgressFn | None = None,
        progress_every: int = 500,
    ) -> None:
        self.config = config
        self.trace = trace
        self.progress = progress
        self.progress_every = max(1, progress_every)
        profile = config.hardware
        self.cost = CostModel(profile)  # the engines' (true) costs
        self.prefill_names = [f"p{i}" for i in range(config.prefill)]
        self.decode_names = [f"d{i}" for i in range(config.decode_instances)]
        self.colocated = config.mode == "colocated"
        self.replicas = build_replicas(
            config.schedulers, profile, self.prefill_names, self.decode_names, config.policy,
            None if self.colocated else config.decode_policy, config.slo_ttft, config.seed,
            DispatchLimits(max_engine_pending=config.max_engine_pending),
        )  # fmt: skip
        # Replica 0's objects under the names a single scheduler had (tests and tools read them).
        self.view, self.policy, self.router = self.replicas[0].view, self.replicas[0].policy, self.replicas[0].router
        self.balancer = ArrivalBalancer(config.schedulers, config.arrival_spread, config.seed)
        truth = {n: InstanceState(n, Role.PREFILL) for n in self.prefill_names}
        truth.update({n: InstanceState(n, Role.DECODE) for n in self.decode_names})
        self.observer = Observer(self, config.observation, [r.view for r in self.replicas], truth, config.seed)
        self.half_rtt = self.observer.half_rtt
        self.book_late = self.observer.obs.book_on_accept and self.half_rtt > 0
        self.engines: dict[str, Engine] = {}
        for name in self.prefill_names:
            cache = PrefixCache(config.prefix_cache_blocks)
            self.engines[name] = Engine(
                truth[name], self.observer, self.cost, cache, config.kv_capacity_bytes,
                config.aggregate_decode, self.observer.noise_for(name),
            )  # fmt: skip
        for name in self.decode_names:
            self.engines[name] = Engine(truth[name], self.observer, self.cost, None, config.kv_capacity_bytes, config.aggregate_decode)
        scaling = ArrivalScaling(rate_scale=config.rate_scale, qps=config.qps)
        self.workload = prepare_workload(trace.records, config.workload, scaling, config.max_model_len)
        self.arrivals = self.workload.arrivals
        self.hashes = trace.block_hashes(profile.block_size)
        n = len(self.workload.records)
        self.warmup = self.workload.warmup
        self.requests: list[SimRequest | None] = [None] * n
        self._live: dict[str, SimRequest] = {}
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0
        self._link_free: dict[str, float] = dict.fromkeys(self.prefill_names, 0.0)
        self._completed = 0
        self._kv_bytes = 0
        self._migrating: dict[tuple[int, int], MigrationPlan] = {}
        self._decode_decisions: Counter[str] = Counter()
        self._next_arrival = 0
        self.now = 0.0

    # -- loop -------------------------------------------------------------------------------------
    def schedule(self, at: float, event: Event) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, event))

    def has_work(self) -> bool:
        """Requests still to arrive or still running (periodic events stop when this is False)."""
        return self._next_arrival < len(self.arrivals) or bool(self._live)

    def run(self) -> SimResult:
        if self.arrivals:
            self.schedule(self.arrivals[0], Arrival(0))
        heap = self._heap
        pop = heapq.heappop
        events = 0
        while heap:
            at, _, event = pop(heap)
            self.now = at
            event.fire(self, at)
            events += 1
        return self._result(events)

    # -- event handlers ---------------------------------------------------------------------------
    def on_arrival(self, index: int, now: float) -> None:
        rec = self.workload.records[index]
        traced = self.workload.indices[index]  # its index in the trace (hashes, routing key)
        rid = f"r{traced}"
        routed = RoutedRequest(
            request_id=rid,
            prompt_tokens=rec.input_length,
            block_hashes=self.hashes[traced],
            block_size=self.view.block_size,
            arrival=now,
            fallback_key=self.trace.fallback_key(traced),
            expected_output_tokens=rec.output_length,
        )
        replica = self.replicas[self.balancer.pick()]
        req = SimRequest(index, routed, now, rec.input_length, rec.output_length, replica=replica.index)
        self.requests[index] = req
        self._live[rid] = req
        self._next_arrival = index + 1
        if index + 1 < len(self.arrivals):
            self.schedule(self.arrivals[index + 1], Arrival(index + 1))
        self.observer.start_polling(now)
        router = replica.router
        moves = router.stats.moves
        decision = router.admit(routed, now)
        req.branch = decision.branch
        self._start_migrations(replica, now)
        # Rebalancing may have moved queued requests anywhere: then look at every queue.
        self._dispatch(replica, now, [decision.instance] if router.stats.moves == moves else None)

    def on_step_done(self, engine: Engine, now: float) -> None:
        prefills, decodes = engine.finish_step()
        for req in decodes:
            self._complete(req, engine, now)
        if prefills:
            by_replica: dict[int, list[SimRequest]] = {}
            for req in prefills:
                self._prefill_finished_on_engine(req, engine, now)
                by_replica.setdefault(req.replica, []).append(req)
            for k, reqs in by_replica.items():
                if self.half_rtt > 0:  # the scheduler hears it with the HTTP response
                    self.schedule(now + self.half_rtt, PrefillsReported(self.replicas[k], reqs, engine))
                else:
                    self.on_prefills_reported(self.replicas[k], reqs, engine, now)
        self._kick(engine, now)

    def on_prefills_reported(self, replica: Replica, reqs: list[SimRequest], engine: Engine, now: float) -> None:
        """The scheduler learns these prefills finished: free their bookings, send decode legs,
        dispatch what now may go."""
        router = replica.router
        moves = router.stats.moves
        for req in reqs:
            router.finish_prefill(req.routed.request_id, now)
            if not self.colocated:
                replica.view[engine.name].inflight_requests -= 1
                if req.output_tokens > 1:
                    self._send_to_decode(replica, req, engine, now)
                else:
                    self._complete(req, None, now)
        self._start_migrations(replica, now)
        self._dispatch(replica, now, [engine.name] if router.stats.moves == moves else None)

    def on_engine_receives(self, req: SimRequest, engine: Engine, now: float) -> None:
        engine.submit(req)
        self._kick(engine, now)

    def on_kv_arrived(self, req: SimRequest, engine: Engine, now: float) -> None:
        engine.join_decode(req)
        self._kick(engine, now)

    def on_migration_done(self, replica: Replica, plan: MigrationPlan, now: float) -> None:
        del self._migrating[(replica.index, plan.plan_id)]
        self.engines[plan.source].cache.unpin(plan.block_hashes)  # type: ignore[union-attr]
        self.engines[plan.target].receive_blocks(plan.block_hashes)
        planner = replica.policy.migration
        if planner is not None:
            planner.on_finished(plan, now)
        self._dispatch(replica, now, [plan.target])

    # -- helpers ----------------------------------------------------------------------------------
    def _start_migrations(self, replica: Replica, now: float) -> None:
        planner = replica.policy.migration
        if planner is None:
            return
        for plan in replica.router.take_migrations():
            cache = self.engines[plan.source].cache
            if cache is None or not cache.holds(plan.block_hashes):
                planner.on_failed(plan, now, "source_evicted")
                self._dispatch(replica, now, [plan.target])
                continue
            cache.pin(plan.block_hashes)
            start = max(now, self._link_free[plan.source])
            done = start + self.cost.transfer_time(plan.nbytes, planner.link)
            self._link_free[plan.source] = done
            planner.on_started(plan, now, expected_ready_at=done)
            self._migrating[(replica.index, plan.plan_id)] = plan
            self.schedule(done, MigrationDone(replica, plan))

    def _dispatch(self, replica: Replica, now: float, instances: list[str] | None) -> None:
        touched: dict[str, Engine] = {}
        view = replica.view
        for routed, name in replica.router.take_dispatchable(now, instances):
            engine = self.engines[name]
            view[name].inflight_requests += 1
            req = self._live[routed.request_id]
            if self.book_late:
                self._book_on_accept(replica, routed.request_id, name, now)
            if self.half_rtt > 0:  # the prefill leg reaches the engine half a round trip later
                self.schedule(now + self.half_rtt, EngineReceives(req, engine))
                continue
            engine.submit(req)
            touched[name] = engine
        for engine in touched.values():
            self._kick(engine, now)

    def _book_on_accept(self, replica: Replica, request_id: str, name: str, now: float) -> None:
        """Undo the router's booking of a dispatch until the engine's answer (a round trip
        later). The prefill's finish is heard at least that late, so it never comes first."""
        placed = replica.router.placed(request_id)
        if placed is None:
            return
        st = replica.view[name]
        uncached = placed[1]
        st.engine_pending_requests -= 1
        st.engine_pending_tokens -= uncached

        def book() -> None:
            st.engine_pending_requests += 1
            st.engine_pending_tokens += uncached

        self.schedule(now + 2 * self.half_rtt, Deliver(book))

    def _kick(self, engine: Engine, now: float) -> None:
        """Let an engine see new work: start a step if idle, else cut a decode run short."""
        end = engine.plan(now) if not engine.busy else engine.truncate(now) if engine.needs_boundary else None
        if end is not None:
            self.schedule(end, StepDone(engine, engine.version))

    def _prefill_finished_on_engine(self, req: SimRequest, engine: Engine, now: float) -> None:
        req.first_token_at = now
        req.prefills_done += 1
        if self.colocated:
            if req.output_tokens > 1:
                engine.join_decode(req)
            else:
                self._complete(req, engine, now)
            return
        engine.release(req)

    def _send_to_decode(self, replica: Replica, req: SimRequest, source: Engine, now: float) -> None:
        policy = replica.decode_policy
        if policy is None:
            raise SimulationError("decode requested in colocated mode")
        view = replica.view
        decision = policy.select(req.routed, view, now)
        policy.on_decision(req.routed, decision, view, now)
        self._decode_decisions[decision.branch] += 1
        target = self.engines[decision.instance]
        req.decode_instance = target.name
        # This scheduler books the decode slot now (as the live acquire_decode does), so its next
        # decision sees it; the engine's load reaches the others through metrics.
        booked = view[target.name]
        booked.running_requests += 1
        booked.active_tokens += req.prompt_tokens
        booked.inflight_requests += 1
        target.hold(req)
        nbytes = self.cost.kv_bytes(req.prompt_tokens)
        req.kv_bytes_moved = nbytes
        self._kv_bytes += nbytes
        # The decode leg's request reaches its engine half a round trip after the prefill's
        # answer; the decode engine then pulls the KV over the prefill's link (FIFO).
        start = max(now + self.half_rtt, self._link_free[source.name])
        done = start + self.cost.transfer_time(nbytes)
        self._link_free[source.name] = done
        self.schedule(done, KVTransferDone(req, target))

    def _complete(self, req: SimRequest, engine: Engine | None, now: float) -> None:
        req.finished_at = now
        req.completions += 1
        self._live.pop(req.routed.request_id, None)
        if engine is not None:
            engine.release(req)
            booked = self.replicas[req.replica].view[engine.name]
            booked.inflight_requests -= 1
            if engine.cache is None:  # a decode engine: release this scheduler's own booking
                booked.running_requests = max(0, booked.running_requests - 1)
                booked.active_tokens = max(0, booked.active_tokens - req.prompt_tokens)
                self.observer.load_changed(engine.name)
        self._completed += 1
        if self.progress is not None and self._completed % self.progress_every == 0:
            self.progress(self._completed, len(self.requests), now)

    def _result(self, events: int) -> SimResult:
        missing = [i for i, r in enumerate(self.requests) if r is None]
        if missing:
            raise SimulationError(f"{len(missing)} requests never arrived (first: {missing[0]})")
        reqs: list[SimRequest] = [r for r in self.requests if r is not None]
        bad = [r for r in reqs if r.completions != 1 or r.prefills_done != 1]
        if self._migrating:
            raise SimulationError(f"{len(self._migrating)} migrations never landed")
        in_router = sum(len(r.router) for r in self.replicas)
        if bad or self._live or in_router:
            first = bad[0].routed.request_id if bad else next(iter(self._live), "?")
            raise SimulationError(
                f"{len(bad)} requests did not complete exactly once, {len(self._live)} still live, "
                f"{in_router} still in a router (first: {first})"
            )
        decisions: Counter[str] = Counter()
        for r in self.replicas:
            decisions.update(r.router.stats.decisions)
        return SimResult(
            config=self.config,
            requests=reqs,
            warmup=self.warmup,
            offered_qps=self.workload.measured_qps,
            workload=self.workload,
            prefill_names=self.prefill_names,
            decode_names=self.decode_names,
            decisions=decisions,
            decode_decisions=Counter(self._decode_decisions),
            moves=sum(r.router.stats.moves for r in self.replicas),
            kv_bytes_moved=self._kv_bytes,
            sim_end_s=self.now,
            events=events,
            engine_steps=sum(e.steps_run for e in self.engines.values()),
            migrations=self._migration_totals(),
        )

    def _migration_totals(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        planners = [r.policy.migration for r in self.replicas if r.policy.migration is not None]
        if not planners:
            return {}
        for planner in planners:
            s = planner.stats
            totals.update({
                "planned": s.planned, "started": s.started, "finished": s.finished, "failed": s.failed,
                "expired": s.expired, "bytes_moved": s.bytes_moved, "blocks_moved": s.blocks_moved,
            })  # fmt: skip
        return {k: totals[k] for k in ("planned", "started", "finished", "failed", "expired", "bytes_moved", "blocks_moved")}


def simulate(config: SimConfig, trace: PreparedTrace | None = None, progress: ProgressFn | None = None) -> SimResult:
    """Validate ``config``, load its trace unless given, and run one simulation."""
    config.validate()
    if trace is None:
        trace = load_prepared(config.trace, config.requests, config.tile)
    return Simulator(config, trace, progress).run()
