"""Capacity with and without hot-prefix KV migration, against the best baseline (simulated).

For each trace: the effective capacity (highest QPS at which >= 90% of measured requests meet the
TTFT SLO) of ``dualmap`` (DualMap with prefix migration), ``dualmap_nomigrate`` (DualMap as
published) and every baseline policy, disaggregated: 8 prefill + 4 decode instances, profile
qwen7b-910b4, SLO 5 s (the issue's setting). Then one run of each DualMap variant at the
migration variant's capacity, for the migration counters (plans, bytes, hits served from
migrated blocks).

``--ablation`` adds ``dualmap_spare_nomigrate``: the rebalancing of ``dualmap`` (a queued request
may also move to the least-loaded instance, once) without copying prefixes, so a moved request
recomputes its prefix there. It separates what the copies buy from what the wider move set buys.
It is registered by this script only (never a policy of the product).

Writes results/migration_capacity.json and prints a table per trace.

    nice -n 10 .venv/bin/python scripts/bench_migration_sim.py [--jobs 2] [--ablation]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualmap_pd.policies import PREFILL_POLICIES  # noqa: E402
from dualmap_pd.policies.dualmap import DualMapMigratePolicy  # noqa: E402
from dualmap_pd.sim import CapacitySearch, SimConfig, Simulator, load_prepared  # noqa: E402
from dualmap_pd.sim.sweep import CapacityJob, run_capacity_jobs  # noqa: E402
from dualmap_pd.trace import native_qps  # noqa: E402

TRACES = (
    REPO / "scripts" / "traces" / "hot_prefix_slice.jsonl",
    REPO / "scripts" / "traces" / "synthetic_trace.jsonl",
)
MIGRATE, PUBLISHED = "dualmap", "dualmap_nomigrate"
ABLATION = "dualmap_spare_nomigrate"


class SpareMovesWithoutCopies(DualMapMigratePolicy):
    """Ablation: dualmap's wider rebalancing, no migration (moved requests recompute)."""

    name = ABLATION

    def __init__(self, ctx, config=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ctx, config)
        self.migration = None

    def _spare_moves_allowed(self) -> bool:
        return self.config.rebalance_to_least_loaded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, nargs="+", default=list(TRACES))
    ap.add_argument("--prefill", type=int, default=8)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--slo-ttft", type=float, default=5.0)
    ap.add_argument("--profile", default="qwen7b-910b4")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "migration_capacity.json")
    ap.add_argument("--ablation", action="store_true", help=f"also run {ABLATION} (see above)")
    ap.add_argument("--policies", default="all", help="comma-separated subset (default: every registered)")
    args = ap.parse_args()
    if args.ablation:
        PREFILL_POLICIES.register(SpareMovesWithoutCopies)  # fork: the workers inherit it
    names = PREFILL_POLICIES.names() if args.policies == "all" else args.policies.split(",")
    if args.ablation and ABLATION not in names:
        names.append(ABLATION)
    baselines = [n for n in names if n not in (MIGRATE, PUBLISHED, ABLATION)]
    payload: dict[str, object] = {
        "settings": {
            "mode": "disaggregated", "prefill": args.prefill, "decode": args.decode,
            "slo_ttft": args.slo_ttft, "profile": args.profile, "target": 0.9,
            "tolerance": args.tolerance, "seed": args.seed, "policies": names,
        },
        "traces": {},
    }  # fmt: skip
    began = time.monotonic()
    for path in args.traces:
        if not path.is_file():
            print(f"bench_migration_sim: trace not found: {path}", file=sys.stderr)
            return 2
        trace = load_prepared(path)
        search = CapacitySearch(tolerance=args.tolerance, qps_start=native_qps(trace.records)).validate()

        def config(policy: str, **extra: object) -> SimConfig:
            return SimConfig(
                trace=str(path), policy=policy, mode="disaggregated", prefill=args.prefill,
                decode=args.decode, slo_ttft=args.slo_ttft, profile=args.profile, seed=args.seed,
                **extra,  # type: ignore[arg-type]
            ).validate()  # fmt: skip

        jobs = [CapacityJob(name, config(name), search, verbose=True) for name in names]
        results = run_capacity_jobs(jobs, trace, workers=args.jobs)
        best = max(baselines, key=lambda n: results[n].capacity_qps) if baselines else MIGRATE
        at_qps = results[MIGRATE].capacity_qps or native_qps(trace.records)
        detail = {}
        for name in (MIGRATE, PUBLISHED):
            s = Simulator(config(name, qps=at_qps), trace).run().summary()
            detail[name] = {k: s[k] for k in (
                "slo_attainment", "cache_hit_ratio", "ttft_p50", "ttft_p90", "load_cv", "moves",
                "migrations", "migrated_hit_tokens", "hit_tokens", "prompt_tokens", "decisions",
            )}  # fmt: skip
        cap = {n: results[n].capacity_qps for n in names}
        lift = cap[MIGRATE] / cap[PUBLISHED] if cap.get(PUBLISHED) else float("inf")
        vs_best = cap[MIGRATE] / cap[best] if cap[best] else float("inf")
        print(f"\n== {path.name} ({len(trace)} requests, native {native_qps(trace.records):.2f} req/s) ==")
        print(f"{'policy':<20}{'capacity':>10}{'SLO att.':>10}{'hit':>8}")
        for name in sorted(names, key=lambda n: -cap[n]):
            r = results[name]
            att = f"{r.slo_attainment_at_capacity:.1%}" if r.slo_attainment_at_capacity is not None else "-"
            hit = f"{r.cache_hit_ratio:.1%}" if r.cache_hit_ratio is not None else "-"
            print(f"{name:<20}{r.capacity_qps:>10.3f}{att:>10}{hit:>8}")
        print(f"migration lift (dualmap / dualmap_nomigrate): {lift:.3f}x; dualmap / best baseline ({best}): {vs_best:.3f}x")
        m = detail[MIGRATE]
        served = m["migrated_hit_tokens"] / m["prompt_tokens"] if m["prompt_tokens"] else 0.0
        print(f"at {at_qps:.3f} qps: migrations {m['migrations']}, prompt tokens served from migrated blocks {served:.1%}")
        payload["traces"][path.name] = {  # type: ignore[index]
            "requests": len(trace),
            "capacity": {n: results[n].to_json() for n in names},
            "best_baseline": best,
            "lift_vs_nomigrate": lift,
            "ratio_vs_best_baseline": vs_best,
            "at_dualmap_capacity": {"qps": at_qps, **detail},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"\n{time.monotonic() - began:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
