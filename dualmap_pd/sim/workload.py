"""Simulation workloads: a trace with its engine block hashes computed once, tiling. Which
requests run and when (oversize drop, warm-up, arrival times) is ``dualmap_pd.workload_prep``.

Block hashes are the expensive part of preparing a trace (one xxh3 per 128-token block, ~120 per
request on the synthetic trace). ``PreparedTrace`` computes them once per block size and shares
them between every simulation run on the trace (a capacity search runs dozens). Prompts that
share a prefix share its hash chain, so the expansion is memoised per (parent hash, trace id):
~64% of the synthetic trace's blocks repeat an earlier block, and their hashes are looked up, not
recomputed. The result is identical to ``hashing.trace_block_hashes`` (tested).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from pathlib import Path

import xxhash

from dualmap_pd.hashing import ROOT_SEED
from dualmap_pd.trace import TRACE_BLOCK_TOKENS, TraceRecord, load_trace
from dualmap_pd.workload_prep import default_warmup

__all__ = ["PreparedTrace", "default_warmup", "load_prepared", "tile_trace"]

_MASK64 = (1 << 64) - 1
# Seed of short prompts' routing keys: keeps them apart from block-hash chains (ROOT_SEED).
_SHORT_PROMPT_SEED = 0x73686F7274  # "short"

def tile_trace(records: Sequence[TraceRecord], times: int, interleave: bool = False) -> list[TraceRecord]:
    """The trace repeated ``times`` times, as one larger trace.

    Copy k's hash ids are shifted by k x (largest id + 1), so copies share no prefix with each
    other (each reuses only within itself, as the original does).

    Back to back (default): copy k is shifted in time by k x (span + mean inter-arrival gap),
    so the arrival rate stays the trace's own and the trace gets ``times`` times longer (the
    12k-request workload). Interleaved: copy k is shifted by k x gap / times, so all copies run
    over the same span and the rate is ``times`` times higher while each prefix keeps its own
    rate: the workload of a cluster with more users, not of faster users (the 100k-request,
    1,024-instance workload; compressing a back-to-back tiling instead would send every shared
    prefix 128x faster at its two DualMap candidates).
    """
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
    recs = sorted(records, key=lambda r: r.timestamp)
    if times == 1 or not recs:
        return list(recs)
    span = recs[-1].timestamp - recs[0].timestamp
    gap = span / (len(recs) - 1) if len(recs) > 1 else 1000.0
    period = gap / times if interleave else span + gap
    id_stride = 1 + max((max(r.hash_ids) for r in recs if r.hash_ids), default=0)
    out: list[TraceRecord] = []
    for k in range(times):
        dt, did = k * period, k * id_stride
        for r in recs:
            out.append(
                TraceRecord(
                    timestamp=r.timestamp + dt,
                    input_length=r.input_length,
                    output_length=r.output_length,
                    hash_ids=[h + did for h in r.hash_ids],
                )
            )
    if interleave:
        out.sort(key=lambda r: r.timestamp)  # stable: equal times keep copy order
    return out


class PreparedTrace:
    """Trace records plus their engine block hashes, computed once per block size."""

    def __init__(self, records: Sequence[TraceRecord], source: str = "<memory>") -> None:
        if not records:
            raise ValueError(f"{source}: no requests")
        self.records: list[TraceRecord] = sorted(records, key=lambda r: r.timestamp)
        self.source = source
        self._hashes: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def block_hashes(self, block_size: int) -> list[list[int]]:
        """Chained block hashes of every request at ``block_size`` (cached)."""
        cached = self._hashes.get(block_size)
        if cached is None:
            cached = _expand_all(self.records, block_size)
            self._hashes[block_size] = cached
        return cached

    def fallback_key(self, index: int) -> int:
        """Routing key of a prompt shorter than one block (22% of the synthetic trace).

        Live, it is the xxh3 hash of the short prompt's tokens (``hash_block(None, tokens)``):
        a uniform 64-bit value, so short prompts spread over the rings. The prompt a replay
        synthesises is the first ``input_length`` tokens of its first id's block, so here the
        key hashes (first id, input_length). Never the raw id: small integers all fall before
        the first point of a consistent-hash ring, which sent every short prompt to the same
        two DualMap candidates.
        """
        rec = self.records[index]
        first = rec.hash_ids[0] if rec.hash_ids else 0
        return xxhash.xxh3_64_intdigest(array("Q", (first & _MASK64, rec.input_length)).tobytes(), seed=_SHORT_PROMPT_SEED)


def load_prepared(path: str | Path, requests: int | None = None, tile: int = 1) -> PreparedTrace:
    """Load a trace, tile it ``tile`` times, keep the first ``requests`` requests."""
    records = load_trace(path)
    if tile > 1:
        records = tile_trace(records, tile)
    if requests is not None:
        records = records[:requests]
    return PreparedTrace(records, str(path))


def _expand_all(records: Sequence[TraceRecord], block_size: int) -> list[list[int]]:
    if block_size <= 0 or TRACE_BLOCK_TOKENS % block_size:
        raise ValueError(f"block_size ({block_size}) must divide the trace block ({TRACE_BLOCK_TOKENS} tokens)")
    per_id = TRACE_BLOCK_TOKENS // block_size
    # (parent chain hash, trace id) -> the per_id sub-block hashes that id expands to.
    memo: dict[tuple[int, int], tuple[int, ...]] = {}
    digest = xxhash.xxh3_64_intdigest
    out: list[list[int]] = []
    for rec in records:
        n_full = min(rec.input_length // block_size, len(rec.hash_ids) * per_id)
        chain: list[int] = []
        seed = ROOT_SEED
        for hid in rec.hash_ids[: -(-n_full // per_id)]:
            key = (seed, hid)
            subs = memo.get(key)
            if subs is None:
                h = seed
                sub_list = []
                for sub in range(per_id):
                    h = digest(array("Q", (hid & _MASK64, sub)).tobytes(), seed=h)
                    sub_list.append(h)
                subs = tuple(sub_list)
                memo[key] = subs
            chain.extend(subs)
            seed = subs[-1]
        del chain[n_full:]
        out.append(chain)
    return out
