"""Simulator speed: wall and CPU time of the two reference workloads.

  small: 12,000 requests on 8 instances   (target: <= 5 s)
  large: 100,000 requests on 1,024 instances (target: minutes)

Both are the synthetic trace tiled with ``tile_trace`` (distinct hash ids per copy) and cut to
size. Small: 4 copies back to back at the trace's own rate (3.9 req/s). Large: 26 copies
interleaved (more users, each prefix at its own rate), arrivals then scaled so that each of the
1,024 instances sees ``--large-load`` x the small run's per-instance rate (default 0.5: the
small run's native rate is already above DualMap's 8-instance capacity, and the large run's
26-fold longer cold start would otherwise keep queues, and DualMap's O(queue) rebalancing
scans, long for half the run). Wall time depends on what else the machine runs; CPU time
(process_time) is the steadier number. Trace preparation (reading, tiling, block hashes) is
timed separately: a capacity search pays it once for all its probes.

    PYTHONPATH=. .venv/bin/python scripts/bench_sim_speed.py [--skip-large] [--profile-top 15]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualmap_pd.sim import PreparedTrace, SimConfig, Simulator, tile_trace  # noqa: E402
from dualmap_pd.trace import load_trace  # noqa: E402
from dualmap_pd.workload_prep import WorkloadPrep  # noqa: E402

DEFAULT_TRACE = REPO / "scripts" / "traces" / "synthetic_trace.jsonl"


def prepare(path: Path, requests: int, block_size: int, interleave: bool) -> tuple[PreparedTrace, int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    base = load_trace(path)
    copies = math.ceil(requests / len(base))
    trace = PreparedTrace(tile_trace(base, copies, interleave)[:requests], f"{path.name} x{requests}")
    trace.block_hashes(block_size)
    return trace, copies, time.perf_counter() - wall, time.process_time() - cpu


def bench(label: str, cfg: SimConfig, trace: PreparedTrace, profile_top: int) -> dict:
    sim = Simulator(cfg, trace)
    profiler = cProfile.Profile() if profile_top else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    result = sim.run()
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    s = result.summary()
    print(
        f"{label:<44} sim wall {wall:7.2f} s  cpu {cpu:7.2f} s  events {s['events']:>9,}  "
        f"engine steps {s['engine_steps']:>10,}  ({s['events'] / cpu / 1e3:.0f} k events/cpu-s)  "
        f"SLO {s['slo_attainment']:.1%} hit {s['cache_hit_ratio']:.1%}",
        flush=True,
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(profile_top)
    return {"wall_s": wall, "cpu_s": cpu, **s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--policy", default="dualmap")
    ap.add_argument("--skip-large", action="store_true", help="only the 12k / 8-instance run")
    ap.add_argument("--profile-top", type=int, default=0, help="cProfile each run, print the top N functions")
    ap.add_argument("--large-load", type=float, default=0.5, help="large run's per-instance load vs the small run's")
    ap.add_argument("--modes", default="colocated,disaggregated")
    ap.add_argument("--json", action="store_true", help="end with one JSON object: every run's times and summary")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    load_avg = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cpus, load average {load_avg:.1f} (wall times inflate under load)")
    rows: list[dict] = []
    runs = [("12k requests, 8 instances", 12_000, 8, False, 1.0)]
    if not args.skip_large:
        runs.append(("100k requests, 1024 instances", 100_000, 1024, True, args.large_load))
    for label, n, instances, interleave, load in runs:
        trace, copies, prep_wall, prep_cpu = prepare(args.trace, n, 128, interleave)
        # Interleaved copies multiply the rate; scale it to `load` x 8-instance native per instance.
        rate_scale = load * instances / 8 / (copies if interleave else 1)
        print(f"{label:<44} prepare wall {prep_wall:6.2f} s  cpu {prep_cpu:6.2f} s  (load + tile + block hashes)")
        for mode in modes:
            cfg = SimConfig(
                trace=str(args.trace),
                policy=args.policy,
                mode=mode,
                prefill=instances,
                decode=max(1, instances // 2),
                rate_scale=rate_scale,
                # Every request runs, as traced: the target is simulator speed on 12k requests.
                workload=WorkloadPrep(paper_workload=False),
            )
            row = bench(f"{label}, {mode}, {args.policy}", cfg, trace, args.profile_top)
            rows.append({"run": label, "mode": mode, "policy": args.policy, "requests": n, "instances": instances,
                         "prepare_wall_s": prep_wall, **row})
    if args.json:
        print(json.dumps({"load_average": load_avg, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
