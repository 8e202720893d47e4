"""Simulator invariants, the engine model against closed forms, metrics and capacity search."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualmap_pd.cost import PROFILES
from dualmap_pd.hashing import trace_block_hashes
from dualmap_pd.metrics import coefficient_of_variation, percentile, slo_attainment
from dualmap_pd.policies import PREFILL_POLICIES
from dualmap_pd.sim import PreparedTrace, SimConfig, Simulator, find_capacity, tile_trace
from dualmap_pd.sim.capacity import CapacityResult
from dualmap_pd.sim.prefix_cache import PrefixCache
from dualmap_pd.sim.workload import default_warmup
from dualmap_pd.trace import TraceRecord, load_trace
from dualmap_pd.workload_prep import WorkloadPrep

SYNTHETIC = Path(__file__).resolve().parents[1] / "scripts" / "traces" / "synthetic_trace.jsonl"
PROFILE = PROFILES["qwen7b-910b4"]
POLICIES = PREFILL_POLICIES.names()


@pytest.fixture(scope="module")
def small_trace() -> PreparedTrace:
    return PreparedTrace(load_trace(SYNTHETIC)[:300], "synthetic[:300]")


def run(trace: PreparedTrace, warmup: int | None = None, **overrides: object):
    cfg = SimConfig(trace=trace.source, workload=WorkloadPrep(warmup_requests=warmup), **overrides)  # type: ignore[arg-type]
    return Simulator(cfg, trace).run()


# -- workload ---------------------------------------------------------------------------------------
def test_prepared_hashes_equal_reference_hashing(small_trace: PreparedTrace) -> None:
    for block_size in (128, 256):
        got = small_trace.block_hashes(block_size)
        for rec, hashes in zip(small_trace.records, got):
            assert hashes == trace_block_hashes(rec.hash_ids, rec.input_length, block_size)
    assert small_trace.block_hashes(128) is small_trace.block_hashes(128)  # computed once


def test_tile_trace_shifts_time_and_ids() -> None:
    recs = [TraceRecord(0.0, 600, 2, [0, 1]), TraceRecord(1000.0, 600, 2, [0, 2]), TraceRecord(3000.0, 100, 2, [3])]
    tiled = tile_trace(recs, 3)
    assert len(tiled) == 9
    stamps = [r.timestamp for r in tiled]
    assert stamps == sorted(stamps) and stamps[3] == 3000.0 + 1500.0  # span + mean gap
    assert tiled[3].hash_ids == [4, 5] and tiled[6].hash_ids == [8, 9]
    ids_per_copy = [{h for r in tiled[k * 3 : k * 3 + 3] for h in r.hash_ids} for k in range(3)]
    assert not (ids_per_copy[0] & ids_per_copy[1]) and not (ids_per_copy[1] & ids_per_copy[2])


def test_tile_trace_interleaved_keeps_each_copy_s_timing() -> None:
    recs = [TraceRecord(0.0, 600, 2, [0]), TraceRecord(1000.0, 600, 2, [1]), TraceRecord(2000.0, 600, 2, [2])]
    tiled = tile_trace(recs, 4, interleave=True)
    assert [r.timestamp for r in tiled[:5]] == [0.0, 250.0, 500.0, 750.0, 1000.0]  # gap / copies apart
    assert [r.hash_ids[0] for r in tiled[:5]] == [0, 3, 6, 9, 1]
    assert tiled[-1].timestamp == 2750.0


def test_short_prompts_spread_over_the_rings() -> None:
    # Prompts under one block route on their fallback key; raw small ids would all fall before
    # the rings' first point and pile onto two instances.
    recs = [TraceRecord(i * 1000.0, 40 + i % 7, 2, [i]) for i in range(200)]
    trace = PreparedTrace(recs, "short")
    assert len({trace.fallback_key(i) for i in range(200)}) == 200
    res = run(trace, policy="dualmap", prefill=8, warmup=0)
    assert len({r.prefill_instance for r in res.requests}) == 8


def test_default_warmup() -> None:
    assert default_warmup(3993) == 500 and default_warmup(1000) == 100 and default_warmup(5) == 0


# -- prefix cache -------------------------------------------------------------------------------------
def test_prefix_cache_lru_tail_first() -> None:
    cache = PrefixCache(4)
    assert cache.insert([1, 2, 3]) == ([3, 2, 1], [])
    assert cache.match([1, 2, 9]) == 2
    stored, evicted = cache.insert([7, 8])
    assert stored == [8, 7] and evicted == [3]  # the tail of the old prompt goes first
    assert cache.match([1, 2, 3]) == 2 and len(cache) == 4


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(0, 12),
    prompts=st.lists(st.lists(st.integers(0, 20), min_size=0, max_size=15), max_size=30),
)
def test_prefix_cache_never_over_capacity(capacity: int, prompts: list[list[int]]) -> None:
    cache = PrefixCache(capacity)
    mirror: set[int] = set()
    for p in prompts:
        blocks = list(dict.fromkeys(p))
        hit = cache.match(blocks)
        assert all(b in cache for b in blocks[:hit]) and (hit == len(blocks) or blocks[hit] not in cache)
        stored, evicted = cache.insert(blocks)
        mirror |= set(stored)
        mirror -= set(evicted)
        assert len(cache) <= capacity
        assert mirror == set(cache.blocks())
        assert all(b in cache for b in blocks[:capacity])


# -- simulator invariants -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_exactly_once(small_trace: PreparedTrace, policy: str, mode: str) -> None:
    # 3x the trace's rate: queues build up, so late dispatch and rebalancing are exercised.
    res = run(small_trace, policy=policy, mode=mode, rate_scale=3.0, prefix_cache_gib=2.0)
    kept = res.workload.records
    assert len(res.requests) == len(kept) and len(kept) + res.workload.dropped_oversized == len(small_trace)
    assert [r.index for r in res.requests] == list(range(len(kept)))
    for r in res.requests:
        assert r.completions == 1 and r.prefills_done == 1
        assert r.first_token_at >= r.arrival and r.finished_at >= r.first_token_at
        assert r.hit_tokens + r.uncached_tokens == r.prompt_tokens and r.uncached_tokens >= 1
        assert r.prefill_instance in res.prefill_names
        assert (r.decode_instance in res.decode_names) == (mode == "disaggregated" and r.output_tokens > 1)
    s = res.summary()
    assert s["completed"] == len(kept) and s["requests"] == len(kept)
    assert sum(v for k, v in s["decisions"].items() if k != "rebalanced") == len(kept)
    assert s["moves"] == s["decisions"].get("rebalanced", 0)


def test_engine_caches_stay_within_capacity_and_mirror_the_view(small_trace: PreparedTrace) -> None:
    cfg = SimConfig(trace=small_trace.source, policy="dualmap", rate_scale=2.0, prefix_cache_gib=1.0)
    sim = Simulator(cfg, small_trace)
    peak: dict[str, int] = {}
    for name in sim.prefill_names:
        cache = sim.engines[name].cache
        assert cache is not None
        original = cache.insert

        def checked(blocks, _cache=cache, _orig=original, _name=name):
            out = _orig(blocks)
            peak[_name] = max(peak.get(_name, 0), len(_cache))
            return out

        cache.insert = checked  # type: ignore[method-assign]
    res = sim.run()
    assert cfg.prefix_cache_blocks == 1 * 2**30 // (PROFILE.kv_bytes_per_token * 128)
    assert max(peak.values()) == cfg.prefix_cache_blocks  # evictions really happened
    for name in sim.prefill_names:
        cache = sim.engines[name].cache
        assert cache is not None and len(cache) <= cfg.prefix_cache_blocks
        assert set(cache.blocks()) == sim.view[name].cached_blocks  # KV events mirrored exactly
    assert res.summary()["cache_hit_ratio"] > 0


def test_same_seed_same_json(small_trace: PreparedTrace) -> None:
    a = run(small_trace, mode="disaggregated", rate_scale=2.0, seed=7).summary()
    b = run(small_trace, mode="disaggregated", rate_scale=2.0, seed=7).summary()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_aggregated_decode_equals_step_by_step(small_trace: PreparedTrace, mode: str) -> None:
    fast = run(small_trace, mode=mode, rate_scale=2.0, aggregate_decode=True)
    slow = run(small_trace, mode=mode, rate_scale=2.0, aggregate_decode=False)
    assert fast.events < slow.events
    assert fast.engine_steps == slow.engine_steps
    for a, b in zip(fast.requests, slow.requests):
        assert a.prefill_instance == b.prefill_instance and a.decode_instance == b.decode_instance
        assert a.first_token_at == pytest.approx(b.first_token_at, rel=1e-9, abs=1e-9)
        assert a.finished_at == pytest.approx(b.finished_at, rel=1e-9, abs=1e-9)


def test_disaggregated_moves_prompt_kv(small_trace: PreparedTrace) -> None:
    res = run(small_trace, mode="disaggregated", decode=3)
    expected = sum(r.prompt_tokens * PROFILE.kv_bytes_per_token for r in res.requests if r.output_tokens > 1)
    assert res.kv_bytes_moved == expected
    assert len(res.decode_names) == 3 and sum(res.decode_decisions.values()) == sum(
        1 for r in res.requests if r.output_tokens > 1
    )


# -- engine model vs closed forms ---------------------------------------------------------------------
def fixed_trace(n: int, tokens: int, output: int, gap_ms: float = 1000.0, shared_prefix: bool = False) -> PreparedTrace:
    """n requests of ``tokens`` prompt tokens, ``gap_ms`` apart; distinct prompts unless shared."""
    ids_per = math.ceil(tokens / 512)
    recs = [
        TraceRecord(i * gap_ms, tokens, output, list(range(ids_per)) if shared_prefix else list(range(i * ids_per, (i + 1) * ids_per)))
        for i in range(n)
    ]
    return PreparedTrace(recs, "fixed")


def test_single_request_prefill_and_decode_times() -> None:
    tokens, output = 8192, 50
    res = run(fixed_trace(1, tokens, output), policy="dualmap", prefill=1, warmup=0)
    (r,) = res.requests
    prefill = PROFILE.prefill_overhead_s + tokens * PROFILE.prefill_s_per_token
    decode = sum(PROFILE.decode_step_base_s + (tokens + 1 + k) * PROFILE.decode_s_per_context_token for k in range(output - 1))
    assert r.ttft == pytest.approx(prefill, rel=1e-12)
    assert r.finished_at - r.first_token_at == pytest.approx(decode, rel=1e-9)
    assert r.tpot == pytest.approx(decode / (output - 1), rel=1e-9)


def test_second_identical_prompt_hits_the_cache() -> None:
    tokens = 4096
    res = run(fixed_trace(2, tokens, 1, shared_prefix=True), policy="dualmap", prefill=1, warmup=0)
    first, second = res.requests
    assert first.hit_tokens == 0 and second.hit_tokens == tokens - 1  # one token is always computed
    loaded = PROFILE.prefill_overhead_s + PROFILE.prefill_s_per_token + (tokens - 1) * PROFILE.cached_s_per_token
    assert second.ttft == pytest.approx(loaded, rel=1e-12)


# One instance, back-to-back requests of exactly one step of work each (8192 tokens = the step
# budget), no reuse, no decode: a D/D/1 queue. Request k's TTFT is S + k (S - a) for a gap a < S.
SERVICE_S = PROFILE.prefill_overhead_s + 8192 * PROFILE.prefill_s_per_token
N_QUEUE = 100


@pytest.mark.parametrize("policy", POLICIES)
def test_fifo_queue_ttft_is_analytic(policy: str) -> None:
    gap = 1.2
    res = run(fixed_trace(N_QUEUE, 8192, 1), policy=policy, prefill=1, qps=1 / gap, warmup=0)
    for k, r in enumerate(res.requests):
        assert r.ttft == pytest.approx(SERVICE_S + k * (SERVICE_S - gap), rel=1e-9)


def test_capacity_search_finds_the_analytic_capacity() -> None:
    slo, target, tol = 5.0, 0.9, 0.02
    # Pass iff floor((slo - S) / (S - a)) + 1 >= target * N, i.e. a >= S - (slo - S) / (target N - 1).
    capacity = 1 / (SERVICE_S - (slo - SERVICE_S) / (target * N_QUEUE - 1))
    trace = fixed_trace(N_QUEUE, 8192, 1)

    def run_at(qps: float) -> dict:
        return run(trace, policy="dualmap", prefill=1, qps=qps, warmup=0, slo_ttft=slo).summary()

    res = find_capacity("dualmap", run_at, start_qps=0.3, target=target, tolerance=tol)
    assert res.converged
    assert capacity / (1 + tol) <= res.capacity_qps <= capacity
    assert res.slo_attainment_at_capacity is not None and res.slo_attainment_at_capacity >= target
    assert all(p.passed == (p.qps <= capacity) for p in res.points)


def test_capacity_search_on_a_step_function() -> None:
    def run_at(qps: float) -> dict:
        return {"slo_attainment": 1.0 if qps <= 7.3 else 0.5, "cache_hit_ratio": 0.0}

    for start in (0.01, 7.3, 100.0):
        res: CapacityResult = find_capacity("x", run_at, start_qps=start, tolerance=0.01)
        assert 7.3 / 1.01 <= res.capacity_qps <= 7.3 and res.converged
    never = find_capacity("x", lambda q: {"slo_attainment": 0.0, "cache_hit_ratio": 0.0}, start_qps=1.0, max_probes=5)
    assert never.capacity_qps == 0.0 and not never.converged


# -- metrics ------------------------------------------------------------------------------------------
def test_percentile_interpolates_linearly() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([], 50) is None
    rng = random.Random(0)
    sample = [rng.random() for _ in range(11)]
    assert percentile(sample, 50) == sorted(sample)[5]


def test_slo_attainment_and_cv() -> None:
    assert slo_attainment([1.0, 5.0, 5.0001, 9.0], 5.0) == 0.5
    assert slo_attainment([], 5.0) == 1.0
    assert coefficient_of_variation([2.0, 2.0, 2.0]) == 0.0
    assert coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)
    assert coefficient_of_variation([0.0, 0.0]) == 0.0
