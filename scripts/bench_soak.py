"""Soak benchmark: sustained mixed load on the scheduler against stub engines; watches for leaks.

Three processes: stub prefill/decode engines (``bench_overhead.py _stubs``, i.e.
scheduler/emulator/server.py), a load generator (this script's ``_load``), and the scheduler,
which runs *in this process* so its event loop can be inspected. Every ``--interval`` seconds it
samples the scheduler process's RSS, open file descriptors and asyncio task count; after the load
stops it idles ``--settle`` seconds (idle upstream connections expire after 4 s) and samples once
more. The mix: non-streamed and streamed completions and chats over shared-prefix prompts,
malformed requests (400), and clients that hang up mid-stream.

A leak shows as RSS that keeps climbing after warm-up, or fds/tasks that stay above the
pre-load baseline once idle. Prints a table, then one JSON object (``--json`` also writes it).

    PYTHONPATH=. .venv/bin/python scripts/bench_soak.py --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = "fake-model"
WORDS = "ka ri to na mi su le po da ve lo ti ra ne so mu fa gi he ju ba co de el fi go".split()


# --- process: load generator ----------------------------------------------------------------


def _request(rng: random.Random, prefixes: list[str]) -> tuple[str, dict[str, Any] | bytes, str]:
    """(path, body, kind) of one request of the mix."""
    text = f"{rng.choice(prefixes)} {' '.join(rng.choices(WORDS, k=8))}"
    roll = rng.random()
    if roll < 0.05:
        return "/v1/completions", b'{"model": "fake-model", "prompt": ', "bad"
    if roll < 0.10:
        return "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 64, "stream": True}, "hangup"
    stream = roll < 0.45
    if roll < 0.70:
        return "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 8, "stream": stream}, "ok"
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "stream": stream}
    return "/v1/chat/completions", body, "ok"


async def _load(port: int, duration: float, concurrency: int, seed: int) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(seed)
    prefixes = [" ".join(rng.choices(WORDS, k=60)) for _ in range(16)]
    url = f"http://127.0.0.1:{port}"
    counts: dict[str, int] = {}
    stop_at = time.monotonic() + duration

    async def worker(session: aiohttp.ClientSession, k: int) -> None:
        wrng = random.Random(seed * 1000 + k)
        while time.monotonic() < stop_at:
            path, body, kind = _request(wrng, prefixes)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                async with session.post(url + path, data=data, headers={"Content-Type": "application/json"}) as r:
                    if kind == "hangup":
                        await r.content.readany()  # first bytes, then leave mid-stream
                        r.close()
                        key = f"hangup_{r.status}"
                    else:
                        await r.read()
                        key = f"{kind}_{r.status}"
            except aiohttp.ClientError as exc:
                key = f"client_error_{type(exc).__name__}"
            counts[key] = counts.get(key, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
    return counts


# --- the scheduler, in this process ---------------------------------------------------------


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _sample(t0: float, phase: str, done: int) -> dict[str, Any]:
    gc.collect()  # object counts of live objects only (a pause of a few ms every interval)
    return {"t_s": round(time.monotonic() - t0, 1), "phase": phase, "rss_mb": round(_rss_mb(), 1),
            "fds": _open_fds(), "tasks": len(asyncio.all_tasks()), "objects": len(gc.get_objects()),
            "py_blocks": sys.getallocatedblocks(),  # every Python allocation, untracked ones too
            "requests": done}  # fmt: skip


def _requests_done(sched: Any) -> int:
    return int(sum(sched.metrics.requests.values.values()))


async def _soak(args: argparse.Namespace, ports: list[int]) -> dict[str, Any]:
    from scheduler.http.app import bound_port, create_app, start_site
    from scheduler.config import config_from_dict
    from scheduler.service import Scheduler, SchedulerOptions
    from tests.service_harness import ByteTokenizer

    cfg = config_from_dict({
        "model": "/nonexistent/fake-model", "served_model_name": MODEL, "block_size": 16,
        "max_model_len": 4096,
        "prefill": [{"name": f"prefill-{i}", "port": p, "nixl_side_channel_port": 41000 + i,
                     "kv_events_port": 41100 + i} for i, p in enumerate(ports[: args.prefill])],
        "decode": [{"name": f"decode-{i}", "port": p, "nixl_side_channel_port": 41200 + i}
                   for i, p in enumerate(ports[args.prefill :])],
    })  # fmt: skip
    sched = Scheduler(cfg, ByteTokenizer(), options=SchedulerOptions(health_interval_s=1.0))
    runner = await start_site(create_app(sched), "127.0.0.1", 0)
    port = bound_port(runner)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        await asyncio.sleep(2.5)  # two health-probe rounds: their keep-alive connections are idle state
        samples.append(_sample(t0, "baseline", 0))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        load = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "_load", str(port), str(args.duration),
            str(args.concurrency), str(args.seed), env=env, stdout=subprocess.PIPE)  # fmt: skip
        reader = asyncio.ensure_future(load.communicate())
        first_snapshot = None
        types_after_warmup: Counter[str] | None = None
        while not reader.done():
            await asyncio.wait([reader], timeout=args.interval)
            if not reader.done():
                samples.append(_sample(t0, "load", _requests_done(sched)))
                if types_after_warmup is None and len(samples) >= 3:
                    types_after_warmup = _object_types()
                if args.tracemalloc and first_snapshot is None and len(samples) >= 3:
                    first_snapshot = tracemalloc.take_snapshot()  # after warm-up
        out, _ = reader.result()
        counts = json.loads(out)
        await asyncio.sleep(args.settle)
        samples.append(_sample(t0, "idle", _requests_done(sched)))
        growth = _top_growth(first_snapshot) if first_snapshot is not None else []
        type_growth = (_object_types() - types_after_warmup).most_common(8) if types_after_warmup else []
        router_left, decode_left = len(sched.router), sum(
            st.running_requests for st in sched.view.instances("decode"))
    finally:
        await runner.cleanup()
    result = _summary(args, samples, counts, router_left, decode_left)
    result["gc_type_growth_after_warmup"] = type_growth  # which objects a leak would be made of
    if args.tracemalloc:
        result["tracemalloc_top_growth"] = growth
    return result


def _object_types() -> Counter[str]:
    gc.collect()  # count what is still reachable, not garbage awaiting collection
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def _top_growth(before: tracemalloc.Snapshot, n: int = 8) -> list[str]:
    """Where memory grew since ``before`` (allocation sites, biggest first)."""
    stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
    return [str(st) for st in stats[:n]]


def _summary(args: argparse.Namespace, samples: list[dict[str, Any]], counts: dict[str, int],
             router_left: int, decode_left: int) -> dict[str, Any]:  # fmt: skip
    base, idle = samples[0], samples[-1]
    load = [s for s in samples if s["phase"] == "load"]
    # Warm-up: the first third of the load phase (pools, caches and allocator arenas fill).
    steady = load[len(load) // 3 :] or load
    total = sum(counts.values())
    unexpected = {k: v for k, v in counts.items()
                  if not (k in ("ok_200", "bad_400") or k.startswith("hangup_200"))}  # fmt: skip
    return {
        "duration_s": args.duration, "concurrency": args.concurrency,
        "requests": total, "req_per_s": round(total / args.duration, 1), "outcomes": counts,
        "unexpected_outcomes": unexpected,
        "rss_mb": {"baseline": base["rss_mb"], "steady_first": steady[0]["rss_mb"] if steady else None,
                   "steady_last": steady[-1]["rss_mb"] if steady else None,
                   "max": max(s["rss_mb"] for s in samples), "idle": idle["rss_mb"]},
        "rss_growth_steady_mb": round(steady[-1]["rss_mb"] - steady[0]["rss_mb"], 1) if steady else None,
        "fds": {"baseline": base["fds"], "max": max(s["fds"] for s in samples), "idle": idle["fds"]},
        "tasks": {"baseline": base["tasks"], "max": max(s["tasks"] for s in samples), "idle": idle["tasks"]},
        "fd_leak": idle["fds"] - base["fds"], "task_leak": idle["tasks"] - base["tasks"],
        "gc_objects_growth_steady": steady[-1]["objects"] - steady[0]["objects"] if steady else None,
        "router_requests_left": router_left, "decode_requests_left": decode_left,
        "samples": samples,
    }  # fmt: skip


def _table(result: dict[str, Any]) -> str:
    rows = [f"{'t_s':>6} {'phase':>8} {'rss_mb':>8} {'fds':>5} {'tasks':>6} {'gc_objects':>10} "
            f"{'py_blocks':>9} {'requests':>9}"]
    for s in result["samples"]:
        rows.append(f"{s['t_s']:>6} {s['phase']:>8} {s['rss_mb']:>8} {s['fds']:>5} {s['tasks']:>6} "
                    f"{s['objects']:>10} {s['py_blocks']:>9} {s['requests']:>9}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_load":
        port, duration, concurrency, seed = argv[1:5]
        print(json.dumps(asyncio.run(_load(int(port), float(duration), int(concurrency), int(seed)))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--settle", type=float, default=6.0, help="idle seconds before the last sample")
    p.add_argument("--concurrency", type=int, default=32, help="clients in the closed loop")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the result here")
    p.add_argument("--tracemalloc", action="store_true",
                   help="report where memory grew after warm-up (slows the scheduler down)")  # fmt: skip
    args = p.parse_args(argv)
    if args.tracemalloc:
        tracemalloc.start()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stubs = subprocess.Popen([sys.executable, str(REPO / "scripts" / "bench_overhead.py"), "_stubs",
                              str(args.prefill), str(args.decode)],
                             # The stubs log a traceback for every client that hangs up mid-
                             # stream (by design here): keep them off the report.
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        ports = json.loads(stubs.stdout.readline())  # type: ignore[union-attr]
        result = asyncio.run(_soak(args, ports))
    finally:
        stubs.stdin.close()  # type: ignore[union-attr]
        stubs.wait(10)
    print(_table(result))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
