"""Candidate churn over recent keys: what membership changes do to prefixes' candidate pairs."""

from __future__ import annotations

import random

import pytest

from dualmap_pd.churn import CandidateChurnTracker, RecentKeys
from dualmap_pd.ring import DualRing

_rng = random.Random(11)
KEYS = [_rng.getrandbits(64) for _ in range(5000)]


def test_recent_keys_are_bounded_and_forget_the_oldest() -> None:
    recent = RecentKeys(3)
    for k in (1, 2, 3, 1, 4):  # 1 is refreshed, so 2 is the oldest when 4 arrives
        recent.record(k)
    assert list(recent) == [3, 1, 4]
    with pytest.raises(ValueError):
        RecentKeys(0)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_a_join_changes_only_pairs_that_now_hold_the_newcomer(n: int) -> None:
    names = [f"p{i}" for i in range(n)]
    tracker = CandidateChurnTracker(capacity=len(KEYS))
    for k in KEYS:
        tracker.record(k)
    assert tracker.sync(names).checked == len(KEYS)
    report = tracker.sync([*names, "new"])
    after = DualRing([*names, "new"])
    with_new = sum("new" in after.candidates(k) for k in KEYS)
    assert report.changed == with_new  # every changed pair gained the newcomer, no other moved
    # A pair holds the newcomer with probability about 2 / (n + 1).
    assert 0.6 * 2 / (n + 1) <= report.fraction <= 1.4 * 2 / (n + 1)
    assert tracker.sync([*names, "new"]).changed == 0  # no change, no churn


def test_excluding_an_instance_moves_only_the_pairs_that_held_it() -> None:
    names = [f"p{i}" for i in range(6)]
    tracker = CandidateChurnTracker(capacity=len(KEYS))
    for k in KEYS:
        tracker.record(k)
    tracker.sync(names)
    report = tracker.sync(names, excluded={"p3"})
    ring = DualRing(names)
    assert report.changed == sum("p3" in ring.candidates(k) for k in KEYS)
