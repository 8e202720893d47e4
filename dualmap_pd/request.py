"""What the policy core knows about a request, and what a routing decision says."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class RoutedRequest:
    """A request as the router sees it: its identity, size and prompt blocks.

    ``block_hashes`` are the chained hashes of the prompt's full blocks (see hashing.py);
    ``fallback_key`` routes prompts shorter than one block. Scheduling fields are filled by the
    router (``candidates``, ``key_depth``) and must not be changed by policies.
    """

    request_id: str
    prompt_tokens: int
    block_hashes: list[int]
    block_size: int
    arrival: float
    fallback_key: int = 0
    expected_output_tokens: int | None = None
    # Set by the router when the request is admitted.
    key_depth: int = 0
    candidates: tuple[str, ...] = ()
    # Set while the request waits in a scheduler-side queue: its instance and uncached tokens there.
    queued_on: str | None = None
    queued_uncached: int = 0
    enqueued_at: float = 0.0
    moves: int = 0
    # instance -> (cache epoch, hit blocks): see ClusterView.request_hit_blocks.
    hit_memo: dict[str, tuple[int, int]] = field(default_factory=dict)

    def routing_key(self, depth: int) -> int:
        """The key for a prefix of ``depth`` blocks (the chained hash of its last block)."""
        if depth <= 0 or not self.block_hashes:
            return self.fallback_key
        return self.block_hashes[min(depth, len(self.block_hashes)) - 1]


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why. ``branch`` is a short, stable label (a metric label)."""

    instance: str
    branch: str
    candidates: tuple[str, ...] = ()
    hit_tokens: int = 0
    estimated_ttft: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Move:
    """Rebalancing: a queued request goes from one instance's queue to another's."""

    request_id: str
    source: str
    target: str
    gain_s: float
    branch: str = "rebalanced"


class NoInstanceError(RuntimeError):
    """No eligible (healthy, not draining) instance can take the request."""
