"""Scheduler overhead benchmark (a benchmark, not a test).

(a) ``throughput`` (default): requests/s and latency of ``dualmap-pd serve`` (1 and 2 worker
    processes by default, ``--workers``) against instant stub
    prefill/decode servers (scheduler/emulator/server.py, fixed-delay mode). Three processes: the stubs, the
    scheduler (pinned to its own core), and a closed-loop load generator (raw HTTP/1.1 keep-alive,
    so the client costs far less than the server it measures).
(b) ``added-latency --config cluster.yaml``: the latency the scheduler adds over calling the real
    prefill and decode servers directly (same two-leg P/D flow by hand), interleaved one request
    at a time so drift hits both paths alike. The cluster must already be running
    (``dualmap-pd launch``); the scheduler is started here unless ``--scheduler-url`` is given.

    PYTHONPATH=. .venv/bin/python scripts/bench_overhead.py throughput --duration 10 --workers 1,2
    PYTHONPATH=. .venv/bin/python scripts/bench_overhead.py added-latency --config scripts/cluster.local.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = "ka ri to na mi su le po da ve lo ti ra ne so mu fa gi he ju ba co de el fi go".split()


def _loop_factory():  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def prompts(n: int, words: int, groups: int, seed: int) -> list[str]:
    """``n`` prompts in ``groups`` shared-prefix families (3/4 shared words, 1/4 unique tail)."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choices(WORDS, k=words * 3 // 4)) for _ in range(groups)]
    return [f"{prefixes[i % groups]} {' '.join(rng.choices(WORDS, k=words // 4))}" for i in range(n)]


# --- process: stub servers ------------------------------------------------------------------


