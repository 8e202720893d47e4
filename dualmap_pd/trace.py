"""Mooncake JSONL traces (FAST'25 format), read unchanged.

One JSON object a line: ``timestamp`` (ms from trace start), ``input_length``,
``output_length`` and ``hash_ids`` (one id per 512-token prompt block).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

TRACE_BLOCK_TOKENS = 512


class TraceRecord(msgspec.Struct, frozen=True):
    timestamp: float  # milliseconds from the start of the trace
    input_length: int
    output_length: int
    hash_ids: list[int]


class TraceError(ValueError):
    """A trace file that cannot be read, with the line that broke it."""


_decoder = msgspec.json.Decoder(TraceRecord)


def iter_trace(path: str | Path) -> Iterator[TraceRecord]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = _decoder.decode(line)
            except msgspec.ValidationError as exc:
                raise TraceError(f"{path}:{lineno}: {exc}") from None
            except msgspec.DecodeError as exc:
                raise TraceError(f"{path}:{lineno}: not JSON ({exc})") from None
            if rec.input_length < 0 or rec.output_length < 0:
                raise TraceError(f"{path}:{lineno}: negative length")
            yield rec


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """Read a trace, sorted by timestamp; ``limit`` keeps the first ``limit`` requests."""
    out: list[TraceRecord] = []
    for rec in iter_trace(path):
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TraceError(f"{path}: no requests")
    out.sort(key=lambda r: r.timestamp)
    return out


@dataclass(frozen=True)
class ArrivalScaling:
    """How trace arrival times map to simulated/replayed ones.

    ``rate_scale`` > 1 compresses time (more requests per second); ``qps`` instead fixes the mean
    arrival rate. Exactly one of them applies; both None keeps the trace's own timing.
    """

    rate_scale: float | None = None
    qps: float | None = None

    def factor(self, records: list[TraceRecord]) -> float:
        """Multiplier applied to trace timestamps (seconds) to get arrival times."""
        if self.rate_scale is not None and self.qps is not None:
            raise ValueError("give either rate_scale or qps, not both")
        if self.rate_scale is not None:
            if self.rate_scale <= 0:
                raise ValueError(f"rate_scale must be positive, got {self.rate_scale}")
            return 1.0 / self.rate_scale
        if self.qps is not None:
            if self.qps <= 0:
                raise ValueError(f"qps must be positive, got {self.qps}")
            return native_qps(records) / self.qps
        return 1.0


def native_qps(records: list[TraceRecord]) -> float:
    """Mean arrival rate of a trace in requests per second."""
    span_s = (records[-1].timestamp - records[0].timestamp) / 1000.0
    if span_s <= 0:
        return float(len(records))
    return (len(records) - 1) / span_s


def arrival_times(records: list[TraceRecord], scaling: ArrivalScaling) -> list[float]:
    """Arrival time in seconds of each record, starting at 0, after rescaling."""
    f = scaling.factor(records)
    t0 = records[0].timestamp
    return [(r.timestamp - t0) / 1000.0 * f for r in records]
