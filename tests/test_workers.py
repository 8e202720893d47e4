"""``serve --workers N``: the supervision policy (injected fork/wait), and N real processes
sharing one port against fake engines: both serve, a killed worker comes back, SIGTERM stops all."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from scheduler.workers import RestartPolicy, WorkerPool
from tests.fakes.openai_server import FakeServerConfig, serve_in_thread
from tests.test_serve_cli import start_serve, write_config


class FakeProcesses:
    """fork/wait/kill stand-ins: each fork is a new pid; ``deaths`` says who exits next."""

    def __init__(self) -> None:
        self.next_pid = 100
        self.alive: set[int] = set()
        self.deaths: list[tuple[int, int]] = []  # (pid, exit code) in the order they happen
        self.killed: list[tuple[int, int]] = []
        self.now = 0.0
        self.slept: list[float] = []
        self.stop_when_done: WorkerPool | None = None

    def fork(self) -> int:
        self.next_pid += 1
        self.alive.add(self.next_pid)
        return self.next_pid

    def wait(self) -> tuple[int, int]:
        if not self.deaths and self.stop_when_done is not None:
            self.stop_when_done.stop()  # like SIGTERM once the scripted deaths have run out
        if not self.deaths:
            raise ChildProcessError
        pid, code = self.deaths.pop(0)
        self.alive.discard(pid)
        return pid, code << 8  # a wait status with that exit code

    def kill(self, pid: int, signum: int) -> None:
        self.killed.append((pid, signum))
        self.deaths.append((pid, 0))

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def pool(fake: FakeProcesses, count: int = 2, **policy: float) -> WorkerPool:
    return WorkerPool(count, lambda index: 0, policy=RestartPolicy(**policy), fork=fake.fork,
                      wait=fake.wait, kill=fake.kill, clock=lambda: fake.now, sleep=fake.sleep,
                      say=lambda line: None)  # fmt: skip


def test_a_dead_worker_is_restarted_with_backoff_and_the_others_keep_running() -> None:
    fake = FakeProcesses()
    p = pool(fake, backoff_s=0.5)
    fake.deaths = [(101, 1), (103, 1)]  # worker 0 dies, then its replacement dies too
    fake.stop_when_done = p  # after those two deaths nothing else happens until we stop
    assert p.run() == 0
    assert p.restarts == 2 and fake.slept == [0.5, 1.0]  # doubling backoff
    assert {pid for pid, _ in fake.killed} == {102, 104}  # the survivor and the last restart


def test_a_worker_that_keeps_dying_is_left_down_and_the_run_fails() -> None:
    fake = FakeProcesses()
    p = pool(fake, count=1, max_deaths=3, window_s=60.0, backoff_s=0.1)
    fake.deaths = [(101, 1), (102, 1), (103, 1)]
    assert p.run() == 1
    assert p.restarts == 2 and not p.pids


def test_deaths_outside_the_window_are_forgotten() -> None:
    fake = FakeProcesses()
    p = pool(fake, count=1, max_deaths=2, window_s=10.0, backoff_s=20.0, max_backoff_s=20.0)
    fake.deaths = [(101, 1), (102, 1), (103, 1)]  # 20 s apart: never two inside 10 s
    fake.stop_when_done = p
    assert p.run() == 0 and p.restarts == 3


def test_worker_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        WorkerPool(0, lambda index: 0)


def _post(port: int) -> tuple[int, str]:
    body = json.dumps({"model": "fake-model", "prompt": "hello world", "max_tokens": 3}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json", "Connection": "close"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers["X-DualMap-Worker"]


def test_two_workers_share_the_port_survive_a_kill_and_stop_together(tmp_path: Path) -> None:
    with serve_in_thread(FakeServerConfig()) as prefill, serve_in_thread(FakeServerConfig()) as decode:
        path = write_config(tmp_path, [prefill.port], decode.port)
        proc, port = start_serve(path, "--workers", "2")
        try:
            assert "2 workers on port" in proc.stdout.readline()  # type: ignore[union-attr]
            ready = [proc.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
            pids = sorted(int(line.split("pid ")[1].rstrip(")\n")) for line in ready)
            seen: set[str] = set()
            for _ in range(60):  # new connection each time: the kernel spreads them
                status, worker = _post(port)
                assert status == 200
                seen.add(worker)
            assert seen == {"0", "1"}
            os.kill(pids[0], signal.SIGKILL)
            back = proc.stdout.readline()  # type: ignore[union-attr]
            assert "(worker" in back and str(pids[0]) not in back
            assert all(_post(port)[0] == 200 for _ in range(10))
        finally:
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = proc.wait(timeout=30)
        assert code == 0 and time.monotonic() - started < 15
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert "exited with code -9; restarting" in err, err


def test_worker_count_is_checked_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scheduler.serve import main

    path = write_config(tmp_path, [8001], 8002)
    assert main(["--config", str(path), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_admin_changes_are_refused_under_several_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change through one worker's admin API would leave the other workers behind."""
    from scheduler.http.admin import ADMIN_TOKEN_ENV
    from tests.service_harness import cluster, run

    token = "admin-token-for-workers-0123456789"
    monkeypatch.setenv(ADMIN_TOKEN_ENV, token)

    async def body() -> None:
        async with cluster(workers=2) as h:
            auth = {"Authorization": f"Bearer {token}"}
            async with h.client.post(h.url + "/admin/instances/prefill-0/drain", headers=auth) as r:
                err = (await r.json())["error"]
                assert r.status == 409 and err["code"] == "membership_conflict", err
                assert "admin.watch_config" in err["message"]
            assert not h.scheduler.view["prefill-0"].draining
            async with h.client.get(h.url + "/admin/instances", headers=auth) as r:
                assert r.status == 200  # reading is fine: it describes the worker that answered

    run(body)
