"""The cache index answers exactly what a plain walk of each instance's cached set answers:
the global block -> holders index, and the per-instance binary search used while an instance
has no gaps."""

from hypothesis import given, settings
from hypothesis import strategies as st

from dualmap_pd.cluster import UNKNOWN_PARENT, ClusterView, Role
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


def test_longest_run_equals_the_best_of_every_walk_and_skips_excluded_instances():
    from tests.policy_helpers import make_request

    view = ClusterView(128)
    for name in NAMES:
        view.add_instance(name, Role.PREFILL)
    view.add_instance("d0", Role.DECODE)
    req = make_request("r", [1, 2, 3])
    chain = list(req.block_hashes)
    parents = [None, *chain[:-1]]
    assert view.longest_run(chain) == (0, [])
    view.add_blocks("p0", chain[:4], parents[:4])
    view.add_blocks("p2", chain[:4], parents[:4])
    view.add_blocks("p1", chain[:2], parents[:2])
    view.add_blocks("d0", chain, parents)  # another role never counts
    assert view.longest_run(chain) == (4, ["p0", "p2"])
    assert view.longest_run(chain, exclude=["p0"]) == (4, ["p2"])
    view.set_health("p2", False)
    assert view.longest_run(chain, exclude=["p0"]) == (2, ["p1"])
    view.add_blocks("p3", chain[1:6], parents[1:6])  # a gap: walked on its own, holds nothing
    assert view["p3"].gap_blocks == 1 and view.longest_run(chain) == (4, ["p0"])
    view.add_blocks("p3", chain[:1], parents[:1])  # filled: 6 leading blocks
    assert view.longest_run(chain) == (6, ["p3"])


def reference_hits(cached: set[int], hashes: list[int]) -> int:
    n = 0
    while n < len(hashes) and hashes[n] in cached:
        n += 1
    return n


# (instance, prompt, blocks, kind): kind 0 stores a chain with its parents, 1 stores it with
# its parents tail first (as the simulator's LRU does), 2 stores it without parents, 3 evicts
# one block (maybe from the middle), 4 evicts a chain's tail, 5 clears the instance.
chain_ops = st.lists(
    st.tuples(st.sampled_from(NAMES), st.integers(0, 5), st.integers(0, 16), st.integers(0, 5)),
    max_size=50,
)


@given(chain_ops)
@settings(max_examples=400, deadline=None)
def test_prefix_matching_with_and_without_gaps_equals_a_plain_walk(ops):
    view = ClusterView(128)
    for name in NAMES:
        view.add_instance(name, Role.PREFILL)
    for name, which, upto, kind in ops:
        chain = prompt(which)
        blocks, parents = chain[:upto], [None, *chain[: max(0, upto - 1)]]
        if kind == 0:
            view.add_blocks(name, blocks, parents)
        elif kind == 1:
            view.add_blocks(name, blocks[::-1], parents[::-1])
        elif kind == 2:
            view.add_blocks(name, blocks)
        elif kind == 3 and blocks:
            view.remove_blocks(name, [blocks[-1 if upto % 2 else len(blocks) // 2]])
        elif kind == 4:
            view.remove_blocks(name, blocks[len(blocks) // 2 :][::-1])
        elif kind == 5:
            view.clear_blocks(name)
        st_ = view[name]
        # The gap count is what it claims: cached blocks whose parent is missing or unknown.
        gaps = sum(
            1 for h, p in st_.block_parent.items() if p is not None and (p == UNKNOWN_PARENT or p not in st_.cached_blocks)
        )
        assert st_.gap_blocks == gaps
        assert set(st_.block_parent) == st_.cached_blocks
    for which in range(6):
        hashes = prompt(which)
        for name in NAMES:
            assert view.hit_blocks(name, hashes) == reference_hits(view[name].cached_blocks, hashes)


def test_a_gap_switches_to_the_walk_and_filling_it_switches_back():
    view = ClusterView(128)
    view.add_instance("p0", Role.PREFILL)
    chain = prompt(0)
    view.add_blocks("p0", chain[:10], [None, *chain[:9]])
    assert view["p0"].gap_blocks == 0 and view.hit_blocks("p0", chain) == 10
    view.remove_blocks("p0", [chain[3]])  # a middle block: 6 blocks now lack a cached chain
    assert view["p0"].gap_blocks == 1 and view.hit_blocks("p0", chain) == 3
    view.add_blocks("p0", [chain[3]], [chain[2]])
    assert view["p0"].gap_blocks == 0 and view.hit_blocks("p0", chain) == 10


@given(chain_ops, st.integers(0, 5), st.sets(st.sampled_from(NAMES)))
@settings(max_examples=300, deadline=None)
def test_longest_run_equals_the_best_plain_walk(ops, probe, excluded):
    view = ClusterView(128)
    for name in NAMES:
        view.add_instance(name, Role.PREFILL)
    for name, which, upto, kind in ops:
        chain = prompt(which)
        if kind in (0, 1, 2):
            view.add_blocks(name, chain[:upto], [None, *chain[: max(0, upto - 1)]] if kind < 2 else None)
        elif kind in (3, 4):
            view.remove_blocks(name, chain[upto // 2 : upto // 2 + 1 + (kind == 4) * upto])
        else:
            view.clear_blocks(name)
    hashes = prompt(probe)
    runs = {n: reference_hits(view[n].cached_blocks, hashes) for n in NAMES if n not in excluded}
    best = max(runs.values(), default=0)
    expected = (best, sorted(n for n, r in runs.items() if r == best)) if best else (0, [])
    got = view.longest_run(hashes, exclude=excluded)
    assert (got[0], sorted(got[1])) == expected
