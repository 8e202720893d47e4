"""`dualmap-pd launch --add-prefill NAME --register URL`: start one more local vLLM instance and
register it with a running scheduler (the scale-out demo).

The new instance is not in the config file (the scheduler serving that file would otherwise
route to it before it exists); its ports are given or picked free above the config's ports.
Once it answers /health it is added through the scheduler's admin API (token from
DUALMAP_ADMIN_TOKEN). On Ctrl-C/SIGTERM it is removed from the scheduler first (drained, then
removed when idle), given a short grace for decode engines still pulling its KV, then stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import IO

from scheduler.http.admin import ADMIN_TOKEN_ENV
from scheduler.membership.admin_client import AdminClient, AdminRequestError
from scheduler.config import ClusterConfig, ConfigError, InstanceConfig, instance_from_dict
from scheduler.local.launcher import LaunchError, LocalCluster, log_tail, port_free

KV_PULL_GRACE_S = 3.0  # after removal: decode engines may still be reading the last prefills' KV


@dataclass(frozen=True)
class ScaleOutRequest:
    role: str
    name: str
    host: str = "127.0.0.1"
    port: int | None = None
    nixl_side_channel_port: int | None = None
    kv_events_port: int | None = None
    cpus: str | None = None
    register: str | None = None  # scheduler base URL


def _used_ports(config: ClusterConfig) -> set[int]:
    used = {config.scheduler.port}
    for inst in config.instances:
        used.update(p for p in (inst.port, inst.nixl_side_channel_port, inst.kv_events_port,
                                inst.kv_events_replay_port) if p is not None)  # fmt: skip
    return used


def pick_free_ports(config: ClusterConfig, host: str, count: int) -> list[int]:
    """``count`` ports above every port of the config that nothing on this machine holds."""
    taken = _used_ports(config)
    port, out = max(taken) + 1, []
    while len(out) < count:
        if port > 65535:
            raise ConfigError("no free port above the config's ports")
        if port not in taken and port_free(host, port):
            out.append(port)
        port += 1
    return out


def new_instance(config: ClusterConfig, req: ScaleOutRequest) -> InstanceConfig:
    wanted = {"port": req.port, "nixl_side_channel_port": req.nixl_side_channel_port}
    if req.role == "prefill":
        wanted["kv_events_port"] = req.kv_events_port
    missing = [k for k, v in wanted.items() if v is None]
    for key, port in zip(missing, pick_free_ports(config, req.host, len(missing))):
        wanted[key] = port
    entry = {"name": req.name, "host": req.host, **wanted}
    if req.cpus is not None:
        entry["cpus"] = req.cpus
    return instance_from_dict(entry, req.role)


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_on_signals() -> dict[int, object]:
    """SIGTERM/SIGHUP -> SystemExit, SIGINT -> KeyboardInterrupt (so cleanup runs; see
    launcher.run_launch for why SIGINT too); returns the previous handlers."""

    def _exit(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    return {sig: signal.signal(sig, _exit) for sig in HANDLED_SIGNALS}


def run_scale_out(config: ClusterConfig, req: ScaleOutRequest, *, timeout: float = 600.0,
                  pin: bool = True, spinners: str = "idle", out: IO[str] = sys.stdout) -> int:  # fmt: skip
    client = None
    if req.register is not None:
        token = os.environ.get(ADMIN_TOKEN_ENV)
        if not token:
            print(f"--register needs the scheduler's admin token in {ADMIN_TOKEN_ENV}", file=out)
            return 2
        client = AdminClient(req.register, token)
    try:
        inst = new_instance(config, req)
    except ConfigError as exc:
        print(f"config error: {exc}", file=out)
        return 2
    cluster = LocalCluster(config, pin=pin, spinners=spinners)
    registered = False
    previous = _raise_on_signals()
    try:
        srv = cluster.add_instance(inst)
        print(f"starting {inst.role} {inst.name} on {inst.url} (nixl {inst.nixl_side_channel_port}, "
              f"kv-events {inst.kv_events_port}); log {srv.log_path}", file=out, flush=True)  # fmt: skip
        cluster.wait_healthy(timeout, names=[inst.name])
        print(f"{inst.name} healthy after {srv.startup_seconds:.1f} s", file=out, flush=True)
        if client is not None:
            info = client.add(inst)
            registered = True
            change = info.get("change", {})
            print(f"registered with {req.register}: {change.get('prefixes_moved', 0)} of "
                  f"{change.get('prefixes_checked', 0)} recent prefixes changed candidates",
                  file=out, flush=True)  # fmt: skip
        print("Ctrl-C or SIGTERM deregisters and stops it.", file=out, flush=True)
        while (code := srv.proc.poll()) is None:
            time.sleep(1.0)
        print(f"{inst.name} exited with code {code}:\n{log_tail(srv.log_path)}", file=out, flush=True)
        return 1
    except (ConfigError, LaunchError, AdminRequestError) as exc:
        print(f"scale-out failed: {exc}", file=out, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for sig in HANDLED_SIGNALS:  # an impatient second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if registered and client is not None:
            _deregister(client, inst.name, out)
        print(f"stopping {inst.name}...", file=out, flush=True)
        cluster.stop()
        print(f"{inst.name} stopped", file=out, flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _deregister(client: AdminClient, name: str, out: IO[str]) -> None:
    try:
        info = client.remove(name)
        if info.get("status") != "removed" and not client.wait_removed(name, timeout_s=60.0):
            print(f"{name} still busy after 60 s; removing it anyway", file=out, flush=True)
            client.remove(name, force=True)
        print(f"deregistered {name}", file=out, flush=True)
        time.sleep(KV_PULL_GRACE_S)
    except AdminRequestError as exc:
        print(f"could not deregister {name}: {exc}", file=out, flush=True)
