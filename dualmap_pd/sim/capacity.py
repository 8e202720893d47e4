"""Effective capacity: the highest arrival rate at which enough requests meet the TTFT SLO.

Each probe is a full simulation at one rate. The search brackets the threshold by doubling (or
halving) from a start rate, then bisects until the bracket is within a relative tolerance. It
assumes SLO attainment does not rise with load; the reported capacity is the highest rate
probed that passed.

Capacity at 90% hides what users feel past it, so each result can also carry *overload* points:
SLO attainment and goodput (measured requests within the SLO per second) at 1.25x and 1.5x the
best baseline's capacity (the same rates for every policy of one setting; baselines are the
policies whose name does not start with ``dualmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProbePoint:
    qps: float
    slo_attainment: float
    cache_hit_ratio: float
    ttft_p90: float | None
    passed: bool
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


OVERLOAD_FACTORS = (1.25, 1.5)


@dataclass(frozen=True)
class OverloadPoint:
    factor: float  # x the reference (best baseline) capacity
    qps: float
    slo_attainment: float
    goodput_qps: float  # measured requests meeting the SLO per second of measured arrivals


@dataclass
class CapacityResult:
    policy: str
    capacity_qps: float  # 0.0 if no probed rate passed
    slo_attainment_at_capacity: float | None
    cache_hit_ratio: float | None  # at capacity
    points: list[ProbePoint]
    bracket: tuple[float, float | None]  # (highest pass, lowest fail); fail None if never failed
    converged: bool
    overload: list[OverloadPoint] = field(default_factory=list)
    overload_reference: tuple[str, float] | None = None  # (policy, capacity) the factors scale
    workload: str = ""  # one line: the workload preparation that ran

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "capacity_qps": self.capacity_qps,
            "slo_attainment_at_capacity": self.slo_attainment_at_capacity,
            "cache_hit_ratio": self.cache_hit_ratio,
        }
        for p in sorted(self.overload, key=lambda p: p.factor):
            out[f"attainment_at_{p.factor:g}x"] = p.slo_attainment
            out[f"goodput_at_{p.factor:g}x"] = p.goodput_qps
        if self.overload_reference is not None:
            out["overload_reference"] = {"policy": self.overload_reference[0], "capacity_qps": self.overload_reference[1]}
        out.update({
            "bracket": list(self.bracket),
            "converged": self.converged,
            "workload": self.workload,
            "points": [asdict(p) for p in sorted(self.points, key=lambda p: p.qps)],
            "overload_points": [asdict(p) for p in sorted(self.overload, key=lambda p: p.factor)],
        })  # fmt: skip
        return out

    def attainment_at(self, factor: float) -> float | None:
        return next((p.slo_attainment for p in self.overload if p.factor == factor), None)


def is_baseline(policy: str) -> bool:
    return not policy.startswith("dualmap")


def overload_reference(results: Mapping[str, CapacityResult]) -> CapacityResult | None:
    """The best baseline among ``results`` (the best policy if none is a baseline); None if no
    policy reached any capacity."""
    pool = [r for r in results.values() if is_baseline(r.policy)] or list(results.values())
    best = max(pool, key=lambda r: r.capacity_qps, default=None)
    return best if best is not None and best.capacity_qps > 0 else None


# run_at(qps) -> the run's summary dict (needs slo_attainment, cache_hit_ratio, ttft_p90).
RunAt = Callable[[float], dict[str, Any]]


def find_capacity(
    policy: str,
    run_at: RunAt,
    start_qps: float,
    target: float = 0.9,
    tolerance: float = 0.02,
    max_probes: int = 40,
    min_qps_fraction: float = 1 / 1024,
) -> CapacityResult:
    """Search the capacity of one policy; ``run_at`` runs a full simulation at a rate."""
    if start_qps <= 0:
        raise ValueError(f"start_qps must be positive, got {start_qps}")
    points: dict[float, ProbePoint] = {}

    def probe(qps: float) -> ProbePoint:
        if qps not in points:
            s = run_at(qps)
            extra = {k: s[k] for k in ("ttft_p50", "ttft_p99", "load_cv", "offered_qps") if k in s}
            points[qps] = ProbePoint(qps, s["slo_attainment"], s["cache_hit_ratio"], s.get("ttft_p90"), s["slo_attainment"] >= target, extra)
        return points[qps]

    lo: float | None = None  # highest passing rate
    hi: float | None = None  # lowest failing rate
    if probe(start_qps).passed:
        lo = start_qps
        while hi is None and len(points) < max_probes:
            q = lo * 2
            if probe(q).passed:
                lo = q
            else:
                hi = q
    else:
        hi = start_qps
        floor = start_qps * min_qps_fraction
        while lo is None and len(points) < max_probes and hi / 2 >= floor:
            q = hi / 2
            if probe(q).passed:
                lo = q
            else:
                hi = q
    while lo is not None and hi is not None and (hi - lo) > tolerance * lo and len(points) < max_probes:
        mid = (lo + hi) / 2
        if probe(mid).passed:
            lo = mid
        else:
            hi = mid
    converged = lo is not None and hi is not None and (hi - lo) <= tolerance * lo
    at = points.get(lo) if lo is not None else None
    return CapacityResult(
        policy=policy,
        capacity_qps=lo or 0.0,
        slo_attainment_at_capacity=at.slo_attainment if at else None,
        cache_hit_ratio=at.cache_hit_ratio if at else None,
        points=list(points.values()),
        bracket=(lo or 0.0, hi),
        converged=converged,
    )
