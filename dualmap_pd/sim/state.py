"""Per-request bookkeeping of a simulation run (what the metrics are computed from)."""

from __future__ import annotations

from dataclasses import dataclass

from dualmap_pd.request import RoutedRequest


@dataclass(slots=True, eq=False)
class SimRequest:
    index: int  # position in the trace (arrival order); warm-up is the first W indices
    routed: RoutedRequest  # what the router sees
    arrival: float
    prompt_tokens: int
    output_tokens: int
    replica: int = 0  # the scheduler replica that routed it
    prefill_instance: str = ""  # where its prefill ran (after any rebalancing)
    decode_instance: str = ""  # disaggregated mode only
    hit_tokens: int = 0  # prompt tokens served from the prefix cache (known at prefill start)
    uncached_tokens: int = 0  # prompt tokens computed
    remaining_prefill: int = 0
    branch: str = ""  # the policy's decision label at admission
    prefill_started_at: float = -1.0  # first chunk scheduled (queueing ends)
    first_token_at: float = -1.0  # prefill completion
    finished_at: float = -1.0  # last token
    kv_bytes_moved: int = 0  # P->D transfer (disaggregated)
    migrated_hit_tokens: int = 0  # of hit_tokens, those served from blocks a migration brought
    # Invariant counters: each must end at exactly 1 (the simulator checks).
    prefills_done: int = 0
    completions: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token_at - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for single-token outputs)."""
        if self.output_tokens < 2 or self.finished_at < 0:
            return None
        return (self.finished_at - self.first_token_at) / (self.output_tokens - 1)
