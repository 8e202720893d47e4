"""Metrics of a run: TTFT/TPOT percentiles, SLO attainment, cache hit ratio, load balance.

Pure functions over per-request outcomes, shared by the simulator and anything that re-reads
saved results. Times are in seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np


class Outcome(Protocol):
    """What the metrics need of one finished request."""

    prompt_tokens: int
    hit_tokens: int
    uncached_tokens: int
    prefill_instance: str

    @property
    def ttft(self) -> float: ...

    @property
    def tpot(self) -> float | None: ...


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default); None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def coefficient_of_variation(values: Iterable[float]) -> float:
    """Population standard deviation / mean (0 when the mean is 0)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return 0.0
    mean = float(arr.mean())
    return float(arr.std() / mean) if mean > 0 else 0.0


def slo_attainment(ttfts: Sequence[float], slo_s: float) -> float:
    """Fraction of requests whose TTFT is within the SLO (1.0 for no requests)."""
    if len(ttfts) == 0:
        return 1.0
    return float(np.count_nonzero(np.asarray(ttfts, dtype=float) <= slo_s) / len(ttfts))


def summarize(outcomes: Sequence[Outcome], slo_s: float, prefill_instances: Sequence[str]) -> dict[str, float | int | None]:
    """Metrics over ``outcomes`` (the measured, post-warm-up requests).

    ``load_cv`` is the coefficient of variation across ``prefill_instances`` of the prefill
    tokens each computed for these requests (instances that computed nothing count as 0).
    """
    ttft = [o.ttft for o in outcomes]
    tpot = [t for t in (o.tpot for o in outcomes) if t is not None]
    prompt = sum(o.prompt_tokens for o in outcomes)
    hit = sum(o.hit_tokens for o in outcomes)
    per_instance = dict.fromkeys(prefill_instances, 0)
    for o in outcomes:
        per_instance[o.prefill_instance] = per_instance.get(o.prefill_instance, 0) + o.uncached_tokens
    out: dict[str, float | int | None] = {
        "measured_requests": len(outcomes),
        "ttft_mean": float(np.mean(ttft)) if ttft else None,
    }
    for q in (50, 90, 99):
        out[f"ttft_p{q}"] = percentile(ttft, q)
    out["slo_attainment"] = slo_attainment(ttft, slo_s)
    out["cache_hit_ratio"] = hit / prompt if prompt else 0.0
    out["load_cv"] = coefficient_of_variation(per_instance.values())
    for q in (50, 90):
        out[f"tpot_p{q}"] = percentile(tpot, q)
    out["prompt_tokens"] = prompt
    out["hit_tokens"] = hit
    return out
