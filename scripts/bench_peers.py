"""dualmap-pd against the routers users run today, on the same cluster and the same workload.

Starts an emulated cluster (``dualmap-pd emulate``, 16 prefill + 8 decode by default, the
paper's profile (Qwen2.5-7B on Ascend 910B4) with 16-token blocks, as peers' KV-event routers
assume) and replays one held-constant trace slice through:

(a) dualmap-pd (``dualmap-pd serve``) with each of its prefill policies,
(b) vllm-router in vLLM P/D mode (``--vllm-pd-disaggregation``, NixlConnector) with round_robin,
    consistent_hash, cache_aware and kv_aware (fed the prefill engines' KV events),
(c) smg in P/D mode (``launch --pd-disaggregation --backend vllm``) with cache_aware,

each peer installed from PyPI, pinned, into its own venv under runs/peers/ by this script. The
engines are restarted before every run, so every router starts cold. A router that cannot run
is reported with its error. Prompts keep the trace's full lengths (512 tokens per trace block,
``--tokens-per-trace-block``); requests longer than the engines' max_model_len are dropped and
counted; the paper's workload preparation applies, with the warm-up at the target rate and
left out of the metrics. With ``--config`` it runs against already-running (real) engines
instead: they are not restarted, each run uses its own prompt seed so no run hits another's
cache, and the engine figures are differences of their /metrics.

    PYTHONPATH=. .venv/bin/python scripts/bench_peers.py --trace scripts/traces/hot_prefix_slice.jsonl --json

Prints one table (or ``--json``: ``{"routers": {LABEL: {...}}}``), writes the JSON and a TTFT
CDF plot under results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_clusters as bc  # noqa: E402

from dualmap_pd.policies import PREFILL_POLICIES  # noqa: E402

ROUTER_PORT = 9850  # peers listen here (+1: their Prometheus port), engines from 9000
ENGINE_PORT_BASE = 9000


@dataclass(frozen=True)
class Peer:
    package: str
    version: str
    binary: str
    policies: tuple[str, ...]

    def venv(self, root: Path) -> Path:
        return root / f"{self.package}-{self.version}"


PEERS = {
    "vllm-router": Peer("vllm-router", "0.1.17", "vllm-router",
                        ("round_robin", "consistent_hash", "cache_aware", "kv_aware")),
    "smg": Peer("smg", "1.13.0", "smg", ("cache_aware",)),
}  # fmt: skip


def install_peer(peer: Peer, root: Path) -> Path:
    """The peer's console script in its own venv (created and pip-installed once)."""
    venv = peer.venv(root)
    binary = venv / "bin" / peer.binary
    if binary.exists():
        return binary
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{peer.package}=={peer.version}"],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0 or not binary.exists():
        raise RuntimeError(f"pip install {peer.package}=={peer.version} failed: {res.stderr[-800:]}")
    return binary


