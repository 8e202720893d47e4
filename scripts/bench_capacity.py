"""Effective capacity of every prefill policy, colocated and disaggregated.

Capacity = the highest arrival rate (QPS) at which >= 90% of the measured requests meet the
TTFT SLO (5 s), found per policy by bracketing + bisection to 2% (each probe a full simulation).
Setting: the synthetic Mooncake trace, the paper's profile (qwen7b-910b4), 8 prefill instances;
disaggregated runs add 4 decode instances (2:1 P:D; the decode side does not bound TTFT in the
model, it only has to be large enough not to distort TPOT). Warm-up: the paper's 500 requests.

Writes results/capacity_<trace>.json (and PNG plots with --plot) and prints the table.

    PYTHONPATH=. .venv/bin/python scripts/bench_capacity.py [--jobs 2] [--plot]
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
from dualmap_pd.sim import CapacitySearch, SimConfig, load_prepared  # noqa: E402
from dualmap_pd.sim.capacity import CapacityResult  # noqa: E402
from dualmap_pd.sim.sweep import CapacityJob, run_capacity_jobs  # noqa: E402
from dualmap_pd.trace import native_qps  # noqa: E402

DEFAULT_TRACE = REPO / "scripts" / "traces" / "synthetic_trace.jsonl"
MODES = ("colocated", "disaggregated")


def table(mode: str, results: dict[str, CapacityResult]) -> str:
    lines = [
        f"== {mode} ==",
        f"{'policy':<20}{'capacity':>10}{'SLO att.':>10}{'hit':>8}{'p90 TTFT':>10}{'load CV':>9}{'probes':>8}",
    ]
    for name, res in sorted(results.items(), key=lambda kv: -kv[1].capacity_qps):
        at = next((p for p in res.points if p.qps == res.capacity_qps), None)
        att = f"{res.slo_attainment_at_capacity:.1%}" if res.slo_attainment_at_capacity is not None else "-"
        hit = f"{res.cache_hit_ratio:.1%}" if res.cache_hit_ratio is not None else "-"
        p90 = f"{at.ttft_p90:.2f}" if at and at.ttft_p90 is not None else "-"
        cv = f"{at.extra.get('load_cv', 0):.3f}" if at else "-"
        lines.append(f"{name:<20}{res.capacity_qps:>10.3f}{att:>10}{hit:>8}{p90:>10}{cv:>9}{len(res.points):>8}")
    if "dualmap" in results:
        best = max((r for n, r in results.items() if n != "dualmap"), key=lambda r: r.capacity_qps, default=None)
        if best is not None and best.capacity_qps > 0:
            lines.append(
                f"dualmap / best baseline ({best.policy}): {results['dualmap'].capacity_qps / best.capacity_qps:.2f}x"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--policies", default="all", help="comma-separated, or 'all' registered")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--prefill", type=int, default=8)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--slo-ttft", type=float, default=5.0)
    ap.add_argument("--profile", default="qwen7b-910b4")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/capacity_<trace>.json)")
    ap.add_argument("--plot", action="store_true", help="also write results/capacity_<trace>_<mode>.png")
    args = ap.parse_args()
    if not args.trace.is_file():
        print(f"bench_capacity: trace not found: {args.trace}", file=sys.stderr)
        return 2
    search = CapacitySearch(policies=args.policies, tolerance=args.tolerance).validate()
    names = search.policy_names()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    trace = load_prepared(args.trace, args.requests)
    search = CapacitySearch(
        policies=args.policies, tolerance=args.tolerance, qps_start=native_qps(trace.records)
    ).validate()
    jobs = []
    for mode in modes:
        for name in names:
            cfg = SimConfig(
                trace=str(args.trace),
                policy=name,
                mode=mode,  # type: ignore[arg-type]
                prefill=args.prefill,
                decode=args.decode,
                slo_ttft=args.slo_ttft,
                profile=args.profile,
                requests=args.requests,
            ).validate()
            jobs.append(CapacityJob(f"{mode}/{name}", cfg, search, verbose=True))
    began = time.monotonic()
    results = run_capacity_jobs(jobs, trace, workers=args.jobs)
    elapsed = time.monotonic() - began
    by_mode = {mode: {k.split("/", 1)[1]: r for k, r in results.items() if k.startswith(mode + "/")} for mode in modes}
    print(
        f"trace {args.trace.name} ({len(trace)} requests, native {native_qps(trace.records):.2f} req/s), "
        f"{args.prefill} prefill (+{args.decode} decode when disaggregated), SLO {args.slo_ttft:g} s, "
        f"{args.profile}, target 90%, tolerance {args.tolerance:.0%}; {elapsed:.0f} s"
    )
    for mode in modes:
        print(table(mode, by_mode[mode]))
    out = args.out or REPO / "results" / f"capacity_{args.trace.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {
            "trace": str(args.trace),
            "requests": len(trace),
            "prefill": args.prefill,
            "decode": args.decode,
            "slo_ttft": args.slo_ttft,
            "profile": args.profile,
            "target": search.target,
            "tolerance": search.tolerance,
            "policies": names,
            "registered_policies": PREFILL_POLICIES.names(),
        },
        **{mode: {name: res.to_json() for name, res in by_mode[mode].items()} for mode in modes},
    }
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    if args.plot:
        from dualmap_pd.sim.plot import plot_attainment

        for mode in modes:
            png = out.with_name(f"{out.stem}_{mode}.png")
            plot_attainment(by_mode[mode], png, search.target, f"{args.trace.stem}, {mode}, SLO {args.slo_ttft:g} s")
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
