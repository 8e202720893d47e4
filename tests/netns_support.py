"""Several "hosts" on one machine: Linux network namespaces joined by an Ethernet bridge.

``NetnsHosts(["sw", "h1", "h2"])`` creates one namespace per name (``dmpd-mh-<name>``), each with
its own loopback and one veth interface ``eth0`` holding ``10.213.0.<10+i>/24``; the first
namespace also holds the bridge the others' veth pairs plug into, so every namespace reaches
every other over a real (virtual) Ethernet link and no address is shared. No namespace gets a
route out: traffic stays between these namespaces. Processes are started inside one with
``ip netns exec`` (``argv(ns, cmd)``), so a server binding its namespace's IP is a server on
another host as far as the kernel's network stack is concerned. Hosts may also have DNS-like
names (``aliases``): ``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts`` over /etc/hosts
for the processes it starts, so every namespace resolves every host's names (the way a
StatefulSet pod's name ``prefill-0.prefill`` resolves in Kubernetes) and nothing outside them
changes.

Needs root and iproute2 (``apt-get install iproute2``); ``unavailable_reason()`` says why not
otherwise, and the tests skip with that reason. Teardown kills every process left in the
namespaces (they are all the test's own) and deletes them; ``remove_stale()`` does the same
for namespaces with this prefix left behind by an earlier run that was killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "dmpd-mh-"  # the default; each user of this module keeps to its own prefix
SUBNET = "10.213.0"
BRIDGE = "br0"
ETC_NETNS = Path("/etc/netns")  # per-namespace /etc files that `ip netns exec` mounts


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """None when namespaces can be made here, else why not (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    probe = f"dmpd-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def namespace_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def remove_namespace(ns: str, grace: float = 20.0) -> None:
    """SIGTERM every process in ``ns``, SIGKILL what is left after ``grace``, delete ``ns``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = namespace_pids(ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and namespace_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.2)
    _ip("netns", "del", ns, check=False)


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces with ``prefix`` left by an earlier run (killed before its teardown);
    returns their names."""
    listed = _ip("netns", "list", check=False).stdout.splitlines()
    stale = [line.split()[0] for line in listed if line.startswith(prefix)]
    for ns in stale:
        remove_namespace(ns, grace=5.0)
    for folder in ETC_NETNS.glob(f"{prefix}*"):
        shutil.rmtree(folder, ignore_errors=True)
    return stale


class NetnsHosts:
    """Namespaces on one bridge; ``ip[name]`` is each one's address. A context manager."""

    def __init__(self, names: list[str], aliases: dict[str, list[str]] | None = None,
                 prefix: str = PREFIX) -> None:  # fmt: skip
        if not names:
            raise ValueError("at least one host")
        self.names = list(names)
        self.ns = {n: f"{prefix}{n}" for n in names}
        self.ip = {n: f"{SUBNET}.{10 + i}" for i, n in enumerate(names)}
        self.aliases = aliases or {}  # host -> extra names resolving to its IP in every namespace
        self._made: list[str] = []

    def __enter__(self) -> NetnsHosts:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        switch = self.ns[self.names[0]]
        for i, name in enumerate(self.names):
            ns = self.ns[name]
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            if i == 0:
                _ip("-n", ns, "link", "add", BRIDGE, "type", "bridge")
                _ip("-n", ns, "link", "set", BRIDGE, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip[name]}/24", "dev", BRIDGE)
                continue
            # One end in the switch namespace (on the bridge), the other is this host's eth0.
            port = f"p{i}"
            _ip("link", "add", port, "netns", switch, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", switch, "link", "set", port, "master", BRIDGE, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        shared = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{self.ip[n]} {' '.join(names)}\n" for n, names in self.aliases.items())  # fmt: skip
        for name in self.names:  # the machine's host name is, in each namespace, that host
            (ETC_NETNS / self.ns[name]).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / self.ns[name] / "hosts").write_text(f"{shared}{self.ip[name]} {socket.gethostname()}\n")

    def close(self) -> None:
        for ns in reversed(self._made):
            remove_namespace(ns)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        self._made.clear()
        with contextlib.suppress(OSError):  # only when empty: it may hold others' namespaces
            ETC_NETNS.rmdir()

    def argv(self, name: str, cmd: list[str]) -> list[str]:
        """``cmd`` run inside host ``name`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns[name], *cmd]

    def rx_bytes(self, name: str) -> int:
        """Bytes host ``name`` received on its link (eth0; the bridge on the switch host)."""
        dev = BRIDGE if name == self.names[0] else "eth0"
        out = subprocess.run(self.argv(name, ["cat", f"/sys/class/net/{dev}/statistics/rx_bytes"]),
                             capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
        return int(out.stdout)

    def fetch(self, name: str, url: str, body: bytes | None = None, timeout: float = 10.0) -> str:
        """GET ``url`` (POST ``body`` as JSON when given) from inside host ``name``; raises OSError
        unless it answers 2xx."""
        code = ("import sys, urllib.request\n"
                "data = sys.stdin.buffer.read() or None\n"
                "req = urllib.request.Request(sys.argv[1], data=data, headers={'Content-Type': 'application/json'})\n"
                "with urllib.request.urlopen(req, timeout=float(sys.argv[2])) as r:\n"
                "    sys.stdout.write(r.read().decode())\n")  # fmt: skip
        out = subprocess.run(self.argv(name, [sys.executable, "-c", code, url, str(timeout)]),
                             input=body or b"", capture_output=True, timeout=timeout + 30)  # fmt: skip
        if out.returncode != 0:
            last = out.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise OSError(f"{url} from {name}: {last}")
        return out.stdout.decode()

    def wait_http(self, name: str, url: str, timeout: float, alive: list[subprocess.Popen[bytes]],
                  logs: list[Path]) -> None:  # fmt: skip
        """Poll ``url`` from host ``name`` until it answers; fail early if a process in ``alive``
        exits, quoting the ends of ``logs``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.fetch(name, url, timeout=2.0)
                return
            except OSError:
                pass
            dead = [p for p in alive if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                tails = "\n".join(f"--- {p}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                                  for p in logs if p.exists())  # fmt: skip
                what = f"exited ({[p.args[4:8] for p in dead]})" if dead else f"no answer in {timeout:.0f} s"
                raise AssertionError(f"{url} from {name}: {what}\n{tails}")
            time.sleep(1.0)