async def _run_stubs(n_prefill: int, n_decode: int, model: str) -> None:
    from scheduler.emulator.server import EngineServer, ServerConfig

    servers = [await EngineServer(ServerConfig(model=model)).start()
               for _ in range(n_prefill + n_decode)]  # fmt: skip
    print(json.dumps([s.port for s in servers]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent closes
    for s in servers:
        await s.stop()


# --- process: load generator ----------------------------------------------------------------


async def _load(host: str, port: int, bodies: list[bytes], concurrency: int, warmup: float,
                duration: float) -> dict[str, float]:  # fmt: skip
    requests = [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(b), b)
        for b in bodies
    ]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    latencies: list[float] = []
    failures = completed = 0

    async def worker(offset: int) -> None:
        nonlocal failures, completed
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        while (now := time.perf_counter()) < stop_at:
            writer.write(requests[i % len(requests)])
            i += concurrency
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            completed += 1
            if not head.startswith(b"HTTP/1.1 200"):
                failures += 1
            elif now >= measure_from:
                latencies.append(done - now)
        writer.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return {
        "requests": len(latencies),
        "requests_incl_warmup": completed,
        "failures": failures,
        "req_per_s": len(latencies) / duration,
        "p50_ms": _pct(latencies, 0.50) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan"),
    }


# --- orchestration --------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (serve --workers), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(_cpu_seconds(int(child)) for child in children)


def _pin(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu else []


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_scheduler(config_path: Path, port: int, args: argparse.Namespace,
                     workers: int = 1) -> subprocess.Popen[bytes]:  # fmt: skip
    cpus = args.sched_cpu if args.sched_cpu is not None else f"0-{workers - 1}"
    cmd = [*_pin(cpus), sys.executable, "-m", "scheduler.serve", "--config", str(config_path),
           "--port", str(port), "--policy", args.policy,
           "--max-engine-pending", str(args.max_engine_pending), "--workers", str(workers)]  # fmt: skip
    if args.no_intake:
        cmd += ["--no-kv-events", "--no-engine-metrics"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}/health")
    return proc


def throughput(args: argparse.Namespace, workers: int = 1) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    me = [sys.executable, str(Path(__file__).resolve())]
    stubs = subprocess.Popen([*_pin(args.aux_cpu), *me, "_stubs", str(args.prefill), str(args.decode)],
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    sched = None
    try:
        ports = json.loads(stubs.stdout.readline())  # type: ignore[union-attr]
        import yaml

        cfg = {
            "model": str(Path(args.model_dir).resolve()), "served_model_name": "fake-model",
            "block_size": 128, "max_model_len": 8192,
            "prefill": [{"name": f"prefill-{i}", "port": p, "nixl_side_channel_port": 41000 + i,
                         "kv_events_port": 41100 + i} for i, p in enumerate(ports[: args.prefill])],
            "decode": [{"name": f"decode-{i}", "port": p, "nixl_side_channel_port": 41200 + i}
                       for i, p in enumerate(ports[args.prefill :])],
        }  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.yaml"
            path.write_text(yaml.safe_dump(cfg))
            port = _free_port()
            sched = _start_scheduler(path, port, args, workers)
            cpu_before = _cpu_seconds(sched.pid)
            load = subprocess.run(
                [*_pin(args.aux_cpu), *me, "_load", str(port), str(args.concurrency), str(args.warmup),
                 str(args.duration), str(args.prompt_words), str(args.max_tokens)],
                env=env, capture_output=True, check=True,
            )  # fmt: skip
            result = json.loads(load.stdout)
            cpu = _cpu_seconds(sched.pid) - cpu_before
            # CPU per request is what "one core" buys, however busy the machine is.
            result["scheduler_cpu_us_per_request"] = cpu / max(1, result["requests_incl_warmup"]) * 1e6
            result["one_core_capacity_req_per_s"] = result["requests_incl_warmup"] / cpu if cpu else None
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                metrics = r.read().decode()
        # With several workers this is the one worker that answered the scrape.
        result["decisions"] = [ln for ln in metrics.splitlines() if ln.startswith("dualmap_decisions_total")]
        result["workers"] = workers
        return result
    finally:
        if sched is not None:
            sched.terminate()
            sched.wait(10)
        stubs.stdin.close()  # type: ignore[union-attr]
        stubs.wait(10)


def _bodies(n: int, words: int, max_tokens: int, model: str = "fake-model") -> list[bytes]:
    return [json.dumps({"model": model, "prompt": p, "max_tokens": max_tokens}).encode()
            for p in prompts(n, words, groups=8, seed=1)]  # fmt: skip


async def _added_latency(args: argparse.Namespace, sched_url: str) -> dict[str, object]:
    import aiohttp

    from scheduler.config import load_config

    cfg = load_config(args.config)
    model = cfg.served_model_name
    rng = random.Random(7)
    direct: list[float] = []
    routed: list[float] = []
    async with aiohttp.ClientSession() as s:

        async def via_scheduler(body: dict[str, object]) -> float:
            t0 = time.perf_counter()
            async with s.post(f"{sched_url}/v1/completions", json=body) as r:
                answer = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"scheduler answered {r.status}: {answer[:500]!r}")
            return time.perf_counter() - t0

        async def by_hand(body: dict[str, object], k: int) -> float:
            pre, dec = cfg.prefill[k % len(cfg.prefill)], cfg.decode[k % len(cfg.decode)]
            t0 = time.perf_counter()
            leg = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
            async with s.post(f"{pre.url}/v1/completions", json=leg) as r:
                kv = (await r.json())["kv_transfer_params"]
            async with s.post(f"{dec.url}/v1/completions", json={**body, "kv_transfer_params": kv}) as r:
                await r.read()
            return time.perf_counter() - t0

        for k in range(args.requests + 2):
            bodies = [{"model": model, "max_tokens": args.max_tokens,
                       "prompt": " ".join(rng.choices(WORDS, k=args.prompt_words))} for _ in range(2)]  # fmt: skip
            order = [("d", by_hand(bodies[0], k)), ("s", via_scheduler(bodies[1]))]
            if k % 2:
                order.reverse()
            times = {}
            for kind, coro in order:
                times[kind] = await coro
            if k >= 2:  # first rounds warm connections and caches
                direct.append(times["d"])
                routed.append(times["s"])
    paired = [r - d for r, d in zip(routed, direct)]
    return {
        "requests_each": len(direct),
        "direct_p50_ms": _pct(direct, 0.5) * 1e3, "direct_p99_ms": _pct(direct, 0.99) * 1e3,
        "scheduler_p50_ms": _pct(routed, 0.5) * 1e3, "scheduler_p99_ms": _pct(routed, 0.99) * 1e3,
        "added_p50_ms": (_pct(routed, 0.5) - _pct(direct, 0.5)) * 1e3,
        "added_p99_ms": (_pct(routed, 0.99) - _pct(direct, 0.99)) * 1e3,
        # Same-round differences cancel most machine-load drift between the two paths.
        "paired_added_p50_ms": _pct(paired, 0.5) * 1e3,
        "paired_added_p90_ms": _pct(paired, 0.9) * 1e3,
    }  # fmt: skip


def _histogram_quantiles(metrics_text: str, name: str, qs: tuple[float, ...]) -> dict[str, float]:
    """Quantiles of a Prometheus histogram, interpolated linearly inside its buckets."""
    from scheduler.intake.engine_metrics import parse_samples

    samples = parse_samples(metrics_text, {f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    buckets = sorted((float(labels["le"]), v) for labels, v in samples.get(f"{name}_bucket", []))
    count = sum(v for _, v in samples.get(f"{name}_count", []))
    out: dict[str, float] = {}
    if not count:
        return out
    out["mean_ms"] = sum(v for _, v in samples[f"{name}_sum"]) / count * 1e3
    for q in qs:
        target, lo_bound, lo_count = q * count, 0.0, 0.0
        for bound, cum in buckets:
            if cum >= target:
                frac = (target - lo_count) / (cum - lo_count) if cum > lo_count else 1.0
                hi = bound if bound != float("inf") else lo_bound
                out[f"p{int(q * 100)}_ms"] = (lo_bound + frac * (hi - lo_bound)) * 1e3
                break
            lo_bound, lo_count = bound, cum
    return out


def added_latency(args: argparse.Namespace) -> dict[str, object]:
    from scheduler.config import load_config

    cfg = load_config(args.config)
    sched = None
    url = args.scheduler_url
    if url is None:
        port = _free_port()
        sched = _start_scheduler(Path(args.config), port, args)
        url = f"http://127.0.0.1:{port}"
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as r:
            result = r.run(_added_latency(args, url))
        result["served_model"] = cfg.served_model_name
        # The scheduler's own account, immune to engine-time noise: arrival to decode start,
        # minus the prefill round trip (bucket-interpolated).
        with urllib.request.urlopen(f"{url}/metrics") as resp:
            text = resp.read().decode()
        result["scheduler_self_reported_overhead"] = _histogram_quantiles(
            text, "dualmap_scheduler_overhead_seconds", (0.5, 0.99)
        )
        return result
    finally:
        if sched is not None:
            sched.terminate()
            sched.wait(10)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_stubs":
        with asyncio.Runner(loop_factory=_loop_factory()) as r:
            r.run(_run_stubs(int(argv[1]), int(argv[2]), "fake-model"))
        return 0
    if argv and argv[0] == "_load":
        port, conc, warm, dur, words, max_tokens = argv[1:7]
        bodies = _bodies(2000, int(words), int(max_tokens))
        with asyncio.Runner(loop_factory=_loop_factory()) as r:
            res = r.run(_load("127.0.0.1", int(port), bodies, int(conc), float(warm), float(dur)))
        print(json.dumps(res))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="throughput", choices=("throughput", "added-latency"))
    p.add_argument("--config", help="cluster YAML of a running real cluster (added-latency)")
    p.add_argument("--scheduler-url", help="use this running scheduler instead of starting one")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prefill", type=int, default=2, help="stub prefill servers")
    p.add_argument("--decode", type=int, default=1, help="stub decode servers")
    p.add_argument("--policy", default="dualmap")
    p.add_argument("--max-engine-pending", type=int, default=2)
    p.add_argument("--prompt-words", type=int, default=200, help="~1.5 tokens per word")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--requests", type=int, default=50, help="added-latency: requests per path")
    p.add_argument("--model-dir", default=str(REPO / "models" / "tiny-llama"),
                   help="tokenizer for the stub run")  # fmt: skip
    p.add_argument("--workers", default="1,2",
                   help="throughput: comma-separated scheduler worker counts to measure (serve --workers)")
    p.add_argument("--sched-cpu", default=None,
                   help="CPU list for the scheduler ('' = unpinned; default: one core per worker from 0)")
    p.add_argument("--aux-cpu", default="1", help="CPU list for stubs and load generator")
    p.add_argument("--keep-intake", dest="no_intake", action="store_false",
                   help="throughput: keep KV-event/metrics intake (stubs publish none)")  # fmt: skip
    args = p.parse_args(argv)
    if args.mode == "added-latency":
        if not args.config:
            p.error("added-latency needs --config")
        args.no_intake = False if args.scheduler_url is None else args.no_intake
        result = added_latency(args)
    else:
        counts = [int(n) for n in args.workers.split(",") if n.strip()]
        result = {f"workers_{n}": throughput(args, n) for n in counts}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
