"""Shared harness for the scheduler-service tests: fake engines + a Scheduler app on a free port."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from scheduler.http.app import bound_port, create_app, start_site
from scheduler.http.auth import ApiKeyGuard
from scheduler.config import ClusterConfig, config_from_dict
from scheduler.service import IntakeFactory, Scheduler, SchedulerOptions
from scheduler.dispatch.tokenization import ChatOptions
from tests.fakes.openai_server import FakeOpenAIServer, FakeServerConfig

MODEL = "fake-model"
BLOCK = 16
MAX_MODEL_LEN = 256


class ByteTokenizer:
    """One token per UTF-8 byte (+4), BOS = 1: enough to exercise hashing and length checks."""

    vocab_size = 260

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [b + 4 for b in text.encode()]
        return [1, *ids] if add_special_tokens else ids

    def render_chat(self, messages: Sequence[dict[str, Any]], options: ChatOptions) -> str:
        text = "".join(f"<{m['role']}>{m.get('content') or ''}" for m in messages)
        return text + ("<assistant>" if options.add_generation_prompt else "")


@dataclass
class Harness:
    scheduler: Scheduler
    url: str
    client: aiohttp.ClientSession
    prefill: list[FakeOpenAIServer]
    decode: list[FakeOpenAIServer]

    async def post(self, path: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any], Any]:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
        async with self.client.post(self.url + path, data=data, headers=headers, **kw) as r:
            text = await r.text()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text
            return r.status, dict(r.headers), payload


def fake_cluster_config(
    prefill: Sequence[FakeOpenAIServer],
    decode: Sequence[FakeOpenAIServer],
    kv_events_ports: Sequence[int] | None = None,
    admin: dict[str, Any] | None = None,
) -> ClusterConfig:
    """The cluster config of fake engines: prefill-<i> and decode-<i> on their ports."""
    # The side-channel and KV-event ports are never bound here, but the config refuses two uses
    # of one port: skip any that the OS happened to give a fake server.
    taken = {s.port for s in [*prefill, *decode]} | set(kv_events_ports or ())
    spare = (port for port in range(40100, 41000) if port not in taken)
    return config_from_dict({
        "model": "/nonexistent/fake-model", "served_model_name": MODEL, "block_size": BLOCK,
        "max_model_len": MAX_MODEL_LEN,
        "prefill": [{"name": f"prefill-{i}", "port": s.port, "nixl_side_channel_port": next(spare),
                     "kv_events_port": kv_events_ports[i] if kv_events_ports else next(spare)}
                    for i, s in enumerate(prefill)],
        "decode": [{"name": f"decode-{i}", "port": s.port, "nixl_side_channel_port": next(spare)}
                   for i, s in enumerate(decode)],
        "admin": admin or {},
    })  # fmt: skip


@asynccontextmanager
async def cluster(
    n_prefill: int = 2,
    n_decode: int = 1,
    prefill_config: FakeServerConfig | None = None,
    decode_config: FakeServerConfig | None = None,
    intake: IntakeFactory | None = None,
    kv_events_ports: Sequence[int] | None = None,
    admin: dict[str, Any] | None = None,
    api_keys: ApiKeyGuard | None = None,
    **options: Any,
) -> AsyncIterator[Harness]:
    prefill = [await FakeOpenAIServer(prefill_config or FakeServerConfig()).start() for _ in range(n_prefill)]
    decode = [await FakeOpenAIServer(decode_config or FakeServerConfig()).start() for _ in range(n_decode)]
    cfg = fake_cluster_config(prefill, decode, kv_events_ports, admin)
    opts = SchedulerOptions(**{"health_interval_s": 0.1, "max_body_bytes": 64 * 1024, **options})
    sched = Scheduler(cfg, ByteTokenizer(), options=opts, intake=intake)
    runner = await start_site(create_app(sched, api_keys), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as client:
            yield Harness(sched, f"http://127.0.0.1:{bound_port(runner)}", client, prefill, decode)
    finally:
        await runner.cleanup()
        for s in prefill + decode:
            await s.stop()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), timeout=30))


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on right now (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def completion(prompt: Any = "hello world", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra}


