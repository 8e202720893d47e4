"""``serve --workers N``: N scheduler processes on one port, each a replica of its own.

One Python process tops out near 2,000 P/D requests/s on one core; past that, the proxying CPU
is the limit, not the routing. The kernel spreads new connections over every socket bound to the
port with SO_REUSEPORT, so N forked workers behave as N replicas behind an L4 balancer
(docs/replicas.md): each has its own intake (KV events, /metrics), queues and bookings, and all
pick the same candidate pair for a prefix because the rings depend only on the membership.

The parent only supervises: it forks the workers before any event loop or tokenizer exists
(nothing to inherit but the parsed config), restarts one that dies (with a backoff, and gives
up on a worker that keeps dying), and on SIGTERM/SIGINT stops them all and waits for them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead worker is started again."""

    backoff_s: float = 0.5  # first restart delay; doubles per death inside the window
    max_backoff_s: float = 10.0
    max_deaths: int = 5  # deaths inside ``window_s`` after which the worker stays down
    window_s: float = 60.0


class WorkerPool:
    """Forks ``count`` workers running ``work(index)`` (its return value is the exit code).

    ``fork``, ``wait``, ``kill``, ``clock`` and ``sleep`` are injectable so the supervision
    policy is testable without processes."""

    def __init__(
        self,
        count: int,
        work: Callable[[int], int],
        *,
        policy: RestartPolicy | None = None,
        fork: Callable[[], int] = os.fork,
        wait: Callable[[], tuple[int, int]] = os.wait,
        kill: Callable[[int, int], None] = os.kill,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    ) -> None:
        if count < 1:
            raise ValueError(f"--workers must be at least 1, got {count}")
        self.count = count
        self._work = work
        self.policy = policy or RestartPolicy()
        self._fork, self._wait, self._kill = fork, wait, kill
        self._clock, self._sleep, self._say = clock, sleep, say
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.deaths: dict[int, deque[float]] = {i: deque() for i in range(count)}
        self.restarts = 0
        self.stopping = False

    def _spawn(self, index: int) -> None:
        pid = self._fork()
        if pid == 0:  # the worker: default signal handling, then serve; never return here
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = self._work(index)
            except KeyboardInterrupt:
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pids[pid] = index

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every worker (from a signal handler: only sets a flag and sends signals)."""
        self.stopping = True
        for pid in list(self.pids):
            try:
                self._kill(pid, signum)
            except ProcessLookupError:
                pass

    def _restart_delay(self, index: int) -> float | None:
        """Seconds to wait before restarting worker ``index``; None: it keeps dying, leave it."""
        now = self._clock()
        deaths = self.deaths[index]
        deaths.append(now)
        while deaths and now - deaths[0] > self.policy.window_s:
            deaths.popleft()
        if len(deaths) >= self.policy.max_deaths:
            return None
        return min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** (len(deaths) - 1))

    def run(self) -> int:
        """Supervise until every worker has stopped; 0 after a requested stop, else 1."""
        for index in range(self.count):
            self._spawn(index)
        failed = False
        while self.pids:
            try:
                pid, status = self._wait()
            except ChildProcessError:
                break
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            delay = self._restart_delay(index)
            if delay is None:
                self._say(f"dualmap-pd serve: worker {index} (pid {pid}) exited with code {code} "
                          f"{self.policy.max_deaths} times within {self.policy.window_s:.0f} s; "
                          "leaving it down")  # fmt: skip
                failed = True
                continue
            self._say(f"dualmap-pd serve: worker {index} (pid {pid}) exited with code {code}; "
                      f"restarting in {delay:.1f} s")  # fmt: skip
            self._sleep(delay)
            if not self.stopping:
                self.restarts += 1
                self._spawn(index)
        return 1 if failed or not self.stopping else 0


def run_workers(count: int, work: Callable[[int], int]) -> int:
    """Fork ``count`` workers and supervise them until SIGTERM/SIGINT."""
    pool = WorkerPool(count, work)

    def on_signal(signum: int, _frame: object) -> None:
        pool.stop(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return pool.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
