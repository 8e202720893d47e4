"""Deterministic prompts synthesised from Mooncake ``hash_ids``.

A trace gives no text, only one id per 512-token prompt block, with the promise that requests
sharing their first k ids share their first k blocks. To replay it against a real engine every id
is expanded into a fixed block of tokens:

* the block's content comes from SHAKE-256 keyed by ``(seed, hash_id)``: an extendable-output
  hash is a PRNG that is identical in every process, machine and Python version (Python's
  ``hash()`` is salted per process, and ``random``/numpy streams may change between releases);
* because SHAKE output is prefix-stable, a shorter block of the same id is a prefix of a longer
  one, so changing the scale never reshuffles content, it only truncates it.

Lengths are scaled to fit a small model: with ``max_prompt_tokens`` T, every block becomes
``round(512 * s)`` tokens with ``s = min(1, T / longest input_length)`` and each prompt is cut to
``round(input_length * s)`` tokens, so the shared-prefix structure of the trace survives scaling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dualmap_pd.trace import TRACE_BLOCK_TOKENS, TraceRecord

PROMPT_FORMATS = ("text", "tokens")

# Ids below this are special tokens (bos/eos/pad/unk) or byte fallbacks in most vocabularies;
# sending them in a prompt can end generation early or be rejected.
MIN_TOKEN_ID = 100

# A trace line with no ids still needs a non-empty prompt; one reserved id, outside the
# non-negative range trace ids use, keeps it from colliding with a real block.
EMPTY_RECORD_ID = -1

# Two-letter syllables: with a leading space each is a single token in common byte-level BPE
# vocabularies and in our tiny model's tokenizer (trained on syllable pseudo-words), so one word
# is about one token. Words are always joined by single spaces, and byte-level BPE never merges
# across a space, so the tokens of a block do not depend on what comes before or after it.
WORDS: tuple[str, ...] = tuple(
    "ka ri to na mi su le po da ve lo ti ra ne so mu fa gi he ju "
    "ba co de fi go hu jo ku lu ma no pe ro sa tu vi wa yo ze".split()
)


@dataclass(frozen=True)
class PromptScaling:
    """How trace lengths shrink to fit a small model (``scale`` 1.0 keeps them unchanged)."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"prompt scale must be in (0, 1], got {self.scale}")

    @classmethod
    def fit(cls, records: Sequence[TraceRecord], max_prompt_tokens: int | None) -> PromptScaling:
        """The scale at which the longest of ``records`` has at most ``max_prompt_tokens``."""
        if max_prompt_tokens is None:
            return cls(1.0)
        if max_prompt_tokens <= 0:
            raise ValueError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
        longest = max((r.input_length for r in records), default=0)
        if longest <= max_prompt_tokens:
            return cls(1.0)
        return cls(max_prompt_tokens / longest)

    @property
    def block_tokens(self) -> int:
        # At least one token per block: a zero-length block would make every prompt empty and
        # erase the prefix structure the replay is meant to exercise.
        return max(1, round(TRACE_BLOCK_TOKENS * self.scale))

    def prompt_tokens(self, record: TraceRecord) -> int:
        """Target prompt length of ``record``; never more than its blocks can hold."""
        target = max(1, round(record.input_length * self.scale))
        # Rounding the block size down can leave the ids short of the rounded prompt length;
        # padding with made-up content would invent sharing the trace does not have.
        return min(target, max(1, len(record.hash_ids)) * self.block_tokens)


@dataclass(frozen=True)
class PromptSynthesizer:
    """Builds the prompt of a trace record: token ids, or text of one word per token.

    ``seed`` changes every block, e.g. so a second run does not hit the prefix cache that the
    first run left in the engine.
    """

    scaling: PromptScaling = PromptScaling()
    prompt_format: str = "text"
    vocab_size: int = 8000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}"
            )
        if self.vocab_size <= MIN_TOKEN_ID:
            raise ValueError(
                f"vocab_size must be greater than {MIN_TOKEN_ID}, got {self.vocab_size}"
            )

    def _block_stream(self, hash_id: int, n: int) -> np.ndarray:
        """``n`` pseudo-random uint32 values that depend only on (seed, hash_id)."""
        key = f"dualmap-pd/prompt-block/{self.seed}/{hash_id}".encode()
        digest = hashlib.shake_256(key).digest(4 * n)
        # Explicit little-endian so the ids are the same on every machine.
        return np.frombuffer(digest, dtype="<u4").astype(np.int64)

    def block_token_ids(self, hash_id: int, n_tokens: int | None = None) -> list[int]:
        """Token ids of the block for ``hash_id``, in ``[MIN_TOKEN_ID, vocab_size)``."""
        n = self.scaling.block_tokens if n_tokens is None else n_tokens
        values = self._block_stream(hash_id, n) % (self.vocab_size - MIN_TOKEN_ID) + MIN_TOKEN_ID
        return values.tolist()

    def block_words(self, hash_id: int, n_words: int | None = None) -> list[str]:
        """Words of the block for ``hash_id`` (one word stands for one token)."""
        n = self.scaling.block_tokens if n_words is None else n_words
        return [WORDS[i] for i in (self._block_stream(hash_id, n) % len(WORDS)).tolist()]

    def _units(self, record: TraceRecord, block_unit: Callable[[int, int], list]) -> list:
        """Concatenate the blocks of ``record`` and cut to its scaled length."""
        length = self.scaling.prompt_tokens(record)
        per_block = self.scaling.block_tokens
        ids = record.hash_ids or [EMPTY_RECORD_ID]
        units: list = []
        for hash_id in ids:
            remaining = length - len(units)
            if remaining <= 0:
                break
            # Only the last block is cut short; asking for fewer units gives a prefix of the
            # full block, so it still matches the same id's full block in other prompts.
            units.extend(block_unit(hash_id, min(per_block, remaining)))
        return units

    def token_ids(self, record: TraceRecord) -> list[int]:
        return self._units(record, self.block_token_ids)

    def text(self, record: TraceRecord) -> str:
        return " ".join(self._units(record, self.block_words))

    def prompt(self, record: TraceRecord) -> str | list[int]:
        """The prompt in the configured format (a list of ids is what /v1/completions takes)."""
        if self.prompt_format == "tokens":
            return self.token_ids(record)
        return self.text(record)
