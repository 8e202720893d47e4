"""Prometheus metrics of one Scheduler, in a private CollectorRegistry.

Counters and histograms are updated on the request path (children pre-bound where the label set
is known, so an observation is a dict-free call). Per-instance state (queue depth, estimated TTFT,
decode load, engine-reported KV transfer totals) is read from the live objects only when
``/metrics`` is scraped, by a custom collector: nothing to keep in sync on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dualmap_pd.cluster import ClusterView, InstanceState, Role

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets from 5 ms (a cached prefill of a tiny model) to 5 min (long generations).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


@dataclass
class KVTransferTotals:
    """Cumulative NIXL totals a decode engine reports (vllm:nixl_* on its /metrics)."""

    bytes: float = 0.0
    seconds: float = 0.0
    transfers: float = 0.0


@dataclass
class EngineReport:
    """What the engine-metrics poller last read from each instance (filled by the intake)."""

    kv_transfer: dict[str, KVTransferTotals] = field(default_factory=dict)


class _ViewCollector(Collector):
    """Reads the cluster view at scrape time."""

    def __init__(
        self,
        view: ClusterView,
        estimate_ttft: Callable[[InstanceState], float],
        report: EngineReport,
    ) -> None:
        self._view = view
        self._estimate_ttft = estimate_ttft
        self._report = report

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("dualmap_instance_queue_depth",
                                  "Requests waiting in the scheduler-side queue", labels=["instance"])  # fmt: skip
        pending = GaugeMetricFamily("dualmap_instance_engine_pending",
                                    "Requests sent to the engine whose prefill is not done", labels=["instance"])  # fmt: skip
        ttft = GaugeMetricFamily("dualmap_instance_estimated_ttft_seconds",
                                 "Estimated TTFT of a new request with no cache hit", labels=["instance"])  # fmt: skip
        running = GaugeMetricFamily("dualmap_instance_decode_running",
                                    "Requests decoding on the instance (scheduler's count)", labels=["instance"])  # fmt: skip
        active = GaugeMetricFamily("dualmap_instance_decode_active_tokens",
                                   "Context tokens of requests decoding on the instance", labels=["instance"])  # fmt: skip
        healthy = GaugeMetricFamily("dualmap_instance_healthy", "1 if the instance is healthy",
                                    labels=["instance", "role"])  # fmt: skip
        blocks = GaugeMetricFamily("dualmap_instance_cached_blocks",
                                   "Blocks the scheduler believes the instance caches", labels=["instance"])  # fmt: skip
        for st in self._view.instances():
            healthy.add_metric([st.name, st.role.value], 1.0 if st.healthy else 0.0)
            if st.role is Role.PREFILL:
                queue.add_metric([st.name], len(st.queue))
                pending.add_metric([st.name], st.engine_pending_requests)
                ttft.add_metric([st.name], self._estimate_ttft(st))
                blocks.add_metric([st.name], len(st.cached_blocks))
            else:
                running.add_metric([st.name], st.running_requests)
                active.add_metric([st.name], st.active_tokens)
        kv_bytes = CounterMetricFamily("dualmap_kv_transfer_bytes",
                                       "KV bytes moved P->D, as the decode engine reports (NIXL)", labels=["instance"])  # fmt: skip
        kv_time = CounterMetricFamily("dualmap_kv_transfer_seconds",
                                      "Time spent moving KV P->D, as the decode engine reports", labels=["instance"])  # fmt: skip
        kv_count = CounterMetricFamily("dualmap_kv_transfers",
                                       "KV transfers P->D, as the decode engine reports", labels=["instance"])  # fmt: skip
        for name, totals in sorted(self._report.kv_transfer.items()):
            kv_bytes.add_metric([name], totals.bytes)
            kv_time.add_metric([name], totals.seconds)
            kv_count.add_metric([name], totals.transfers)
        yield from (queue, pending, ttft, running, active, healthy, blocks, kv_bytes, kv_time, kv_count)


class SchedulerMetrics:
    """All metrics of one Scheduler; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.engine_report = EngineReport()
        r = self.registry
        self.decisions = Counter("dualmap_decisions", "Routing decisions by pool and policy branch",
                                 ["pool", "branch"], registry=r)  # fmt: skip
        self.requests = Counter("dualmap_requests", "Requests finished, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)  # fmt: skip
        self.errors = Counter("dualmap_errors", "Errors by kind", ["kind"], registry=r)
        self.ttft = Histogram("dualmap_ttft_seconds",
                              "Arrival to first token: first streamed chunk, or prefill done when not streaming",
                              ["stream"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("dualmap_e2e_seconds", "Arrival to the last byte of the answer",
                             ["stream"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_wait = Histogram("dualmap_queue_wait_seconds",
                                    "Time in the scheduler-side prefill queue (late dispatch)",
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prefill_time = Histogram("dualmap_prefill_seconds", "Prefill request round trip",
                                      ["instance"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.predicted_hits = Counter("dualmap_cache_hit_tokens_predicted",
                                      "Prompt tokens the scheduler predicted cached at dispatch",
                                      ["instance"], registry=r)  # fmt: skip
        self.engine_hits = Counter("dualmap_cache_hit_tokens_engine",
                                   "Prompt tokens the prefill engine reported cached",
                                   ["instance"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("dualmap_prompt_tokens", "Prompt tokens prefilled",
                                     ["instance"], registry=r)  # fmt: skip
        # Pre-bound children for the per-request path.
        self.ttft_by_stream = {s: self.ttft.labels(stream=str(s).lower()) for s in (True, False)}
        self.e2e_by_stream = {s: self.e2e.labels(stream=str(s).lower()) for s in (True, False)}
        self._error_children: dict[str, Counter] = {}
        self._decision_children: dict[tuple[str, str], Counter] = {}
        self._request_children: dict[tuple[str, str], Counter] = {}
        self._instance_children: dict[str, tuple[Histogram, Counter, Counter, Counter]] = {}

    def watch_view(self, view: ClusterView, estimate_ttft: Callable[[InstanceState], float]) -> None:
        self.registry.register(_ViewCollector(view, estimate_ttft, self.engine_report))

    def error(self, kind: str) -> None:
        child = self._error_children.get(kind)
        if child is None:
            child = self._error_children[kind] = self.errors.labels(kind=kind)
        child.inc()

    def request_done(self, endpoint: str, outcome: str) -> None:
        key = (endpoint, outcome)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(endpoint, outcome)
        child.inc()

    def decision(self, pool: str, branch: str) -> None:
        key = (pool, branch)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(pool=pool, branch=branch)
        child.inc()

    def prefill_done(self, instance: str, seconds: float, prompt_tokens: int,
                     predicted_hit: int, engine_hit: int | None) -> None:  # fmt: skip
        children = self._instance_children.get(instance)
        if children is None:
            children = self._instance_children[instance] = (
                self.prefill_time.labels(instance=instance),
                self.predicted_hits.labels(instance=instance),
                self.engine_hits.labels(instance=instance),
                self.prompt_tokens.labels(instance=instance),
            )
        latency, predicted, engine, prompt = children
        latency.observe(seconds)
        prompt.inc(prompt_tokens)
        # Only compare where the engine told us its hit, so the two counters stay comparable.
        if engine_hit is not None:
            predicted.inc(predicted_hit)
            engine.inc(engine_hit)

    def render(self) -> bytes:
        return generate_latest(self.registry)
