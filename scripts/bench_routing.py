#!/usr/bin/env python3
"""Routing decision latency: microseconds per decision, p50/p99, at 8, 64 and 1024 instances.

A decision is what the scheduler does on the hot path once the prompt's block hashes are known
(tokenization and hashing excluded): the router's admit (policy.select, enqueue, the policy's
on_decision hook, the rebalancing check) plus the dispatch check. Requests come from a real
trace; instances' caches are warmed by routing the first half of it and letting each request
"finish" (and each prefix copy land) at once, so selection sees realistic hit patterns.

    python scripts/bench_routing.py [--trace PATH] [--instances 8,64,1024] [--policies dualmap,...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dualmap_pd.cluster import ClusterView  # noqa: E402
from dualmap_pd.cost import CostModel, get_profile  # noqa: E402
from dualmap_pd.hashing import hash_block, trace_block_hashes  # noqa: E402
from dualmap_pd.policies import PREFILL_POLICIES, PolicyContext  # noqa: E402
from dualmap_pd.request import RoutedRequest  # noqa: E402
from dualmap_pd.router import PrefillRouter  # noqa: E402
from dualmap_pd.trace import load_trace  # noqa: E402


def percentile(sorted_vals: list[float], q: float) -> float:
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def bench(policy_name: str, n: int, records, block_size: int) -> dict:
    view = ClusterView(block_size)
    for i in range(n):
        view.add_instance(f"p{i}", "prefill")
    ctx = PolicyContext(CostModel(get_profile("qwen7b-910b4")), slo_ttft=5.0, seed=0)
    router = PrefillRouter(PREFILL_POLICIES.create(policy_name, ctx), view)
    reqs = [
        RoutedRequest(f"r{i}", r.input_length, trace_block_hashes(r.hash_ids, r.input_length, block_size),
                      block_size, r.timestamp / 1000.0, fallback_key=hash_block(None, [i]))
        for i, r in enumerate(records)
    ]
    lat_ns: list[int] = []
    warm = len(reqs) // 2
    clock = time.perf_counter_ns
    for i, req in enumerate(reqs):
        now = req.arrival
        t0 = clock()
        router.admit(req, now)
        sent = router.take_dispatchable(now, [req.queued_on] if req.queued_on else None)
        t1 = clock()
        if i >= warm:
            lat_ns.append(t1 - t0)
        # Prefix copies land at once (as the migration executor would report them) and release
        # the requests held for them.
        planner = router.policy.migration
        for plan in router.take_migrations():
            planner.on_started(plan, now)
            view.add_blocks(plan.target, plan.block_hashes, [None, *plan.block_hashes[:-1]])
            planner.on_finished(plan, now)
            sent += router.take_dispatchable(now, [plan.target])
        # The engine finishes at once and stores the prompt's blocks (as its KV events would say).
        for r, inst in sent:
            view.add_blocks(inst, r.block_hashes, [None, *r.block_hashes[:-1]])
            router.finish_prefill(r.request_id, now)
    lat_us = sorted(x / 1000 for x in lat_ns)
    return {
        "policy": policy_name,
        "instances": n,
        "decisions": len(lat_us),
        "p50_us": round(percentile(lat_us, 0.50), 1),
        "p99_us": round(percentile(lat_us, 0.99), 1),
        "mean_us": round(sum(lat_us) / len(lat_us), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(REPO / "scripts" / "traces" / "synthetic_trace.jsonl"))
    ap.add_argument("--instances", default="8,64,1024")
    ap.add_argument("--policies", default=",".join(PREFILL_POLICIES.names()))
    ap.add_argument("--requests", type=int, default=3993)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    records = load_trace(args.trace, limit=args.requests)
    rows = []
    for name in args.policies.split(","):
        for n in (int(x) for x in args.instances.split(",")):
            rows.append(bench(name, n, records, args.block_size))
            print(f"  {name} @ {n}: p50 {rows[-1]['p50_us']} us, p99 {rows[-1]['p99_us']} us", file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'policy':<20}{'instances':>10}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}")
        for r in rows:
            print(f"{r['policy']:<20}{r['instances']:>10}{r['p50_us']:>10}{r['p99_us']:>10}{r['mean_us']:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
