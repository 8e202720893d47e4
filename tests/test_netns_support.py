"""tests/netns_support.py on its own (no vLLM): hosts reach each other by name over the bridge,
a server bound to one host's name is not on the others' loopback, and everything is gone after
the ``with`` block, after a failure too. Needs root and iproute2 (skips otherwise)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import netns_support
from tests.netns_support import ETC_NETNS, NetnsHosts

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(120)]

PORT = 8770
PREFIX = "dmpd-nt-"  # not the multihost test's: a run of that may be going on


@pytest.fixture(autouse=True)
def _needs_namespaces() -> None:
    reason = netns_support.unavailable_reason()
    if reason:
        pytest.skip(reason)
    netns_support.remove_stale(PREFIX)


def ours() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(PREFIX)]


def test_hosts_reach_each_other_by_name_and_vanish_afterwards() -> None:
    with NetnsHosts(["a", "b", "c"], {"b": ["server-0.svc"]}, PREFIX) as hosts:
        assert sorted(ours()) == sorted(hosts.ns.values())
        server = subprocess.Popen(hosts.argv("b", [sys.executable, "-m", "http.server", str(PORT),
                                                   "--bind", "server-0.svc"]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            hosts.wait_http("c", f"http://server-0.svc:{PORT}/", 30, [server], [])
            assert hosts.fetch("a", f"http://{hosts.ip['b']}:{PORT}/")  # across the bridge
            with pytest.raises(OSError):  # bound to b's address, not to every interface
                hosts.fetch("b", f"http://127.0.0.1:{PORT}/", timeout=2)
            with pytest.raises(OSError):  # and not on this (the root) namespace's loopback
                hosts.fetch("a", f"http://127.0.0.1:{PORT}/", timeout=2)
            assert hosts.rx_bytes("c") > 0
        finally:
            server.terminate()
            server.wait(10)
    assert ours() == [] and not list(ETC_NETNS.glob(f"{PREFIX}*"))


def test_a_failure_inside_still_tears_down_and_leftovers_are_removed() -> None:
    with pytest.raises(RuntimeError):
        with NetnsHosts(["x", "y"], prefix=PREFIX) as hosts:
            sleeper = subprocess.Popen(hosts.argv("y", ["sleep", "300"]))
            raise RuntimeError("a test failed")
    assert ours() == [] and sleeper.wait(10) is not None  # its process was ended too
    # A run killed before its teardown leaves namespaces behind: the next run removes them.
    left = NetnsHosts(["stale"], prefix=PREFIX)
    left.__enter__()
    assert netns_support.remove_stale(PREFIX) == [f"{PREFIX}stale"]
    assert ours() == []
