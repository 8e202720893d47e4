"""Small helpers for the scheduler's background tasks (pollers, watchers, health checks)."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancel ``task`` and wait until it has really stopped, so a service's ``stop`` returns only
    once nothing of it runs any more (a restart must not find the old loop still polling)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
