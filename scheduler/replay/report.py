"""Results of a replay: per-request outcomes, the summary metrics and the progress line.

Kept apart from the replay driver so the metrics (what a benchmark script reads) can be used
without the HTTP client, e.g. to re-summarise saved per-request results.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np


@dataclass
class RequestResult:
    index: int
    scheduled_s: float  # arrival time from the trace, relative to the replay start
    sent_s: float = 0.0  # when it actually went out (later if the concurrency limit held it)
    failure: str | None = None  # None when the request completed
    ttft_s: float | None = None  # ttft_s and e2e_s count from sent_s
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as reported by the server's usage chunk
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class ReplayReport:
    url: str
    endpoint: str
    model: str | None
    prompt_scale: float
    time_scale: float
    duration_s: float
    results: list[RequestResult] = field(repr=False, default_factory=list)
    warmup: int = 0  # the first ``warmup`` results warmed the caches: left out of the metrics
    workload: dict[str, Any] | None = None  # PreparedWorkload.to_json() when it was prepared

    @property
    def measured(self) -> list[RequestResult]:
        return [r for r in self.results if r.index >= self.warmup]

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.measured if r.failure is None]

    def summary(self) -> dict[str, Any]:
        """The metrics of the measured requests as one flat, JSON-ready dict (times in seconds)."""
        done = self.completed
        measured = self.measured
        ttft = [r.ttft_s for r in done if r.ttft_s is not None]
        tpot = [r.tpot_s for r in done if r.tpot_s is not None]
        e2e = [r.e2e_s for r in done if r.e2e_s is not None]
        lag = [r.sent_s - r.scheduled_s for r in measured]
        output_tokens = sum(r.output_tokens for r in done)
        prompt_tokens = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
        per_s = 1.0 / self.duration_s if self.duration_s > 0 else 0.0
        out: dict[str, Any] = {
            "url": self.url,
            "endpoint": self.endpoint,
            "model": self.model,
            "requests": len(measured),
            "completed": len(done),
            "failed": len(measured) - len(done),
            "failures_by_kind": dict(
                sorted(Counter(r.failure for r in measured if r.failure).items())
            ),
            "warmup": self.warmup,
            "warmup_failed": sum(1 for r in self.results if r.index < self.warmup and r.failure),
            "workload": self.workload,
            "duration_s": self.duration_s,
            "throughput_rps": len(done) * per_s,
            "output_tokens_per_s": output_tokens * per_s,
            "output_tokens": output_tokens,
            "prompt_tokens_mean": float(np.mean(prompt_tokens)) if prompt_tokens else None,
            "prompt_scale": self.prompt_scale,
            "time_scale": self.time_scale,
            "send_lag_p99": _percentile(lag, 99),
        }
        for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
            for q in (50, 90, 99):
                out[f"{name}_p{q}"] = _percentile(values, q)
            out[f"{name}_mean"] = float(np.mean(values)) if values else None
        return out

    def format_table(self) -> str:
        s = self.summary()
        failures = ", ".join(f"{k}: {v}" for k, v in s["failures_by_kind"].items())
        lines = [
            f"replay -> {s['url']} ({s['endpoint']}, model {s['model'] or 'server default'})",
            *([f"workload: {s['workload']['description']}"] if s["workload"] else []),
            f"requests {s['requests']}  completed {s['completed']}  failed {s['failed']}"
            + (f" ({failures})" if failures else ""),
            f"duration {s['duration_s']:.2f} s  throughput {s['throughput_rps']:.2f} req/s  "
            f"output {s['output_tokens_per_s']:.1f} tok/s",
            f"prompt scale {s['prompt_scale']:.4g}  time scale {s['time_scale']:.4g}  "
            f"send lag p99 {_ms(s['send_lag_p99'])} ms",
            f"{'(ms)':<6}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
        ]
        for name in ("ttft", "tpot", "e2e"):
            cells = "".join(f"{_ms(s[f'{name}_{k}']):>10}" for k in ("p50", "p90", "p99", "mean"))
            lines.append(f"{name.upper():<6}{cells}")
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


class Progress:
    """A dependency-free progress line on stderr: redrawn in place on a TTY, else every 5 s."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.is_tty = enabled and stream.isatty()
        self.interval_s = 0.2 if self.is_tty else 5.0
        self.sent = 0
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()

    def render(self, final: bool = False) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done, "
            f"{self.sent - self.done} in flight, {self.failed} failed, "
            f"{time.monotonic() - self.started:.0f}s"
        )
        if self.is_tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.render()