def peer_command(name: str, binary: Path, policy: str, raw: dict[str, Any]) -> list[str]:
    """The peer's P/D command line, as its --help documents it."""
    prefill, decode = bc.instance_urls(raw, "prefill"), bc.instance_urls(raw, "decode")
    host = ["--host", "127.0.0.1", "--port", str(ROUTER_PORT), "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(ROUTER_PORT + 1)]  # fmt: skip
    if name == "vllm-router":
        cmd = [str(binary), *host, "--vllm-pd-disaggregation", "--policy", policy, "--log-level", "warning"]
        if policy == "kv_aware":  # KV events of each prefill engine (the router assumes 16-token blocks)
            for url, inst in zip(prefill, raw["prefill"], strict=True):
                cmd += ["--pd-kv-events", f"{url}=tcp://{inst['host']}:{inst['kv_events_port']}"]
    else:
        cmd = [str(binary), "launch", *host, "--pd-disaggregation", "--backend", "vllm", "--policy", policy]
    for url in prefill:
        cmd += ["--prefill", url]
    for url in decode:
        cmd += ["--decode", url]
    return cmd


@dataclass
class Bench:
    args: argparse.Namespace
    raw: dict[str, Any]
    config: Path
    out_dir: Path
    emulated: bool

    @contextlib.contextmanager
    def engines(self, label: str) -> Iterator[None]:
        if not self.emulated:
            yield
            return
        with bc.emulated_cluster(self.config, self.raw, self.args.profile, self.log(label, "engines")):
            yield

    def log(self, label: str, what: str) -> Path:
        return self.out_dir / "logs" / f"{label.replace('/', '_')}.{what}.log"

    def run(self, label: str, seed: int, router: Any) -> dict[str, Any]:
        """Fresh engines, ``router`` (a context manager yielding its URL), one replay."""
        with self.engines(label):
            before = None if self.emulated else bc.engine_view(self.raw)
            with router as url:
                s = bc.replay(url, self.args.trace, requests=self.args.requests,
                              tokens_per_trace_block=self.args.tokens_per_trace_block,
                              rate_scale=self.args.rate_scale, max_model_len=self.raw["max_model_len"],
                              seed=seed, max_output_tokens=self.args.max_output_tokens,
                              model=self.raw["served_model_name"])  # fmt: skip
                view = bc.engine_view(self.raw)
        if before is not None:
            view = view.since(before)
        return {
            "completed": s["completed"], "failed": s["failed"], "failures_by_kind": s["failures_by_kind"],
            "errors": s["errors"],
            "ttft_p50": s["ttft_p50"], "ttft_p90": s["ttft_p90"], "ttft_p99": s["ttft_p99"],
            "tpot_p50": s["tpot_p50"], "prefix_hit_rate": view.prefix_hit_rate,
            "prefill_request_cv": view.request_cv, "decode_kv_pulls": view.decode_pulls,
            "throughput_rps": s["throughput_rps"],
            "send_lag_p99": s["send_lag_p99"], "measured": s["requests"], "warmup": s["warmup"],
            "offered_qps": (s["workload"] or {}).get("measured_qps"), "duration_s": s["duration_s"],
            "workload": (s["workload"] or {}).get("description"),
            "ttfts": sorted(t for _, t in s["results"] if t is not None),
        }  # fmt: skip


def run_all(bench: Bench, labels: list[str]) -> dict[str, dict[str, Any]]:
    args = bench.args
    results: dict[str, dict[str, Any]] = {}
    binaries: dict[str, Path | Exception] = {}
    for seed, label in enumerate(labels):
        system, policy = label.split("/", 1)
        print(f"== {label}", file=sys.stderr, flush=True)
        try:
            if system == "dualmap-pd":
                router = bc.scheduler_process(bench.config, bench.raw, policy, args.profile,
                                              bench.log(label, "router"),
                                              ("--slo-ttft", str(args.slo_ttft)))  # fmt: skip
            else:
                peer = PEERS[system]
                if system not in binaries:
                    try:
                        binaries[system] = install_peer(peer, args.peer_venvs)
                    except Exception as exc:  # noqa: BLE001 - reported per label below
                        binaries[system] = exc
                binary = binaries[system]
                if isinstance(binary, Exception):
                    raise binary
                cmd = peer_command(system, binary, policy, bench.raw)
                url = f"http://127.0.0.1:{ROUTER_PORT}"
                router = _peer_router(cmd, url, bench.log(label, "router"), label)
            results[label] = bench.run(label, seed, router)
        except Exception as exc:  # noqa: BLE001 - a router that cannot run is reported, not dropped
            results[label] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
            traceback.print_exc(file=sys.stderr)
        r = results[label]
        print(f"   {r.get('error') or _row(label, r)}", file=sys.stderr, flush=True)
    return results


@contextlib.contextmanager
def _peer_router(cmd: list[str], url: str, log: Path, label: str) -> Iterator[str]:
    # /v1/models, not /health: smg answers /health before its workers are registered.
    with bc.background(cmd, log, ready=[url + "/v1/models"], timeout=90, what=label):
        yield url


def _f(x: float | None, scale: float = 1.0, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x * scale, fmt)


def _row(label: str, r: dict[str, Any]) -> str:
    return (f"{label:<34}{r['completed']:>6}{r['failed']:>6}{_f(r['ttft_p50']):>9}{_f(r['ttft_p90']):>9}"
            f"{_f(r['ttft_p99']):>9}{_f(r['tpot_p50'], 1000, '.1f'):>9}{_f(r['prefix_hit_rate']):>8}"
            f"{_f(r['prefill_request_cv'], 1, '.2f'):>7}")  # fmt: skip


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (f"{'router':<34}{'done':>6}{'fail':>6}{'TTFTp50':>9}{'TTFTp90':>9}{'TTFTp99':>9}"
            f"{'TPOTms':>9}{'hit':>8}{'CV':>7}")  # fmt: skip
    lines = [head + "   (TTFT in s)"]
    for label, r in results.items():
        lines.append(f"{label:<34}error: {r['error'][:200]}" if "error" in r else _row(label, r))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, r in results.items():
        ttfts = r.get("ttfts") or []
        if ttfts:
            ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=label,
                    linewidth=2.2 if label.startswith("dualmap-pd/dualmap") else 1.0)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=bc.REPO / "scripts/traces/hot_prefix_slice.jsonl")
    ap.add_argument("--requests", type=int, default=400, help="first K trace requests (10%% warm-up)")
    ap.add_argument("--prefill", type=int, default=16)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--config", type=Path, help="run against these already-running engines instead")
    ap.add_argument("--profile", default="qwen7b-910b4", help="emulated engines' hardware profile")
    ap.add_argument("--block-size", type=int, default=16, help="emulated engines' KV block size")
    ap.add_argument("--max-model-len", type=int, default=20480, help="emulated engines' (the paper's)")
    ap.add_argument("--tokens-per-trace-block", type=int, default=512,
                    help="prompt tokens per 512-token trace block (512: the trace's own lengths)")
    ap.add_argument("--rate-scale", type=float, default=1.0,
                    help="speed up the trace's arrivals (1: its own rate, ~6.7 req/s on the hot-prefix slice)")
    ap.add_argument("--max-output-tokens", type=int, default=16)
    ap.add_argument("--slo-ttft", type=float, default=5.0,
                    help="dualmap-pd's TTFT SLO (SLO-aware policies switch candidates at half of it)")
    ap.add_argument("--routers", help="comma-separated labels or systems to run (default: all)")
    ap.add_argument("--peer-venvs", type=Path, default=bc.REPO / "runs" / "peers")
    ap.add_argument("--out", type=Path, default=bc.REPO / "results" / "bench_peers")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()
    bc.exit_on_sigterm()

    args.out.mkdir(parents=True, exist_ok=True)
    if args.config:
        raw = yaml.safe_load(args.config.read_text())
        config, emulated = args.config, False
    else:
        raw = bc.cluster_dict(args.prefill, args.decode, ENGINE_PORT_BASE, run_dir=args.out / "run",
                              block_size=args.block_size, max_model_len=args.max_model_len)  # fmt: skip
        config, emulated = bc.write_config(raw, args.out / "cluster.yaml"), True
    labels = [f"dualmap-pd/{p}" for p in PREFILL_POLICIES.names()]
    labels += [f"{name}/{pol}" for name, peer in PEERS.items() for pol in peer.policies]
    if args.routers:
        wanted = args.routers.split(",")
        labels = [x for x in labels if x in wanted or x.split("/")[0] in wanted]
    results = run_all(Bench(args, raw, config, args.out, emulated), labels)
    (args.out / "bench_peers.json").write_text(json.dumps({"routers": results}, indent=1))
    with contextlib.suppress(ImportError):
        plot(results, args.out / "ttft_cdf.png")
    public = {k: {f: v for f, v in r.items() if f != "ttfts"} for k, r in results.items()}
    if args.json:
        print(json.dumps({"routers": public}))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
