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

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.cost import CostModel
from dualmap_pd.metrics import summarize
from dualmap_pd.policies import DECODE_POLICIES, PREFILL_POLICIES, PolicyContext
from dualmap_pd.policies.migration import MigrationPlan
from dualmap_pd.request import RoutedRequest
from dualmap_pd.router import PrefillRouter
from dualmap_pd.sim.config import SimConfig
from dualmap_pd.sim.engine import Engine
from dualmap_pd.sim.events import Arrival, Event, KVTransferDone, MigrationDone, StepDone
from dualmap_pd.sim.prefix_cache import PrefixCache
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
        self.cost = CostModel(profile)
        self.view = ClusterView(profile.block_size)
        ctx = PolicyContext(self.cost, slo_ttft=config.slo_ttft, seed=config.seed)
        self.prefill_names = [f"p{i}" for i in range(config.prefill)]
        self.decode_names = [f"d{i}" for i in range(config.decode_instances)]
        self.engines: dict[str, Engine] = {}
        for name in self.prefill_names:
            st = self.view.add_instance(name, Role.PREFILL)
            cache = PrefixCache(config.prefix_cache_blocks)
            self.engines[name] = Engine(st, self.view, self.cost, cache, config.kv_capacity_bytes, config.aggregate_decode)
        for name in self.decode_names:
            st = self.view.add_instance(name, Role.DECODE)
            self.engines[name] = Engine(st, self.view, self.cost, None, config.kv_capacity_bytes, config.aggregate_decode)
        self.colocated = config.mode == "colocated"
        self.policy = PREFILL_POLICIES.create(config.policy, ctx)
        self.router = PrefillRouter(self.policy, self.view)
        self.decode_policy = None if self.colocated else DECODE_POLICIES.create(config.decode_policy, ctx)
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
        self._migrating: dict[int, MigrationPlan] = {}
        self._decode_decisions: Counter[str] = Counter()
        self.now = 0.0

    # -- loop -------------------------------------------------------------------------------------
    def schedule(self, at: float, event: Event) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, event))

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
        req = SimRequest(index, routed, now, rec.input_length, rec.output_length)
        self.requests[index] = req
        self._live[rid] = req
        if index + 1 < len(self.arrivals):
            self.schedule(self.arrivals[index + 1], Arrival(index + 1))
        moves = self.router.stats.moves
        decision = self.router.admit(routed, now)
        req.branch = decision.branch
        self._start_migrations(now)
        # Rebalancing may have moved queued requests anywhere: then look at every queue.
        self._dispatch(now, [decision.instance] if self.router.stats.moves == moves else None)

    def on_step_done(self, engine: Engine, now: float) -> None:
        prefills, decodes = engine.finish_step()
        for req in decodes:
            self._complete(req, engine, now)
        if prefills:
            moves = self.router.stats.moves
            for req in prefills:
                self._prefill_finished(req, engine, now)
            self._start_migrations(now)
            self._dispatch(now, [engine.name] if self.router.stats.moves == moves else None)
        self._kick(engine, now)

    def on_kv_arrived(self, req: SimRequest, engine: Engine, now: float) -> None:
        engine.join_decode(req)
        self._kick(engine, now)

    def on_migration_done(self, plan: MigrationPlan, now: float) -> None:
        del self._migrating[plan.plan_id]
        self.engines[plan.source].cache.unpin(plan.block_hashes)  # type: ignore[union-attr]
        self.engines[plan.target].receive_blocks(plan.block_hashes)
        planner = self.policy.migration
        if planner is not None:
            planner.on_finished(plan, now)
        self._dispatch(now, [plan.target])

    # -- helpers ----------------------------------------------------------------------------------
    def _start_migrations(self, now: float) -> None:
        planner = self.policy.migration
        if planner is None:
            return
        for plan in self.router.take_migrations():
            cache = self.engines[plan.source].cache
            if cache is None or not cache.holds(plan.block_hashes):
                planner.on_failed(plan, now, "source_evicted")
                self._dispatch(now, [plan.target])
                continue
            cache.pin(plan.block_hashes)
            start = max(now, self._link_free[plan.source])
            done = start + self.cost.transfer_time(plan.nbytes, planner.link)
            self._link_free[plan.source] = done
            planner.on_started(plan, now, expected_ready_at=done)
            self._migrating[plan.plan_id] = plan
            self.schedule(done, MigrationDone(plan))

    def _dispatch(self, now: float, instances: list[str] | None) -> None:
        touched: dict[str, Engine] = {}
        for routed, name in self.router.take_dispatchable(now, instances):
            engine = self.engines[name]
            engine.state.inflight_requests += 1
            engine.submit(self._live[routed.request_id])
            touched[name] = engine
        for engine in touched.values():
            self._kick(engine, now)

    def _kick(self, engine: Engine, now: float) -> None:
        """Let an engine see new work: start a step if idle, else cut a decode run short."""
        end = engine.plan(now) if not engine.busy else engine.truncate(now) if engine.needs_boundary else None
        if end is not None:
            self.schedule(end, StepDone(engine, engine.version))

    def _prefill_finished(self, req: SimRequest, engine: Engine, now: float) -> None:
        req.first_token_at = now
        req.prefills_done += 1
        self.router.finish_prefill(req.routed.request_id, now)
        if self.colocated:
            if req.output_tokens > 1:
                engine.join_decode(req)
            else:
                self._complete(req, engine, now)
            return
        engine.release(req)
        engine.state.inflight_requests -= 1
        if req.output_tokens > 1:
            self._send_to_decode(req, engine, now)
        else:
            self._complete(req, None, now)

    def _send_to_decode(self, req: SimRequest, source: Engine, now: float) -> None:
        if self.decode_policy is None:
            raise SimulationError("decode requested in colocated mode")
        decision = self.decode_policy.select(req.routed, self.view, now)
        self.decode_policy.on_decision(req.routed, decision, self.view, now)
        self._decode_decisions[decision.branch] += 1
        target = self.engines[decision.instance]
        req.decode_instance = target.name
        # The decode slot (and its KV memory) is taken now, so the next decision sees it.
        target.hold(req)
        target.state.inflight_requests += 1
        nbytes = self.cost.kv_bytes(req.prompt_tokens)
        req.kv_bytes_moved = nbytes
        self._kv_bytes += nbytes
        start = max(now, self._link_free[source.name])
        done = start + self.cost.transfer_time(nbytes)
        self._link_free[source.name] = done
        self.schedule(done, KVTransferDone(req, target))

    def _complete(self, req: SimRequest, engine: Engine | None, now: float) -> None:
        req.finished_at = now
        req.completions += 1
        self._live.pop(req.routed.request_id, None)
        if engine is not None:
            engine.release(req)
            engine.state.inflight_requests -= 1
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
        if bad or self._live or len(self.router):
            first = bad[0].routed.request_id if bad else next(iter(self._live), "?")
            raise SimulationError(
                f"{len(bad)} requests did not complete exactly once, {len(self._live)} still live, "
                f"{len(self.router)} still in the router (first: {first})"
            )
        return SimResult(
            config=self.config,
            requests=reqs,
            warmup=self.warmup,
            offered_qps=self.workload.measured_qps,
            workload=self.workload,
            prefill_names=self.prefill_names,
            decode_names=self.decode_names,
            decisions=Counter(self.router.stats.decisions),
            decode_decisions=Counter(self._decode_decisions),
            moves=self.router.stats.moves,
            kv_bytes_moved=self._kv_bytes,
            sim_end_s=self.now,
            events=events,
            engine_steps=sum(e.steps_run for e in self.engines.values()),
            migrations=self._migration_totals(),
        )

    def _migration_totals(self) -> dict[str, int]:
        planner = self.policy.migration
        if planner is None:
            return {}
        s = planner.stats
        return {
            "planned": s.planned, "started": s.started, "finished": s.finished, "failed": s.failed,
            "expired": s.expired, "bytes_moved": s.bytes_moved, "blocks_moved": s.blocks_moved,
        }  # fmt: skip


def simulate(config: SimConfig, trace: PreparedTrace | None = None, progress: ProgressFn | None = None) -> SimResult:
    """Validate ``config``, load its trace unless given, and run one simulation."""
    config.validate()
    if trace is None:
        trace = load_prepared(config.trace, config.requests, config.tile)
    return Simulator(config, trace, progress).run()
