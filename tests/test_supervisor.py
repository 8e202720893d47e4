"""The launcher's supervision: restart with backoff, give up after N deaths in a window, never
touch the other servers. The policy with a fake clock and cluster; then `dualmap-pd launch` with
stub servers (tests/fakes/vllm_stub) killed for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from scheduler.local.supervisor import RestartPolicy, ServerState, Supervisor
from tests.service_harness import free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_STUB = REPO_ROOT / "tests" / "fakes" / "vllm_stub"


@dataclass
class FakeServer:
    pid: int
    exit_code: int | None = None
    healthy: bool = True


@dataclass
class FakeCluster:
    servers: dict[str, FakeServer]
    next_pid: int = 1000
    restarted: list[str] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)
    healthy_after_restart: bool = True
    fail_restart: bool = False

    def names(self) -> list[str]:
        return list(self.servers)

    def exit_code(self, name: str) -> int | None:
        return self.servers[name].exit_code

    def pid(self, name: str) -> int | None:
        return self.servers[name].pid

    def restart(self, name: str) -> None:
        if self.fail_restart:
            raise RuntimeError("port 8100 is already in use")
        self.restarted.append(name)
        self.next_pid += 1
        self.servers[name] = FakeServer(self.next_pid, healthy=self.healthy_after_restart)

    def reap(self, name: str) -> None:
        self.reaped.append(name)

    def check_healthy(self, name: str) -> bool:
        return self.servers[name].healthy

    def last_log_lines(self, name: str) -> str:
        return f"(log of {name})"

    def kill(self, name: str, code: int = -9) -> None:
        self.servers[name].exit_code = code


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _supervisor(cluster: FakeCluster, **policy: float) -> tuple[Supervisor, Clock, list[str]]:
    clock, lines = Clock(), []
    sup = Supervisor(cluster, RestartPolicy(**policy), report=lines.append, clock=clock,  # type: ignore[arg-type]
                     sleep=lambda s: setattr(clock, "now", clock.now + s))  # fmt: skip
    return sup, clock, lines


def _cluster() -> FakeCluster:
    return FakeCluster({"prefill-0": FakeServer(1), "prefill-1": FakeServer(2), "decode-0": FakeServer(3)})


def test_a_dead_server_is_restarted_after_its_backoff_and_the_others_are_untouched() -> None:
    cluster = _cluster()
    sup, clock, lines = _supervisor(cluster, backoff_s=2.0)
    sup.step()
    assert cluster.restarted == []
    cluster.kill("prefill-0")
    clock.now = 10.0
    sup.step()
    assert sup.records["prefill-0"].state is ServerState.WAITING
    assert any("prefill-0 exited with code -9" in line and "(log of prefill-0)" in line for line in lines)
    clock.now = 11.9
    sup.step()
    assert cluster.restarted == []  # still in its backoff
    clock.now = 12.0
    sup.step()
    assert cluster.restarted == ["prefill-0"]
    assert sup.records["prefill-0"].state is ServerState.STARTING
    clock.now = 30.0
    sup.step()
    assert sup.records["prefill-0"].state is ServerState.RUNNING
    assert any("prefill-0 healthy again (restart 1" in line and "20.0 s after it died" in line for line in lines)
    status = sup.status()
    assert status["prefill-0"] == {"state": "running", "pid": 1001, "restarts": 1, "last_exit_code": -9}
    assert status["prefill-1"]["restarts"] == 0 and status["decode-0"]["pid"] == 3
    assert "prefill-0 running restarts=1" in sup.status_line()
    assert cluster.reaped == ["prefill-0"]  # its leftovers at its death; nothing else stopped


def test_backoff_doubles_per_death_in_the_window_and_is_capped() -> None:
    policy = RestartPolicy(backoff_s=1.0, max_backoff_s=5.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 10)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_server_that_keeps_dying_is_left_down_with_a_message_and_the_rest_keep_running() -> None:
    cluster = _cluster()
    sup, clock, lines = _supervisor(cluster, max_deaths=3, window_s=100.0, backoff_s=1.0)
    for _ in range(3):
        cluster.kill("decode-0", code=1)
        sup.step()
        clock.now += 10.0
        sup.step()  # restarts it (backoff over)
    assert cluster.restarted == ["decode-0", "decode-0"]
    assert sup.records["decode-0"].state is ServerState.DOWN
    assert "decode-0" in cluster.reaped
    assert any("decode-0 died 3 times within 100 s: leaving it down" in line for line in lines)
    assert {n: r.state for n, r in sup.records.items() if n != "decode-0"} == {
        "prefill-0": ServerState.RUNNING, "prefill-1": ServerState.RUNNING}
    assert not sup.all_down()


def test_deaths_older_than_the_window_are_forgotten() -> None:
    cluster = _cluster()
    sup, clock, _ = _supervisor(cluster, max_deaths=2, window_s=50.0, backoff_s=1.0)
    for _ in range(4):  # one death every 60 s: never two within the window
        cluster.kill("prefill-1")
        sup.step()
        clock.now += 2.0
        sup.step()
        clock.now += 58.0
        sup.step()
    assert sup.records["prefill-1"].state is ServerState.RUNNING
    assert sup.records["prefill-1"].restarts == 4


def test_a_restart_that_never_gets_healthy_counts_as_a_death() -> None:
    cluster = _cluster()
    cluster.healthy_after_restart = False
    sup, clock, lines = _supervisor(cluster, start_timeout_s=30.0, backoff_s=0.0)
    cluster.kill("prefill-0")
    sup.step()
    sup.step()
    assert sup.records["prefill-0"].state is ServerState.STARTING
    clock.now = 31.0
    sup.step()
    assert cluster.reaped == ["prefill-0", "prefill-0"]  # the hung restart is killed too
    assert len(sup.records["prefill-0"].deaths) == 2
    assert any("not healthy 30 s after its restart" in line for line in lines)


def test_a_restart_that_cannot_start_is_a_death_not_a_crash() -> None:
    cluster = _cluster()
    cluster.fail_restart = True
    sup, clock, lines = _supervisor(cluster, max_deaths=2, backoff_s=0.0)
    cluster.kill("prefill-0")
    sup.step()
    sup.step()
    assert sup.records["prefill-0"].state is ServerState.DOWN
    assert any("restart 1 failed: port 8100 is already in use" in line for line in lines)


def test_run_returns_when_every_server_is_down() -> None:
    cluster = FakeCluster({"decode-0": FakeServer(1)})
    cluster.fail_restart = True
    sup, _, lines = _supervisor(cluster, max_deaths=1)
    cluster.kill("decode-0")
    assert sup.run() == 1
    assert lines[-1] == "every server is down: stopping"


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(max_deaths=0)
    with pytest.raises(ValueError):
        RestartPolicy(backoff_s=10.0, max_backoff_s=1.0)


# ---------------------------------------------------------------- `dualmap-pd launch` for real


def _launch(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], Path, Path]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the launcher only checks it exists
    http, side, events = (ports := free_ports(8))[:3], ports[3:6], ports[6:]
    raw = {
        "model": str(model), "served_model_name": "fake-model", "block_size": 16, "max_model_len": 256,
        "run_dir": str(tmp_path / "runs"),
        "prefill": [{"name": f"prefill-{i}", "port": http[i], "nixl_side_channel_port": side[i],
                     "kv_events_port": events[i]} for i in range(2)],
        "decode": [{"name": "decode-0", "port": http[2], "nixl_side_channel_port": side[2]}],
    }  # fmt: skip
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": f"{VLLM_STUB}:{REPO_ROOT}"}
    log = tmp_path / "launch.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualmap_pd.cli", "launch", "--config", str(path), "--no-pin",
         "--spinners", "leave", *extra],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return proc, tmp_path / "runs" / "launch-status.json", log


def _wait(cond, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except (OSError, ValueError, KeyError):
            pass  # the status file is being replaced
        time.sleep(0.1)
    return False


def _status(path: Path) -> dict[str, dict[str, object]]:
    return json.loads(path.read_text())["servers"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_launch_restarts_a_killed_server_on_its_port_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    proc, status_path, log = _launch(tmp_path)
    try:
        assert _wait(lambda: status_path.is_file() or proc.poll() is not None), log.read_text()
        assert proc.poll() is None, log.read_text()
        before = _status(status_path)
        victim = int(before["prefill-0"]["pid"])  # type: ignore[arg-type]
        os.kill(victim, signal.SIGKILL)
        assert _wait(lambda: _status(status_path)["prefill-0"]["state"] == "running"
                     and _status(status_path)["prefill-0"]["restarts"] == 1), log.read_text()  # fmt: skip
        after = _status(status_path)
        assert after["prefill-0"]["pid"] != victim and after["prefill-0"]["last_exit_code"] == -9
        for other in ("prefill-1", "decode-0"):
            assert after[other]["pid"] == before[other]["pid"] and after[other]["restarts"] == 0
        import urllib.request

        with urllib.request.urlopen(f"{after['prefill-0']['url']}/health", timeout=5) as resp:
            assert resp.status == 200  # the same port serves again
        text = log.read_text()
        assert "prefill-0 exited with code -9" in text and "prefill-0 restarted (restart 1" in text
        assert "prefill-0 running restarts=1" in text
        pids = [int(s["pid"]) for s in after.values()]  # type: ignore[arg-type]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert not any(_alive(p) for p in pids), "a server outlived launch"
        assert not status_path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_launch_no_restart_stops_everything_when_one_server_dies(tmp_path: Path) -> None:
    proc, status_path, log = _launch(tmp_path, "--no-restart")
    try:
        assert _wait(lambda: status_path.is_file() or proc.poll() is not None), log.read_text()
        assert proc.poll() is None, log.read_text()
        status = _status(status_path)
        os.kill(int(status["decode-0"]["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
        assert proc.wait(30) == 1
        assert "decode-0 exited with code -9" in log.read_text()
        assert not any(_alive(int(s["pid"])) for s in status.values())  # type: ignore[arg-type]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_launch_retries_a_restart_whose_port_is_still_taken(tmp_path: Path) -> None:
    import socket

    # The backoff leaves the squatter below time to take the port first, however busy the box.
    proc, status_path, log = _launch(tmp_path, "--restart-backoff", "4")
    try:
        assert _wait(lambda: status_path.is_file() or proc.poll() is not None), log.read_text()
        entry = _status(status_path)["decode-0"]
        port = int(str(entry["url"]).rsplit(":", 1)[1])
        os.kill(int(entry["pid"]), signal.SIGKILL)  # type: ignore[arg-type]
        squatter = socket.socket()
        # As servers do: connections the killed server left in TIME_WAIT must not block the bind.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:  # someone takes its port before the restart
            assert _wait(lambda: squatter.bind(("127.0.0.1", port)) is None, 5.0)
            squatter.listen()
            assert _wait(lambda: "decode-0: restart 1 failed" in log.read_text(), 15.0), log.read_text()
        finally:
            squatter.close()
        assert _wait(lambda: _status(status_path)["decode-0"]["state"] == "running"
                     and _status(status_path)["decode-0"]["restarts"] == 2), log.read_text()  # fmt: skip
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
