"""Capacity searches for several (policy, setting) pairs, optionally in worker processes.

Each job is independent and deterministic, so running them in parallel changes only the wall
time, never a number. Workers load and prepare the trace themselves (about half a second)
rather than sharing state through module globals.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from dualmap_pd.sim.capacity import CapacityResult, find_capacity
from dualmap_pd.sim.config import CapacitySearch, SimConfig
from dualmap_pd.sim.simulator import Simulator
from dualmap_pd.sim.workload import PreparedTrace, load_prepared
from dualmap_pd.trace import native_qps


@dataclass(frozen=True)
class CapacityJob:
    key: str  # label in logs and results, e.g. "colocated/dualmap"
    config: SimConfig  # its policy and setting; its rate options are replaced by each probe's
    search: CapacitySearch
    verbose: bool = False  # one stderr line per probe


def run_capacity_job(job: CapacityJob, trace: PreparedTrace | None = None) -> CapacityResult:
    cfg = job.config.with_(qps=None, rate_scale=None).validate()
    if trace is None:
        trace = load_prepared(cfg.trace, cfg.requests, cfg.tile)
    start = job.search.qps_start or native_qps(trace.records)
    if job.verbose:
        described = Simulator(cfg.with_(qps=start), trace).workload.description
        print(f"capacity {job.key}: {described}", file=sys.stderr, flush=True)

    def run_at(qps: float) -> dict:
        began = time.monotonic()
        summary = Simulator(cfg.with_(qps=qps), trace).run().summary()
        if job.verbose:
            verdict = "pass" if summary["slo_attainment"] >= job.search.target else "fail"
            print(
                f"capacity {job.key}: qps {qps:.3f} -> SLO attainment {summary['slo_attainment']:.1%} "
                f"({verdict}), hit {summary['cache_hit_ratio']:.1%} [{time.monotonic() - began:.1f} s]",
                file=sys.stderr,
                flush=True,
            )
        return summary

    return find_capacity(cfg.policy, run_at, start, job.search.target, job.search.tolerance, job.search.max_probes)


def run_capacity_jobs(
    jobs: Sequence[CapacityJob], trace: PreparedTrace | None = None, workers: int = 1
) -> dict[str, CapacityResult]:
    """Results by job key, in job order. ``trace`` is reused when running in-process."""
    if workers <= 1 or len(jobs) <= 1:
        return {job.key: run_capacity_job(job, trace) for job in jobs}
    # fork: workers start fast and inherit the imported modules; nothing else is shared.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("fork")) as pool:
        futures = [pool.submit(run_capacity_job, job) for job in jobs]
        return {job.key: fut.result() for job, fut in zip(jobs, futures)}
