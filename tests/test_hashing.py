import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualmap_pd.hashing import block_hashes, hash_block, stable_hash, trace_block_hashes

tokens = st.lists(st.integers(min_value=0, max_value=200_000), max_size=600)


@given(tokens, st.sampled_from([1, 16, 128]))
def test_chain_matches_step_by_step(toks, bs):
    chain = block_hashes(toks, bs)
    assert len(chain) == len(toks) // bs
    parent = None
    for i, h in enumerate(chain):
        parent = hash_block(parent, toks[i * bs : (i + 1) * bs])
        assert h == parent


@given(tokens, tokens)
def test_shared_prefix_shares_exactly_the_common_full_blocks(a, b):
    bs = 16
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    ha, hb = block_hashes(a, bs), block_hashes(b, bs)
    shared = 0
    while shared < min(len(ha), len(hb)) and ha[shared] == hb[shared]:
        shared += 1
    assert shared == min(common // bs, len(ha), len(hb))


def test_same_block_different_parent_differs():
    blk = list(range(16))
    assert hash_block(None, blk) != hash_block(hash_block(None, blk), blk)


def test_stable_across_processes():
    code = (
        "from dualmap_pd.hashing import block_hashes, stable_hash;"
        "print(block_hashes(list(range(300)), 128), stable_hash('abc'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}
        | {k: v for k, v in __import__("os").environ.items() if k != "PYTHONHASHSEED"},
    ).stdout.strip()
    assert out == f"{block_hashes(list(range(300)), 128)} {stable_hash('abc')}"


def test_trace_ids_expand_to_engine_blocks():
    a = trace_block_hashes([7, 8, 9], input_length=1500, block_size=128)
    b = trace_block_hashes([7, 8, 10], input_length=1536, block_size=128)
    assert len(a) == 1500 // 128  # 11 full blocks
    assert len(b) == 12
    assert a[:8] == b[:8]  # ids 7, 8 -> 2 x 4 sub-blocks shared
    assert a[8] != b[8]
    # Coarser engine blocks: 512-token blocks are one per id.
    assert len(trace_block_hashes([7, 8, 9], 1500, 512)) == 2


def test_bad_block_sizes_are_rejected():
    with pytest.raises(ValueError):
        block_hashes([1, 2, 3], 0)
    with pytest.raises(ValueError):
        trace_block_hashes([1], 512, 100)
