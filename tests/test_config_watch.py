"""The watched config file: adds and removes in the file become membership changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from scheduler.config import InstanceConfig, load_config
from scheduler.membership.config_watch import ConfigWatcher
from scheduler.service import Scheduler, SchedulerOptions
from tests.fakes.openai_server import FakeOpenAIServer
from tests.service_harness import MODEL, ByteTokenizer, eventually, run


def _config(prefill: list[FakeOpenAIServer], decode: list[FakeOpenAIServer], **admin: Any) -> dict[str, Any]:
    return {
        "model": "/nonexistent/fake-model", "served_model_name": MODEL, "block_size": 16,
        "max_model_len": 256, "admin": admin,
        "prefill": [{"name": f"prefill-{i}", "port": s.port, "nixl_side_channel_port": 41100 + i,
                     "kv_events_port": 41200 + i} for i, s in enumerate(prefill)],
        "decode": [{"name": f"decode-{i}", "port": s.port, "nixl_side_channel_port": 41300 + i}
                   for i, s in enumerate(decode)],
    }  # fmt: skip


def _write(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(raw))


def test_file_changes_add_and_remove_instances(tmp_path: Path) -> None:
    async def body() -> None:
        servers = [await FakeOpenAIServer().start() for _ in range(5)]
        p0, p1, p2, d0, extra = servers
        path = tmp_path / "cluster.yaml"
        _write(path, _config([p0, p1], [d0]))
        sched = Scheduler(load_config(path), ByteTokenizer(), options=SchedulerOptions(health_interval_s=0.1))
        await sched.start()
        watcher = ConfigWatcher(path, sched.membership, interval_s=3600)
        await watcher.start()
        try:
            assert await watcher.check_once() == "unchanged"
            # An admin-API addition is not touched by file changes that do not name it.
            await sched.membership.add(InstanceConfig(
                name="by-admin", role="prefill", host="127.0.0.1", port=extra.port,
                nixl_side_channel_port=41190, kv_events_port=41290))  # fmt: skip
            _write(path, _config([p0, p1, p2], [d0]))  # prefill-2 appears
            assert await watcher.check_once() == "applied"
            assert sched.view.names("prefill") == ["prefill-0", "prefill-1", "by-admin", "prefill-2"]
            assert sched.urls["prefill-2"] == p2.url
            raw = _config([p0, p1, p2], [d0])
            raw["prefill"] = [e for e in raw["prefill"] if e["name"] != "prefill-1"]
            _write(path, raw)  # prefill-1 disappears: idle, so removed at once
            assert await watcher.check_once() == "applied"
            assert "prefill-1" not in sched.view and "by-admin" in sched.view
            path.write_text("prefill: [oops")  # invalid: ignored, membership kept
            assert await watcher.check_once() == "error"
            assert sched.view.names("prefill") == ["prefill-0", "by-admin", "prefill-2"]
            _write(path, raw)  # back to valid, same instances as last applied: nothing to do
            assert await watcher.check_once() == "applied"
            assert sched.view.names("prefill") == ["prefill-0", "by-admin", "prefill-2"]
            text = sched.metrics.render().decode()
            assert 'dualmap_config_reloads_total{result="applied"} 3.0' in text
            assert 'dualmap_config_reloads_total{result="error"} 1.0' in text
        finally:
            await watcher.stop()
            await sched.stop()
            for s in servers:
                await s.stop()

    run(body)


def test_watch_config_option_starts_the_watcher_with_the_scheduler(tmp_path: Path) -> None:
    async def body() -> None:
        servers = [await FakeOpenAIServer().start() for _ in range(3)]
        p0, p1, d0 = servers
        path = tmp_path / "cluster.yaml"
        _write(path, _config([p0], [d0], watch_config=True, watch_interval_s=0.05))
        sched = Scheduler(load_config(path), ByteTokenizer(), options=SchedulerOptions(health_interval_s=0.1))
        await sched.start()
        try:
            _write(path, _config([p0, p1], [d0], watch_config=True, watch_interval_s=0.05))
            assert await eventually(lambda: "prefill-1" in sched.view)
        finally:
            await sched.stop()
            for s in servers:
                await s.stop()

    run(body)
