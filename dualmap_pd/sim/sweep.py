"""Capacity searches for several (policy, setting) pairs, optionally in worker processes.

Each job is independent and deterministic, so running them in parallel changes only the wall
time, never a number. Workers load and prepare the trace themselves (about half a second)
rather than sharing state through module globals.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TypeVar

from dualmap_pd.sim.capacity import OVERLOAD_FACTORS, CapacityResult, OverloadPoint, find_capacity, overload_reference
from dualmap_pd.sim.config import CapacitySearch, SimConfig
from dualmap_pd.sim.simulator import Simulator
from dualmap_pd.sim.workload import PreparedTrace, load_prepared
from dualmap_pd.trace import native_qps

J = TypeVar("J")
R = TypeVar("R")


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
    described = Simulator(cfg.with_(qps=start), trace).workload.description
    if job.verbose:
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

    res = find_capacity(cfg.policy, run_at, start, job.search.target, job.search.tolerance, job.search.max_probes)
    res.workload = described
    return res


@dataclass(frozen=True)
class OverloadJob:
    key: str  # the capacity job's key
    config: SimConfig
    factor: float
    qps: float
    verbose: bool = False


def run_overload_job(job: OverloadJob, trace: PreparedTrace | None = None) -> OverloadPoint:
    cfg = job.config.with_(qps=job.qps, rate_scale=None).validate()
    if trace is None:
        trace = load_prepared(cfg.trace, cfg.requests, cfg.tile)
    s = Simulator(cfg, trace).run().summary()
    point = OverloadPoint(job.factor, job.qps, s["slo_attainment"], s["slo_attainment"] * s["offered_qps"])
    if job.verbose:
        print(
            f"overload {job.key}: {job.factor:g}x = qps {job.qps:.3f} -> SLO attainment "
            f"{point.slo_attainment:.1%}, goodput {point.goodput_qps:.3f} req/s",
            file=sys.stderr,
            flush=True,
        )
    return point


def _setting(job: CapacityJob) -> SimConfig:
    """A job's setting: its config without the policy (jobs of one setting share a reference)."""
    return job.config.with_(policy="")


def run_capacity_jobs(
    jobs: Sequence[CapacityJob], trace: PreparedTrace | None = None, workers: int = 1
) -> dict[str, CapacityResult]:
    """Results by job key, in job order. ``trace`` is reused when running in-process. Unless a
    job's search turns it off, every result also gets its overload points (the reference is
    the best baseline among the jobs of the same setting)."""
    results = dict(zip((job.key for job in jobs), _map(run_capacity_job, jobs, trace, workers)))
    overload = [
        OverloadJob(job.key, job.config, factor, ref.capacity_qps * factor, job.verbose)
        for job in jobs
        if job.search.overload and (ref := _reference(job, jobs, results)) is not None
        for factor in OVERLOAD_FACTORS
    ]
    for ojob, point in zip(overload, _map(run_overload_job, overload, trace, workers)):
        results[ojob.key].overload.append(point)
    for job in jobs:
        ref = _reference(job, jobs, results)
        if job.search.overload and ref is not None:
            results[job.key].overload_reference = (ref.policy, ref.capacity_qps)
    return results


def _reference(job: CapacityJob, jobs: Sequence[CapacityJob], results: dict[str, CapacityResult]) -> CapacityResult | None:
    setting = _setting(job)
    return overload_reference({j.key: results[j.key] for j in jobs if _setting(j) == setting})


def _map(fn: Callable[[J, PreparedTrace | None], R], jobs: Sequence[J], trace: PreparedTrace | None, workers: int) -> list[R]:
    """``fn(job, trace)`` for every job, in job order; in worker processes if ``workers`` > 1."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job, trace) for job in jobs]
    # fork: workers start fast and inherit the imported modules; nothing else is shared.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("fork")) as pool:
        futures = [pool.submit(fn, job, None) for job in jobs]
        return [fut.result() for fut in futures]
