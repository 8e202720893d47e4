"""Support for the real-vLLM end-to-end tests: the scheduler on a background loop, and a
ledger of what each prefill instance was asked to prefill (the expected KV-event index)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from dualmap_pd.hashing import block_hashes
from scheduler.http.app import bound_port, create_app, start_site
from scheduler.config import ClusterConfig
from scheduler.local.launcher import LocalCluster
from scheduler.service import Scheduler, SchedulerOptions

T = TypeVar("T")

# Test-only ports (other engineers' clusters use other ranges).
HTTP_PORTS = range(8300, 8310)
KV_EVENT_PORTS = range(5570, 5580)
NIXL_PORTS = range(5670, 5680)


class SchedulerThread:
    """Runs a Scheduler's app on its own event loop in a daemon thread. The view and router
    belong to that loop: read them through ``call`` so a test never iterates a set while
    the loop changes it."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="scheduler", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        self._runner = self._run(start_site(create_app(self.scheduler), "127.0.0.1", 0), timeout)
        self.url = f"http://127.0.0.1:{bound_port(self._runner)}"
        return self.url

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # hand any failure back to the test thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def stop(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup(), 30.0)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@dataclass
class RunningCluster:
    cluster: LocalCluster
    scheduler: Scheduler
    thread: SchedulerThread
    startup_seconds: float  # until every server answered /health

    @property
    def url(self) -> str:
        return self.thread.url


@contextmanager
def running_cluster(
    config: ClusterConfig, model: str | Path, options: SchedulerOptions | None = None, healthy_timeout: float = 900.0
) -> Iterator[RunningCluster]:
    """Start every server of ``config``, then the scheduler (the model's own tokenizer, KV-event
    and metrics intake) on a free port; stop both on exit, whatever happened."""
    from scheduler.service import default_intake
    from scheduler.dispatch.tokenization import HFPromptTokenizer  # transformers: only when a test runs

    cluster = LocalCluster(config)
    thread = None
    started = time.monotonic()
    try:
        cluster.start()
        cluster.wait_healthy(timeout=healthy_timeout)
        startup = time.monotonic() - started
        scheduler = Scheduler(config, HFPromptTokenizer(model), options=options or SchedulerOptions.from_config(config),
                              intake=default_intake())  # fmt: skip
        thread = SchedulerThread(scheduler)
        thread.start()
        yield RunningCluster(cluster, scheduler, thread, startup)
    finally:
        if thread is not None:
            thread.stop()
        cluster.stop()


@dataclass
class PrefillLedger:
    """Token ids each prefill instance prefilled (through the scheduler or directly)."""

    block_size: int
    prompts: dict[str, list[list[int]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, instance: str, token_ids: list[int]) -> None:
        with self.lock:
            self.prompts.setdefault(instance, []).append(list(token_ids))

    def expected_blocks(self, instance: str) -> set[int]:
        """Our chained hashes of every full prompt block the instance computed."""
        with self.lock:
            return {h for ids in self.prompts.get(instance, []) for h in block_hashes(ids, self.block_size)}


@dataclass
class E2ECluster:
    config: ClusterConfig
    cluster: LocalCluster
    scheduler: Scheduler
    thread: SchedulerThread
    ledger: PrefillLedger
    startup_seconds: float

    @property
    def url(self) -> str:
        return self.thread.url

    def url_of(self, name: str) -> str:
        return self.config.instance(name).url


def wait_for(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``check`` until it holds (True) or ``timeout`` seconds pass (False): engines report
    through KV events and metrics a little after they answer."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
