"""Small builders shared by the policy unit tests."""

from __future__ import annotations

import copy

from dualmap_pd.cluster import ClusterView
from dualmap_pd.cost import CostModel, get_profile
from dualmap_pd.hashing import hash_block, trace_block_hashes
from dualmap_pd.policies import PolicyContext
from dualmap_pd.request import RoutedRequest


def make_view(n_prefill: int = 4, n_decode: int = 0, block_size: int = 128) -> ClusterView:
    view = ClusterView(block_size)
    for i in range(n_prefill):
        view.add_instance(f"p{i}", "prefill")
    for i in range(n_decode):
        view.add_instance(f"d{i}", "decode")
    return view


def make_ctx(slo: float = 5.0, seed: int = 0) -> PolicyContext:
    return PolicyContext(CostModel(get_profile("qwen7b-910b4")), slo_ttft=slo, seed=seed)


def make_request(rid: str, ids: list[int], tokens: int | None = None, arrival: float = 0.0) -> RoutedRequest:
    tokens = tokens if tokens is not None else len(ids) * 512
    return RoutedRequest(
        request_id=rid,
        prompt_tokens=tokens,
        block_hashes=trace_block_hashes(ids, tokens, 128),
        block_size=128,
        arrival=arrival,
        fallback_key=hash_block(None, ids) if ids else 0,
    )


def snapshot(view: ClusterView) -> dict:
    """Everything a policy could mutate, for purity checks."""
    return {
        s.name: copy.deepcopy({k: v for k, v in vars(s).items()}) for s in view.instances()
    } | {"_holder_bits": dict(view._holder_bits), "_v": view.membership_version}
