"""The global block -> holders index answers exactly what per-instance walks answer."""

from hypothesis import given, settings
from hypothesis import strategies as st

from dualmap_pd.cluster import ClusterView, Role
from dualmap_pd.hashing import trace_block_hashes

NAMES = ["p0", "p1", "p2", "p3"]
# Each instance caches the leading blocks of a few prompts, minus some evicted blocks (an
# eviction can leave a gap, as a BlockRemoved event for a middle block does).
cache_ops = st.lists(
    st.tuples(st.sampled_from(NAMES), st.integers(0, 5), st.integers(0, 12), st.booleans()),
    max_size=40,
)


def prompt(i: int) -> list[int]:
    return trace_block_hashes([1, 2, 3, 10 + i], 4 * 512, 128)  # 16 blocks, 12 shared by all


@given(cache_ops, st.integers(0, 5))
@settings(max_examples=300, deadline=None)
def test_hit_blocks_all_equals_per_instance_walks(ops, probe):
    view = ClusterView(128)
    for name in NAMES:
        view.add_instance(name, Role.PREFILL)
    for name, which, upto, evict in ops:
        blocks = prompt(which)[:upto]
        if evict and blocks:
            view.remove_blocks(name, blocks[len(blocks) // 2 : len(blocks) // 2 + 1])
        else:
            view.add_blocks(name, blocks)
    hashes = prompt(probe)
    expected = {n: view.hit_blocks(n, hashes) for n in NAMES}
    got = view.hit_blocks_all(hashes)
    assert {n: d for n, d in got.items() if d} == {n: d for n, d in expected.items() if d}
    assert all(got.get(n, 0) == expected[n] for n in NAMES)


def test_request_memo_is_dropped_when_any_cache_changes():
    from tests.policy_helpers import make_request

    view = ClusterView(128)
    for name in NAMES:
        view.add_instance(name, Role.PREFILL)
    req = make_request("r", [1, 2, 3])
    view.add_blocks("p0", req.block_hashes[:4])
    assert view.request_hit_blocks_all(req) == {"p0": 4}
    view.add_blocks("p1", req.block_hashes)
    assert view.request_hit_blocks_all(req) == {"p0": 4, "p1": len(req.block_hashes)}
    view.remove_blocks("p0", req.block_hashes[:1])
    assert view.request_hit_blocks_all(req) == {"p1": len(req.block_hashes)}
