"""Prefix-cache migration between prefill instances: the interface the core plans against.

The core decides *what* to copy and *when* (see policies/migration.py); a backend in
``connectors/`` does the copying (NIXL through vLLM's NixlConnector, or LMCache). Backends are
found by name through the ``dualmap_pd.migrators`` entry-point group, so this package never
imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

MIGRATOR_ENTRY_POINT_GROUP = "dualmap_pd.migrators"


@dataclass(frozen=True)
class Endpoint:
    """Where an instance can be reached (the engine's OpenAI-compatible base URL)."""

    name: str
    url: str


@dataclass(frozen=True)
class MigrationResult:
    ok: bool
    source: str
    target: str
    prefix_tokens: int  # tokens of the prefix asked for
    blocks: int  # full blocks the target now caches because of the copy
    bytes_moved: int  # KV bytes the target pulled (0 if unknown)
    seconds: float  # wall time of the whole migration
    error: str | None = None


class MigrationError(RuntimeError):
    """A migration backend that cannot work here (said at start-up, never silently)."""


@runtime_checkable
class PrefixMigrator(Protocol):
    """Copies the KV cache of a token prefix from one prefill instance to another."""

    async def migrate(self, prefix_tokens: Sequence[int], source: Endpoint, target: Endpoint) -> MigrationResult:
        """Copy the prefix's KV blocks from ``source`` to ``target``; never raises for a failed
        copy (the result says why), only for misuse."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def available_migrators() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=MIGRATOR_ENTRY_POINT_GROUP))


def load_migrator_class(name: str) -> type:
    """The backend class registered under ``name`` (``nixl``, ``lmcache``, ...)."""
    for ep in entry_points(group=MIGRATOR_ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise MigrationError(
        f"unknown migration backend {name!r}; installed: {', '.join(available_migrators()) or 'none'}"
    )
