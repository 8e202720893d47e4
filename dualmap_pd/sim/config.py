"""Simulation and capacity-search settings. The fields' help texts generate the CLI options."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from dualmap_pd.cost import PROFILES, HardwareProfile
from dualmap_pd.workload_prep import WorkloadPrep

# HBM left for KV on an engine (for ``kv_usage``, which decode policies read), by profile.
# qwen7b-910b4: 32 GB - ~15.2 GB of fp16 weights - ~2 GB activations; llama8b-h100: the 50 GB
# the profile notes give. The prefix-cache tier (profile.prefix_cache_bytes) is separate.
KV_CAPACITY_GIB = MappingProxyType({"qwen7b-910b4": 14.0, "llama8b-h100": 50.0})
DEFAULT_KV_CAPACITY_GIB = 14.0

Mode = Literal["colocated", "disaggregated"]


class ConfigError(ValueError):
    """Invalid settings; the message is one line, fit to show a user."""


def _opt(default: object, help: str, **extra: object) -> object:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class SimConfig:
    trace: str = field(metadata={"help": "Mooncake-format JSONL trace", "metavar": "PATH"})
    policy: str = _opt("dualmap", "prefill routing policy (registry name)", metavar="NAME")
    mode: Mode = _opt(
        "colocated",
        "colocated: every instance prefills and decodes (the paper's setup); disaggregated: "
        "--prefill prefill + --decode decode instances, KV shipped P->D",
    )
    prefill: int = _opt(8, "prefill instances (colocated: instances)", metavar="N")
    decode: int | None = _opt(
        None, "decode instances (disaggregated only)", metavar="M", default_doc="max(1, N // 2)"
    )
    decode_policy: str = _opt("power_of_two", "decode-instance policy (disaggregated)", metavar="NAME")
    rate_scale: float | None = _opt(
        None, "multiply the trace's arrival rate by X (timestamps / X)", metavar="X"
    )
    qps: float | None = _opt(None, "rescale arrivals to a mean rate of Q requests/s", metavar="Q")
    slo_ttft: float = _opt(5.0, "TTFT SLO in seconds (metrics and SLO-aware policies)", metavar="SECONDS")
    profile: str = _opt("qwen7b-910b4", f"hardware profile ({', '.join(sorted(PROFILES))})")
    requests: int | None = _opt(None, "simulate only the first K requests", metavar="K", default_doc="all")
    tile: int = _opt(
        1,
        "repeat the trace T times back to back (shifted timestamps, distinct hash ids) before "
        "--requests applies",
        metavar="T",
    )
    workload: WorkloadPrep = field(
        default_factory=WorkloadPrep,
        metadata={"help": "workload preparation (its fields are options of their own)"},
    )
    seed: int = _opt(0, "seed of every random choice (policies' tie-breaks, decode sampling)")
    aggregate_decode: bool = _opt(
        True, "simulate decode-only stretches as one event up to the next completion (exact)"
    )
    prefix_cache_gib: float | None = _opt(
        None,
        "prefix-cache tier per prefill engine, GiB",
        metavar="GIB",
        default_doc="the profile's (qwen7b-910b4: 64)",
    )
    kv_capacity_gib: float | None = _opt(
        None,
        "HBM for KV per engine, GiB (only feeds kv_usage, which decode policies read)",
        metavar="GIB",
        default_doc="per profile: qwen7b-910b4 14, llama8b-h100 50",
    )

    # -- resolution and checks ----------------------------------------------------------------
    def validate(self) -> SimConfig:
        """Raise ConfigError with a one-line reason for anything unusable; returns self."""
        from dualmap_pd.policies import DECODE_POLICIES, PREFILL_POLICIES

        if self.rate_scale is not None and self.qps is not None:
            raise ConfigError("give either --rate-scale or --qps, not both")
        if not Path(self.trace).is_file():
            raise ConfigError(f"trace not found: {self.trace}")
        if self.policy not in PREFILL_POLICIES.names():
            raise ConfigError(
                f"unknown policy {self.policy!r}; known: {', '.join(PREFILL_POLICIES.names())}"
            )
        if self.decode_policy not in DECODE_POLICIES.names():
            raise ConfigError(
                f"unknown decode policy {self.decode_policy!r}; known: {', '.join(DECODE_POLICIES.names())}"
            )
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown profile {self.profile!r}; known: {', '.join(sorted(PROFILES))}")
        positive = {"prefill": self.prefill, "tile": self.tile, "slo_ttft": self.slo_ttft}
        for name in ("decode", "rate_scale", "qps", "requests", "kv_capacity_gib", "prefix_cache_gib"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        try:
            self.workload.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self

    @property
    def hardware(self) -> HardwareProfile:
        return PROFILES[self.profile]

    @property
    def max_model_len(self) -> int:
        """The limit oversized requests are dropped at: --max-model-len, else the profile's."""
        given = self.workload.max_model_len
        return given if given is not None else self.hardware.max_model_len

    @property
    def decode_instances(self) -> int:
        """Decode instances actually simulated (0 when colocated)."""
        if self.mode == "colocated":
            return 0
        return self.decode if self.decode is not None else max(1, self.prefill // 2)

    @property
    def kv_capacity_bytes(self) -> float:
        gib = self.kv_capacity_gib
        if gib is None:
            gib = KV_CAPACITY_GIB.get(self.profile, DEFAULT_KV_CAPACITY_GIB)
        return gib * 2**30

    @property
    def prefix_cache_blocks(self) -> int:
        p = self.hardware
        if self.prefix_cache_gib is None:
            return p.prefix_cache_blocks
        return int(self.prefix_cache_gib * 2**30) // (p.kv_bytes_per_token * p.block_size)

    def with_(self, **changes: object) -> SimConfig:
        return replace(self, **changes)


# Options of ``sim`` that make no sense for ``capacity`` (it picks the rate and the policy).
CAPACITY_EXCLUDED = frozenset({"policy", "rate_scale", "qps"})


@dataclass(frozen=True)
class CapacitySearch:
    """How effective capacity is searched: the highest arrival rate (QPS) at which at least
    ``target`` of requests meet the TTFT SLO. Bracket by doubling/halving from ``qps_start``,
    then bisect until the bracket is within ``tolerance`` (relative). Assumes attainment falls
    as the rate rises (true of every run we have looked at; a non-monotone curve would make
    the answer one of its crossing points)."""

    policies: str = _opt("all", "comma-separated policy names, or 'all' (every registered)", metavar="A,B,...")
    target: float = _opt(0.9, "SLO attainment a rate must reach to count as sustained")
    tolerance: float = _opt(0.02, "stop when (hi - lo) / lo <= this")
    qps_start: float | None = _opt(None, "first rate probed", metavar="Q", default_doc="the trace's native rate")
    max_probes: int = _opt(40, "give up refining after this many simulations per policy")

    def validate(self) -> CapacitySearch:
        if not 0 < self.target <= 1:
            raise ConfigError(f"--target must be in (0, 1], got {self.target}")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"--tolerance must be in (0, 1), got {self.tolerance}")
        if self.qps_start is not None and self.qps_start <= 0:
            raise ConfigError(f"--qps-start must be positive, got {self.qps_start}")
        if self.max_probes < 2:
            raise ConfigError(f"--max-probes must be >= 2, got {self.max_probes}")
        return self

    def policy_names(self) -> list[str]:
        from dualmap_pd.policies import PREFILL_POLICIES

        known = PREFILL_POLICIES.names()
        if self.policies.strip() in ("", "all"):
            return known
        names = [p.strip() for p in self.policies.split(",") if p.strip()]
        unknown = [p for p in names if p not in known]
        if unknown:
            raise ConfigError(f"unknown policy {unknown[0]!r}; known: {', '.join(known)}")
        return list(dict.fromkeys(names))
