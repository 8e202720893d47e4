"""Watch the serve config file and apply instance adds and removes when it changes on disk.

Enabled by ``admin.watch_config: true``. Every ``interval_s`` the file's bytes are compared with
the last version seen; when they differ and the new file is a valid config, its instance lists
are diffed against the previous file's (not against the live membership, so instances added
through the admin API are left alone unless the file names them):

- an instance that appeared is added (skipped if the admin API already added that name);
- an instance that disappeared is removed gracefully: drained, then removed once idle;
- an instance whose entry changed (port, host, role) is left as it is, with a warning: remove
  it from the file, wait for the removal, then add the new entry.

An invalid file is reported and ignored (the running membership stays); other settings are only
read at startup, and a change to them is logged as such.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.background import cancel_and_wait
from scheduler.config import ClusterConfig, ConfigError, InstanceConfig, load_config
from scheduler.http.errors import ApiError

if TYPE_CHECKING:
    from scheduler.membership.registry import Membership

log = logging.getLogger(__name__)


class ConfigWatcher:
    def __init__(
        self,
        path: Path,
        membership: Membership,
        *,
        interval_s: float = 2.0,
        load: Callable[[Path], ClusterConfig] = load_config,
        read: Callable[[Path], bytes] = Path.read_bytes,
    ) -> None:
        self.path = path
        self.membership = membership
        self.interval_s = interval_s
        self._load, self._read = load, read
        self._digest: bytes | None = None
        self._applied: ClusterConfig | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._digest = self._fingerprint()
        try:
            self._applied = self._load(self.path)
        except ConfigError as exc:
            log.error("config watch: %s is invalid now; waiting for a valid version: %s", self.path, exc)
        self._task = asyncio.create_task(self._run(), name="dualmap-config-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def _fingerprint(self) -> bytes | None:
        try:
            return hashlib.sha256(self._read(self.path)).digest()
        except OSError:
            return None  # being replaced (editors write a new file and rename it)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:  # keep watching whatever one round did
                log.exception("config watch: applying %s failed", self.path)

    async def check_once(self) -> str:
        """Look at the file once; returns 'unchanged', 'applied' or 'error'."""
        digest = self._fingerprint()
        if digest is None or digest == self._digest:
            return "unchanged"
        self._digest = digest
        result = "error"
        try:
            new = self._load(self.path)
        except ConfigError as exc:
            log.error("config watch: ignoring invalid %s: %s", self.path, exc)
        else:
            ok = await self._apply(self._applied, new)
            self._applied = new
            result = "applied" if ok else "error"
        self.membership.metrics.config_reloads.inc((result,))
        return result

    async def _apply(self, old: ClusterConfig | None, new: ClusterConfig) -> bool:
        before = {i.name: i for i in old.instances} if old is not None else {}
        after = {i.name: i for i in new.instances}
        if old is not None:
            _warn_static_changes(old, new)
        ok = True
        for name in sorted(after.keys() & before.keys()):
            if after[name] != before[name]:
                log.warning("config watch: %s changed in the file; not applied at runtime (remove "
                            "it from the file, wait for the removal, then add the new entry)", name)  # fmt: skip
        # Adds first: a swap (remove one, add another) never leaves a pool empty.
        for name in sorted(after.keys() - before.keys()):
            ok &= await self._add(after[name])
        for name in sorted(before.keys() - after.keys()):
            ok &= await self._remove(name)
        return ok

    async def _add(self, inst: InstanceConfig) -> bool:
        if inst.name in self.membership.names():
            return True  # already added (through the admin API)
        try:
            await self.membership.add(inst)
        except ApiError as exc:
            log.error("config watch: cannot add %s: %s", inst.name, exc.message)
            return False
        return True

    async def _remove(self, name: str) -> bool:
        if name not in self.membership.names():
            return True
        try:
            await self.membership.remove(name)
        except ApiError as exc:
            log.error("config watch: cannot remove %s: %s", name, exc.message)
            return False
        return True


def _warn_static_changes(old: ClusterConfig, new: ClusterConfig) -> None:
    static = [f.name for f in dataclasses.fields(ClusterConfig)
              if f.name not in ("prefill", "decode", "source")]  # fmt: skip
    changed = [name for name in static if getattr(old, name) != getattr(new, name)]
    if changed:
        log.warning("config watch: %s changed in the file; only instance lists apply at runtime, "
                    "restart the scheduler for the rest", ", ".join(changed))  # fmt: skip
