"""Keeps a launched cluster's servers running: a server that exits is restarted, the others are
never touched.

The policy is pure and small so it can be tested with a fake clock and no processes: after a
death the server waits ``backoff_s * 2**(deaths in the window - 1)`` (at most
``max_backoff_s``) and is started again with the same ports, run dir and pinning; a restarted
server must answer /health within ``start_timeout_s`` or it counts as another death; a server
that dies ``max_deaths`` times within ``window_s`` is left down with a message saying so. The
``Supervisor`` talks to the cluster only through the small ``Supervised`` protocol
(``LocalCluster`` implements it), reports every event as one line, and keeps a status table
(``status()``) with each server's state, pid and restart count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class ServerState(str, Enum):
    RUNNING = "running"  # healthy (or not yet known dead)
    WAITING = "waiting"  # dead, restart scheduled (backoff)
    STARTING = "starting"  # restarted, not yet answering /health
    DOWN = "down"  # died too often: left down


@dataclass(frozen=True)
class RestartPolicy:
    max_deaths: int = 5  # deaths within window_s after which a server is left down
    window_s: float = 600.0
    backoff_s: float = 1.0  # wait before the first restart; doubles per death in the window
    max_backoff_s: float = 30.0
    start_timeout_s: float = 600.0  # a restarted server must answer /health within this
    poll_s: float = 1.0  # how often exits and health are checked

    def __post_init__(self) -> None:
        if self.max_deaths < 1:
            raise ValueError("max_deaths must be >= 1")
        if min(self.window_s, self.start_timeout_s, self.poll_s) <= 0 or self.backoff_s < 0:
            raise ValueError("window_s, start_timeout_s and poll_s must be > 0, backoff_s >= 0")
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("max_backoff_s must be >= backoff_s")

    def backoff(self, deaths_in_window: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, deaths_in_window - 1))


class Supervised(Protocol):
    """What the supervisor needs from a cluster (LocalCluster implements it)."""

    def names(self) -> list[str]: ...

    def exit_code(self, name: str) -> int | None:
        """None while the server's process runs."""

    def pid(self, name: str) -> int | None: ...

    def restart(self, name: str) -> None:
        """Reap what is left of the server's process tree and start it again."""

    def reap(self, name: str) -> None:
        """Kill what is left of the server's process tree (it stays down)."""

    def check_healthy(self, name: str) -> bool:
        """True once the (re)started server answers /health; also re-pins it then."""

    def last_log_lines(self, name: str) -> str: ...


@dataclass
class _Record:
    state: ServerState = ServerState.RUNNING
    deaths: deque[float] = field(default_factory=deque)  # death times within the window
    restarts: int = 0
    last_exit: int | None = None
    restart_at: float = 0.0
    started_at: float = 0.0
    died_at: float | None = None


class Supervisor:
    """Watches every server of ``cluster``; call ``step()`` periodically (``run()`` loops)."""

    def __init__(
        self,
        cluster: Supervised,
        policy: RestartPolicy | None = None,
        *,
        report: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.cluster = cluster
        self.policy = policy or RestartPolicy()
        self.report = report
        self.clock, self.sleep = clock, sleep
        self.on_change = on_change  # e.g. rewrite the status file
        self.records = {name: _Record() for name in cluster.names()}

    def step(self) -> None:
        """One pass: notice exits, start restarts that are due, notice restarted servers up."""
        now = self.clock()
        changed = False
        for name, rec in self.records.items():
            if rec.state is ServerState.DOWN:
                continue
            if rec.state in (ServerState.RUNNING, ServerState.STARTING):
                code = self.cluster.exit_code(name)
                if code is not None:
                    self._died(name, rec, now, f"exited with code {code}", code)
                    changed = True
                elif rec.state is ServerState.STARTING:
                    if self.cluster.check_healthy(name):
                        rec.state = ServerState.RUNNING
                        down = now - (rec.died_at if rec.died_at is not None else rec.started_at)
                        self.report(f"{name} healthy again (restart {rec.restarts}, pid "
                                    f"{self.cluster.pid(name)}), {down:.1f} s after it died")  # fmt: skip
                        changed = True
                    elif now - rec.started_at > self.policy.start_timeout_s:
                        self._died(name, rec, now, f"not healthy {self.policy.start_timeout_s:.0f} s "
                                   "after its restart", None)  # fmt: skip
                        changed = True
            if rec.state is ServerState.WAITING and now >= rec.restart_at:
                rec.restarts += 1
                rec.started_at = now
                rec.state = ServerState.STARTING
                try:
                    self.cluster.restart(name)
                except Exception as exc:  # a port still held, a bad run dir: counts as a death
                    self.report(f"{name}: restart {rec.restarts} failed: {exc}")
                    self._died(name, rec, now, "could not be restarted", None)
                else:
                    self.report(f"{name} restarted (restart {rec.restarts}, pid {self.cluster.pid(name)})")
                changed = True
        if changed and self.on_change is not None:
            self.on_change()

    def _died(self, name: str, rec: _Record, now: float, how: str, code: int | None) -> None:
        rec.last_exit = code
        if rec.state is ServerState.RUNNING:
            rec.died_at = now  # a failed restart keeps the first death's time: "down since"
        rec.deaths.append(now)
        while rec.deaths and now - rec.deaths[0] > self.policy.window_s:
            rec.deaths.popleft()
        self.report(f"{name} {how}; last lines of its log:\n{self.cluster.last_log_lines(name)}")
        # Now, not at the restart: an orphaned engine core (its API server killed alone) would
        # keep its ports, KV-event stream and blocks alive meanwhile; a hung restart too.
        self.cluster.reap(name)
        n = len(rec.deaths)
        if n >= self.policy.max_deaths:
            rec.state = ServerState.DOWN
            self.report(f"{name} died {n} times within {self.policy.window_s:.0f} s: leaving it "
                        f"down (the other servers keep running; fix it and restart launch)")  # fmt: skip
            return
        delay = self.policy.backoff(n)
        rec.state = ServerState.WAITING
        rec.restart_at = now + delay
        self.report(f"{name} will be restarted in {delay:.1f} s (death {n} of at most "
                    f"{self.policy.max_deaths} within {self.policy.window_s:.0f} s)")  # fmt: skip

    def all_down(self) -> bool:
        return all(rec.state is ServerState.DOWN for rec in self.records.values())

    def run(self) -> int:
        """Supervise until interrupted (a signal raises out of ``sleep``); returns 1 if every
        server was left down."""
        while True:
            self.step()
            if self.all_down():
                self.report("every server is down: stopping")
                return 1
            self.sleep(self.policy.poll_s)

    def status(self) -> dict[str, dict[str, object]]:
        """Per server: state, pid, restarts, last exit code."""
        return {
            name: {"state": rec.state.value, "pid": self.cluster.pid(name), "restarts": rec.restarts,
                   "last_exit_code": rec.last_exit}  # fmt: skip
            for name, rec in self.records.items()
        }

    def status_line(self) -> str:
        return "status: " + ", ".join(
            f"{name} {rec.state.value} restarts={rec.restarts}" for name, rec in self.records.items()
        )
