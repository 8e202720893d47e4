"""Workload preparation: which trace requests run, and when each one arrives.

One pure function shared by the simulator (``sim``, ``capacity``) and the live replay client,
so a simulated and a replayed run of the same trace send the same requests at the same times.

By default it prepares the workload the way the DualMap authors' request generator does
(DUALMAP.md, "How the authors' code runs its evaluation"):

1. **Oversized requests are dropped and counted.** A request whose prompt + output exceeds the
   engine's ``max_model_len`` (20,480 in the paper) cannot be served: live it gets a 400 before
   any engine sees it. Counting it as a missed SLO measures the trace, not the router: 28% of
   the synthetic trace's prompts are that long.
2. **Same-timestamp groups are spread.** Mooncake timestamps come in coarse steps (groups of up
   to 17 requests share one); the requests of a group are spaced evenly from their timestamp up
   to the next distinct one instead of arriving in one instant.
3. **Warm-up at its own low rate.** The first ``warmup_requests`` requests are sent at
   ``warmup_qps`` (0.3 req/s, the paper's conversation setting) to fill the caches; the measured
   part follows at the target rate and only it is counted.

``paper_workload=False`` is the earlier behaviour: every request kept, the trace's own timing
rescaled as a whole, warm-up at the target rate. Each step can also be switched off alone.
Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dualmap_pd.options import option
from dualmap_pd.trace import ArrivalScaling, TraceRecord, arrival_times

PAPER_MAX_MODEL_LEN = 20480
PAPER_WARMUP = 500
PAPER_WARMUP_QPS = 0.3
# Below this many requests the paper's 500 warm-up requests would be most of the run: such short
# runs (tests, quick looks) warm up with 10% instead.
PAPER_WARMUP_MIN_REQUESTS = 2000




@dataclass(frozen=True)
class WorkloadPrep:
    """How a trace becomes a workload. The help texts generate CLI options (``--no-paper-workload``,
    ``--warmup-qps`` ...) wherever a command embeds this class."""

    paper_workload: bool = option(
        True,
        "prepare the workload as the DualMap authors do: drop requests longer than "
        "--max-model-len, spread same-timestamp groups, warm up at --warmup-qps "
        "(--no-paper-workload: every request, the trace's own timing, warm-up at the target rate)",
    )
    max_model_len: int | None = option(
        None,
        "drop (and count) requests whose prompt + output tokens exceed this",
        metavar="TOKENS",
        default_doc="the hardware profile's or the cluster config's; 20480 in the paper",
    )
    drop_oversized: bool = option(True, "drop requests longer than --max-model-len (paper workload only)")
    spread_timestamps: bool = option(
        True, "spread requests sharing one trace timestamp evenly up to the next one (paper workload only)"
    )
    warmup_requests: int | None = option(
        None,
        "the first W requests warm the caches up and are excluded from metrics",
        metavar="W",
        default_doc=f"{PAPER_WARMUP} if at least {PAPER_WARMUP_MIN_REQUESTS} requests are kept, else 10%",
        aliases=("--warmup",),
    )
    warmup_qps: float | None = option(
        PAPER_WARMUP_QPS,
        "arrival rate of the warm-up requests, req/s (paper: 0.3 conversation, 0.5 tool&agent; "
        "0 = at the target rate; paper workload only)",
        metavar="Q",
    )

    def validate(self) -> WorkloadPrep:
        """Raise ValueError with a one-line reason for an unusable setting; returns self."""
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.warmup_requests is not None and self.warmup_requests < 0:
            raise ValueError(f"--warmup-requests must be >= 0, got {self.warmup_requests}")
        if self.warmup_qps is not None and self.warmup_qps < 0:
            raise ValueError(f"--warmup-qps must be >= 0, got {self.warmup_qps}")
        return self

    @property
    def drops(self) -> bool:
        return self.paper_workload and self.drop_oversized

    @property
    def spreads(self) -> bool:
        return self.paper_workload and self.spread_timestamps

    @property
    def slow_warmup(self) -> bool:
        return self.paper_workload and bool(self.warmup_qps)


@dataclass(frozen=True)
class PreparedWorkload:
    """The requests that run, in arrival order, and their arrival times."""

    records: list[TraceRecord]  # kept requests, in arrival order
    indices: list[int]  # each kept request's index in the input sequence
    arrivals: list[float]  # seconds from the first arrival, non-decreasing
    warmup: int  # the first ``warmup`` requests are warm-up (not measured)
    total: int  # requests in the input
    dropped_oversized: int  # input + output > max_model_len
    max_model_len: int | None  # the limit applied (None: nothing dropped)
    spread_groups: int  # same-timestamp groups spread (groups of >= 2)
    measured_qps: float  # mean arrival rate of the measured part
    description: str  # one line: what ran

    @property
    def measured(self) -> int:
        return len(self.records) - self.warmup

    def to_json(self) -> dict[str, object]:
        return {
            "total": self.total,
            "kept": len(self.records),
            "warmup": self.warmup,
            "measured": self.measured,
            "dropped_oversized": self.dropped_oversized,
            "max_model_len": self.max_model_len,
            "spread_groups": self.spread_groups,
            "measured_qps": self.measured_qps,
            "description": self.description,
        }


def default_warmup(n_requests: int) -> int:
    """Warm-up requests when none is given: the paper's 500 when the run is long enough that
    they are at most a quarter of it, else 10%."""
    if n_requests >= PAPER_WARMUP_MIN_REQUESTS:
        return PAPER_WARMUP
    return n_requests // 10


def prepare_workload(
    records: Sequence[TraceRecord],
    prep: WorkloadPrep,
    scaling: ArrivalScaling = ArrivalScaling(),
    max_model_len: int | None = None,
) -> PreparedWorkload:
    """Apply ``prep`` to ``records`` (sorted by timestamp). ``scaling`` sets the target rate of
    the measured part; ``max_model_len`` is the engine's limit when ``prep`` names none."""
    prep.validate()
    if not records:
        raise ValueError("no requests to prepare")
    if any(a.timestamp > b.timestamp for a, b in zip(records, records[1:])):
        raise ValueError("records must be sorted by timestamp")
    limit = prep.max_model_len if prep.max_model_len is not None else max_model_len
    indices = list(range(len(records)))
    dropped = 0
    if prep.drops and limit is not None:
        indices = [i for i in indices if records[i].input_length + records[i].output_length <= limit]
        dropped = len(records) - len(indices)
        if not indices:
            raise ValueError(f"every request is longer than max_model_len {limit}")
    kept = [records[i] for i in indices]
    n = len(kept)
    warmup = min(n, prep.warmup_requests if prep.warmup_requests is not None else default_warmup(n))
    groups = 0
    timed = kept
    if prep.spreads:
        timed, groups = spread_same_timestamps(kept)
    if prep.slow_warmup and 0 < warmup < n:
        arrivals = _warmup_then_measured(timed, warmup, prep.warmup_qps or 0.0, scaling)
    else:
        arrivals = arrival_times(timed, scaling)
    measured = arrivals[warmup:]
    span = measured[-1] - measured[0] if len(measured) > 1 else 0.0
    measured_qps = (len(measured) - 1) / span if span > 0 else float(len(measured))
    return PreparedWorkload(
        records=kept,
        indices=indices,
        arrivals=arrivals,
        warmup=warmup,
        total=len(records),
        dropped_oversized=dropped,
        max_model_len=limit if prep.drops else None,
        spread_groups=groups,
        measured_qps=measured_qps,
        description=_describe(prep, len(records), n, dropped, limit, groups, warmup, measured_qps),
    )


