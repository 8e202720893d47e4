"""Prometheus metrics of one Scheduler, exposed through a private CollectorRegistry.

The request path only touches plain Python numbers (``Counter.inc`` / ``Series.observe`` are a
dict or list update, no lock): prometheus_client's own metric objects take a lock and several
calls per update, which at a dozen updates per request was a visible share of the scheduler's
CPU. Everything runs on the event loop thread, scrapes included, so nothing needs a lock. The
registry's collectors turn the numbers into metric families when ``/metrics`` is scraped, and
per-instance state (queue depth, estimated TTFT, decode load, engine-reported NIXL totals) is
read from the live view at that moment.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dualmap_pd.cluster import ClusterView, InstanceState, Role

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets from 5 ms (a cached prefill of a tiny model) to 5 min (long generations).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

# Scheduler-added time: 50 us .. 1 s.
OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

# Time per output token: 1 ms (a tiny CPU model) to 2.5 s (an overloaded decoder).
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class Counter:
    """A labelled counter: ``inc(("a", "b"))``."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def value(self, key: tuple[str, ...]) -> float:
        return self.values.get(key, 0.0)

    def family(self) -> Metric:
        fam = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, v in sorted(self.values.items()):
            fam.add_metric(list(key), v)
        return fam


@dataclass(slots=True)
class Series:
    """One histogram series: per-bucket counts (non-cumulative; the last is +Inf) and the sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    def __init__(self, name: str, doc: str, labels: tuple[str, ...],
                 buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:  # fmt: skip
        self.name, self.doc, self.labels, self.buckets = name, doc, labels, buckets
        self.series: dict[tuple[str, ...], Series] = {}

    def child(self, key: tuple[str, ...]) -> Series:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series(self.buckets)
        return s

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, s in sorted(self.series.items()):
            cumulative, running = [], 0
            for bound, n in zip((*self.buckets, float("inf")), s.counts):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            fam.add_metric(list(key), cumulative, s.total)
        return fam


@dataclass
class KVTransferTotals:
    """Cumulative NIXL totals a decode engine reports (vllm:nixl_* on its /metrics)."""

    bytes: float = 0.0
    seconds: float = 0.0
    transfers: float = 0.0


class SchedulerMetrics(Collector):
    """All metrics of one Scheduler; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.decisions = Counter("dualmap_decisions", "Routing decisions by pool and policy branch",
                                 ("pool", "branch"))  # fmt: skip
        self.requests = Counter("dualmap_requests", "Requests finished, by endpoint and outcome",
                                ("endpoint", "outcome"))  # fmt: skip
        self.errors = Counter("dualmap_errors", "Errors by kind", ("kind",))
        self.predicted_hits = Counter("dualmap_cache_hit_tokens_predicted",
                                      "Prompt tokens the scheduler predicted cached at dispatch "
                                      "(counted where the engine reported its hit)", ("instance",))  # fmt: skip
        self.engine_hits = Counter("dualmap_cache_hit_tokens_engine",
                                   "Prompt tokens the prefill engine reported cached", ("instance",))  # fmt: skip
        self.prompt_tokens = Counter("dualmap_prompt_tokens", "Prompt tokens prefilled", ("instance",))
        self.engine_restarts = Counter("dualmap_engine_restarts", "Engine restarts seen on its /metrics "
                                       "(a new process start time, or counters that went back)",
                                       ("instance",))  # fmt: skip
        self.ttft = Histogram("dualmap_ttft_seconds", "Arrival to first token: the first streamed "
                              "chunk, or the prefill's answer when not streaming", ("stream",))  # fmt: skip
        self.e2e = Histogram("dualmap_e2e_seconds", "Arrival to the end of the answer", ("stream",))
        self.tpot = Histogram("dualmap_tpot_seconds", "Streamed requests: time from the first "
                              "chunk to the end over the SSE events after it (one event per token "
                              "at vLLM's default stream interval)", (), buckets=TPOT_BUCKETS)  # fmt: skip
        self.queue_wait = Histogram("dualmap_queue_wait_seconds",
                                    "Time in the scheduler-side prefill queue (late dispatch)", ())  # fmt: skip
        self.prefill_time = Histogram("dualmap_prefill_seconds", "Prefill request round trip",
                                      ("instance",))  # fmt: skip
        self.overhead = Histogram("dualmap_scheduler_overhead_seconds",
                                  "Non-streamed requests: arrival to the decode leg's start, minus "
                                  "the prefill round trip (what the scheduler added, late-dispatch "
                                  "queueing included)", (), buckets=OVERHEAD_BUCKETS)  # fmt: skip
        # Pre-bound series for the per-request path.
        self.ttft_by_stream = {s: self.ttft.child((str(s).lower(),)) for s in (True, False)}
        self.e2e_by_stream = {s: self.e2e.child((str(s).lower(),)) for s in (True, False)}
        self.queue_wait_series = self.queue_wait.child(())
        self.tpot_series = self.tpot.child(())
        self.overhead_series = self.overhead.child(())
        # Filled by the engine-metrics intake: decode instance -> its NIXL totals.
        self.kv_transfer: dict[str, KVTransferTotals] = {}
        self._view: ClusterView | None = None
        self._estimate_ttft: Callable[[InstanceState], float] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- updates (hot path) -----------------------------------------------------------------
    def error(self, kind: str) -> None:
        self.errors.inc((kind,))

    def request_done(self, endpoint: str, outcome: str) -> None:
        self.requests.inc((endpoint, outcome))

    def decision(self, pool: str, branch: str) -> None:
        self.decisions.inc((pool, branch))

    def prefill_done(self, instance: str, seconds: float, prompt_tokens: int,
                     predicted_hit: int, engine_hit: int | None) -> None:  # fmt: skip
        key = (instance,)
        self.prefill_time.child(key).observe(seconds)
        self.prompt_tokens.inc(key, prompt_tokens)
        # Only compare where the engine told us its hit, so the two counters stay comparable.
        if engine_hit is not None:
            self.predicted_hits.inc(key, predicted_hit)
            self.engine_hits.inc(key, engine_hit)

    def stream_done(self, first_chunk_at: float, end: float, events_after_first: int) -> None:
        """A streamed answer ended; ``events_after_first`` counts its final ``[DONE]`` too."""
        tokens = events_after_first - 1
        if tokens > 0:
            self.tpot_series.observe((end - first_chunk_at) / tokens)

    # -- exposition -------------------------------------------------------------------------
    def watch_view(self, view: ClusterView, estimate_ttft: Callable[[InstanceState], float]) -> None:
        self._view, self._estimate_ttft = view, estimate_ttft

    def collect(self) -> Iterator[Metric]:
        for c in (self.decisions, self.requests, self.errors, self.predicted_hits,
                  self.engine_hits, self.prompt_tokens, self.engine_restarts):  # fmt: skip
            yield c.family()
        for h in (self.ttft, self.e2e, self.tpot, self.queue_wait, self.prefill_time, self.overhead):
            yield h.family()
        yield from self._instance_families()
        yield from self._kv_transfer_families()

    def _instance_families(self) -> Iterator[Metric]:
        view, estimate = self._view, self._estimate_ttft
        if view is None or estimate is None:
            return
        def gauge(name: str, doc: str) -> GaugeMetricFamily:  # noqa: E306
            return GaugeMetricFamily(name, doc, labels=["instance"])
        queue = gauge("dualmap_instance_queue_depth", "Requests waiting in the scheduler-side queue")
        pending = gauge("dualmap_instance_engine_pending", "Requests sent to the engine, prefill not done")
        ttft = gauge("dualmap_instance_estimated_ttft_seconds", "Estimated TTFT of a new uncached request")
        blocks = gauge("dualmap_instance_cached_blocks", "Blocks the scheduler believes are cached")
        running = gauge("dualmap_instance_decode_running", "Requests decoding (scheduler's count)")
        active = gauge("dualmap_instance_decode_active_tokens", "KV tokens of requests decoding")
        healthy = GaugeMetricFamily("dualmap_instance_healthy", "1 if the instance is healthy",
                                    labels=["instance", "role"])  # fmt: skip
        for st in view.instances():
            healthy.add_metric([st.name, st.role.value], 1.0 if st.healthy else 0.0)
            if st.role is Role.PREFILL:
                queue.add_metric([st.name], len(st.queue))
                pending.add_metric([st.name], st.engine_pending_requests)
                ttft.add_metric([st.name], estimate(st))
                blocks.add_metric([st.name], len(st.cached_blocks))
            else:
                running.add_metric([st.name], st.running_requests)
                active.add_metric([st.name], st.active_tokens)
        yield from (queue, pending, ttft, blocks, running, active, healthy)

    def _kv_transfer_families(self) -> Iterator[Metric]:
        fams = (
            ("dualmap_kv_transfer_bytes", "KV bytes moved P->D, as the decode engine reports (NIXL)", "bytes"),
            ("dualmap_kv_transfer_seconds", "Time moving KV P->D, as the decode engine reports", "seconds"),
            ("dualmap_kv_transfers", "KV transfers P->D, as the decode engine reports", "transfers"),
        )
        for name, doc, attr in fams:
            fam = CounterMetricFamily(name, doc, labels=["instance"])
            for inst, totals in sorted(self.kv_transfer.items()):
                fam.add_metric([inst], getattr(totals, attr))
            yield fam

    def render(self) -> bytes:
        return generate_latest(self.registry)
