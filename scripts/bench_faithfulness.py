"""Ablation of the DualMap details aligned with the authors' code (issue 10): capacity of DualMap as
published (``dualmap_nomigrate``, authors' details by default) with one detail at a time switched
back to this project's earlier choice, and with all of them switched back.

The variants are registered here, for this run only, as subclasses with a fixed config; the
capacity search is the CLI's (dualmap_pd.sim.sweep), so the settings are the CLI's defaults
(paper workload, measured observation) unless given.

    .venv/bin/python scripts/bench_faithfulness.py [--trace T] [--prefill 8] [--tolerance 0.05] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualmap_pd.hotprefix import HotPrefixConfig  # noqa: E402
from dualmap_pd.policies import PREFILL_POLICIES, PolicyContext  # noqa: E402
from dualmap_pd.policies.dualmap import DualMapConfig, DualMapPolicy  # noqa: E402
from dualmap_pd.sim import CapacitySearch, SimConfig, load_prepared  # noqa: E402
from dualmap_pd.sim.sweep import CapacityJob, run_capacity_jobs  # noqa: E402
from dualmap_pd.workload_prep import WorkloadPrep  # noqa: E402

AUTHORS = DualMapConfig()
EARLIER = {
    "gain_backlog": {"rebalance_gain": "backlog"},
    "no_target_check": {"check_targets": False},
    "scope_involved": {"rebalance_scope": "involved"},
    "tiebreak_pending": {"tiebreak": "pending_and_active"},
    "hot_share_2_over_n": {"hot_prefix": HotPrefixConfig(extend_share=None)},
}
EARLIER["all_earlier"] = {k: v for change in EARLIER.values() for k, v in change.items()}


def register(label: str, config: DualMapConfig) -> str:
    name = f"dualmap_nomigrate.{label}"

    class Variant(DualMapPolicy):
        def __init__(self, ctx: PolicyContext) -> None:
            super().__init__(ctx, config)

    Variant.name = name
    Variant.__name__ = f"DualMap_{label}"
    PREFILL_POLICIES.register(Variant)
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=REPO / "scripts" / "traces" / "synthetic_trace.jsonl")
    ap.add_argument("--prefill", type=int, default=8)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--no-paper-workload", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = {"authors": "dualmap_nomigrate"}
    for label, change in EARLIER.items():
        names[label] = register(label, replace(AUTHORS, **change))  # type: ignore[arg-type]
    search = CapacitySearch(tolerance=args.tolerance, overload=False)
    trace = load_prepared(args.trace)
    base = SimConfig(trace=str(args.trace), prefill=args.prefill, workload=WorkloadPrep(paper_workload=not args.no_paper_workload))
    jobs = [CapacityJob(label, base.with_(policy=name), search, verbose=True) for label, name in names.items()]
    results = run_capacity_jobs(jobs, trace, workers=1)  # in-process: the variants live here
    ref = results["authors"].capacity_qps
    print(f"{'variant':<22}{'capacity':>10}{'vs authors':>12}{'hit':>8}")
    for label, res in results.items():
        hit = f"{res.cache_hit_ratio:.1%}" if res.cache_hit_ratio is not None else "-"
        print(f"{label:<22}{res.capacity_qps:>10.3f}{res.capacity_qps / ref if ref else 0:>11.2f}x{hit:>8}")
    if args.json:
        print(json.dumps({label: res.to_json() for label, res in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
