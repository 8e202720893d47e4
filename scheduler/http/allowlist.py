"""Which hosts an instance registered at runtime may live on.

The scheduler forwards client prompts to every instance it knows, so letting the admin API add
an arbitrary URL would let a leaked admin token redirect traffic anywhere (SSRF and data
exfiltration). Registered hosts must therefore match an operator-written allow-list.

Host names are matched literally (case-insensitive) and never resolved: a DNS answer at check
time says nothing about the address the scheduler will connect to later.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from scheduler.config import ClusterConfig

LOOPBACK = ("127.0.0.0/8", "::1", "localhost")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class HostAllowList:
    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(dict.fromkeys(entries))
        self._networks: list[IPNetwork] = []
        self._names: set[str] = set()
        for entry in self.entries:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._names.add(entry.lower())

    @classmethod
    def for_config(cls, config: ClusterConfig) -> HostAllowList:
        """The configured list, or by default loopback plus the config file's instance hosts
        (the operator already trusts those)."""
        if config.admin.allowed_hosts is not None:
            return cls(config.admin.allowed_hosts)
        return cls((*LOOPBACK, *(inst.host for inst in config.instances)))

    def allows(self, host: str) -> bool:
        host = host.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return host in self._names
        return any(addr in net for net in self._networks)
