"""A PrefixMigrator stand-in: records calls, answers as told, and can play the target engine's
KV events (the copied blocks appear in a ClusterView) when a copy "lands"."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dualmap_pd.migration import Endpoint, MigrationResult


@dataclass
class FakeMigrator:
    """``outcome``: "ok", "fail" (ok=False result), "raise" (the backend blows up) or "hang"
    (never answers; the runner's timeout must end it). ``delay_s`` before answering.
    ``on_landed(target, tokens)`` runs when an "ok" copy lands (e.g. add blocks to a view)."""

    outcome: str = "ok"
    delay_s: float = 0.0
    bytes_per_token: int = 1000
    block_size: int = 16
    on_landed: Callable[[str, list[int]], None] | None = None
    calls: list[tuple[list[int], str, str]] = field(default_factory=list)
    closed: bool = False
    cancelled: int = 0

    def __init__(self, model: str = "fake", *, block_size: int = 16, timeout: float = 30.0, **kw: object) -> None:
        self.model, self.block_size, self.timeout = model, block_size, timeout
        self.outcome, self.delay_s, self.bytes_per_token = "ok", 0.0, 1000
        self.on_landed, self.calls, self.closed, self.cancelled = None, [], False, 0

    async def migrate(self, prefix_tokens: Sequence[int], source: Endpoint, target: Endpoint) -> MigrationResult:
        tokens = list(prefix_tokens)
        self.calls.append((tokens, source.name, target.name))
        try:
            if self.outcome == "hang":
                await asyncio.Event().wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.outcome == "raise":
            raise RuntimeError("backend bug")
        blocks = len(tokens) // self.block_size
        if self.outcome == "fail":
            return MigrationResult(False, source.name, target.name, len(tokens), 0, 0, self.delay_s,
                                   error="source leg: connection refused")  # fmt: skip
        if self.on_landed is not None:
            self.on_landed(target.name, tokens)
        return MigrationResult(True, source.name, target.name, len(tokens), blocks,
                               len(tokens) * self.bytes_per_token, self.delay_s)  # fmt: skip

    async def close(self) -> None:
        self.closed = True