def spread_same_timestamps(records: Sequence[TraceRecord]) -> tuple[list[TraceRecord], int]:
    """Records with each group of equal timestamps spaced evenly up to the next distinct
    timestamp (the last group over the mean gap between distinct timestamps), and how many
    groups of two or more there were. Order is kept."""
    out = list(records)
    distinct = sorted({r.timestamp for r in records})
    if len(distinct) == len(records):
        return out, 0
    mean_gap = (distinct[-1] - distinct[0]) / (len(distinct) - 1) if len(distinct) > 1 else 1000.0
    next_ts = dict(zip(distinct, distinct[1:]))
    groups = 0
    i = 0
    while i < len(out):
        j = i
        ts = out[i].timestamp
        while j + 1 < len(out) and out[j + 1].timestamp == ts:
            j += 1
        size = j - i + 1
        if size > 1:
            groups += 1
            step = (next_ts.get(ts, ts + mean_gap) - ts) / size
            for k in range(1, size):
                r = out[i + k]
                out[i + k] = TraceRecord(ts + k * step, r.input_length, r.output_length, r.hash_ids)
        i = j + 1
    return out, groups


def _warmup_then_measured(
    records: list[TraceRecord], warmup: int, warmup_qps: float, scaling: ArrivalScaling
) -> list[float]:
    """Warm-up requests one every 1/warmup_qps seconds; the measured part starts one such
    interval after the last of them, with its own trace timing rescaled to the target."""
    interval = 1.0 / warmup_qps
    head = [k * interval for k in range(warmup)]
    start = warmup * interval
    tail = arrival_times(records[warmup:], scaling)
    return head + [start + t for t in tail]


def _describe(
    prep: WorkloadPrep, total: int, kept: int, dropped: int, limit: int | None, groups: int, warmup: int, qps: float
) -> str:
    if not prep.paper_workload:
        return f"{total} requests as traced (no paper preparation), warm-up {warmup} at the target rate, measured {qps:.3g} req/s"
    parts = []
    if prep.drops and limit is not None:
        parts.append(f"{kept}/{total} requests kept ({dropped} over max_model_len {limit} dropped)")
    else:
        parts.append(f"{total} requests (none dropped)")
    parts.append(f"{groups} same-timestamp groups spread" if prep.spreads else "timestamps as traced")
    if prep.slow_warmup and 0 < warmup < kept:
        parts.append(f"warm-up {warmup} at {prep.warmup_qps:g} req/s")
    else:
        parts.append(f"warm-up {warmup} at the target rate")
    parts.append(f"measured {kept - warmup} at {qps:.3g} req/s")
    return "paper workload: " + ", ".join(parts)
