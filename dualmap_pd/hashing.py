"""Chained block hashes: the identity of a KV block is its tokens *and* everything before it.

A block's hash is xxh3-64 of its token ids, seeded with the parent block's hash, so two prompts
share block i's hash exactly when they share their first (i + 1) * block_size tokens. xxh3 is
stable across processes and machines (unlike Python's salted ``hash()``), so two scheduler
replicas, the simulator and a test all compute the same ids.

Only full blocks are hashed: an engine caches only full blocks (vLLM does the same).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

# Seed of the first block's chain. Any fixed value works; it only has to never change.
ROOT_SEED = 0x6475616C6D6170  # "dualmap"
_MASK64 = (1 << 64) - 1


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return array("I", tokens).tobytes()


def hash_block(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash one block of token ids chained to its parent block's hash (None for the first)."""
    seed = ROOT_SEED if parent is None else parent
    return xxhash.xxh3_64_intdigest(_token_bytes(tokens), seed=seed & _MASK64)


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of every full block of ``tokens`` (a trailing partial block is skipped)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_full = len(tokens) // block_size
    if n_full == 0:
        return []
    raw = _token_bytes(tokens[: n_full * block_size])
    width = block_size * 4
    out: list[int] = []
    seed = ROOT_SEED
    digest = xxhash.xxh3_64_intdigest
    for i in range(n_full):
        seed = digest(raw[i * width : (i + 1) * width], seed=seed)
        out.append(seed)
    return out


def trace_block_hashes(
    hash_ids: Sequence[int],
    input_length: int,
    block_size: int,
    trace_block_tokens: int = 512,
) -> list[int]:
    """Chained hashes for a trace request, at the engine's ``block_size``.

    Mooncake traces give one id per ``trace_block_tokens``-token block. Each id is expanded into
    ``trace_block_tokens / block_size`` sub-blocks (sub-block j of id h stands for the tokens
    (h, j)), so the result is the chain an engine with ``block_size`` would compute for a prompt
    synthesised from those ids. Only the full blocks of ``input_length`` tokens are returned.
    """
    if block_size <= 0 or trace_block_tokens % block_size:
        raise ValueError(
            f"block_size ({block_size}) must divide the trace block ({trace_block_tokens} tokens)"
        )
    per_id = trace_block_tokens // block_size
    n_full = min(input_length // block_size, len(hash_ids) * per_id)
    out: list[int] = []
    seed = ROOT_SEED
    digest = xxhash.xxh3_64_intdigest
    for i in range(n_full):
        hid, sub = divmod(i, per_id)
        seed = digest(array("Q", (hash_ids[hid] & _MASK64, sub)).tobytes(), seed=seed)
        out.append(seed)
    return out


def stable_hash(text: str | bytes) -> int:
    """A 64-bit hash of a string that is the same in every process (used by the rings)."""
    data = text.encode() if isinstance(text, str) else text
    return xxhash.xxh3_64_intdigest(data)
