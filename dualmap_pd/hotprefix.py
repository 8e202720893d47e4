"""Adaptive prefix-key depth: hot prefixes get longer routing keys.

DualMap routes on the first k blocks of a prompt. With k fixed, one very hot system prompt maps
every request that carries it onto the same two instances. The detector measures, over a sliding
window of recent requests, the traffic share of each prefix; a prefix whose share exceeds
``extend_share`` (paper: 2/n for n instances) is marked hot, and requests carrying a hot prefix
are keyed one block deeper, which splits the hot prefix into many keys. A hot prefix whose share
drops below ``shrink_share`` is released and its requests go back to the shorter key.

Because block hashes are chained, the key for depth k is simply the k-th block hash.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass


# The hot-prefix share threshold in the authors' code (the paper's prose says 2/n instead).
AUTHORS_EXTEND_SHARE = 0.0612


@dataclass(frozen=True)
class HotPrefixConfig:
    window: int = 200  # requests in the sliding window (paper: last 200)
    min_window: int = 20  # no decision before this many requests were seen
    extend_share: float | None = None  # None: 2 / number of instances (paper's prose)
    shrink_share: float = 0.02  # release a hot prefix below this share (authors' code)
    base_depth: int = 1  # default key depth in blocks
    max_depth: int = 64  # cap on the key depth in blocks


class HotPrefixDetector:
    """Sliding-window traffic shares of prefixes, and the key depth they imply.

    ``key_depth`` is pure (no state change); ``observe`` records a routed request. The window
    counts, for each request, every prefix it passes through up to one block below its key, so
    the share of a just-extended prefix is known at once.
    """

    def __init__(self, config: HotPrefixConfig | None = None, n_instances: int = 8) -> None:
        self.config = config or HotPrefixConfig()
        if self.config.window < self.config.min_window or self.config.min_window < 1:
            raise ValueError("need 1 <= min_window <= window")
        self._n_instances = max(1, n_instances)
        self._window: deque[tuple[int, ...]] = deque()
        self._counts: Counter[int] = Counter()
        self._hot: set[int] = set()

    @property
    def extend_share(self) -> float:
        if self.config.extend_share is not None:
            return self.config.extend_share
        return min(1.0, 2.0 / self._n_instances)

    @property
    def shrink_share(self) -> float:
        """The release threshold, kept at most half the extend threshold. At large n, 2/n falls
        below the paper's 0.02, and a prefix marked hot at share 0.01 would be released by the
        same update; the hysteresis keeps a hot prefix hot until its traffic has really faded."""
        return min(self.config.shrink_share, self.extend_share / 2)

    def set_instance_count(self, n: int) -> None:
        self._n_instances = max(1, n)

    @property
    def hot_prefixes(self) -> frozenset[int]:
        return frozenset(self._hot)

    def share(self, prefix_hash: int) -> float:
        if not self._window:
            return 0.0
        return self._counts[prefix_hash] / len(self._window)

    def key_depth(self, block_hashes: Sequence[int]) -> int:
        """Depth (in blocks, >= 1 unless there are no blocks) of the routing key."""
        n = len(block_hashes)
        if n == 0:
            return 0
        depth = min(self.config.base_depth, n)
        limit = min(self.config.max_depth, n)
        hot = self._hot
        while depth < limit and block_hashes[depth - 1] in hot:
            depth += 1
        return depth

    def observe(self, block_hashes: Sequence[int], depth: int) -> None:
        """Record one routed request keyed at ``depth``; update the hot set."""
        cfg = self.config
        counted = tuple(block_hashes[: min(len(block_hashes), depth + 1)])
        self._window.append(counted)
        self._counts.update(counted)
        if len(self._window) > cfg.window:
            old = self._window.popleft()
            self._counts.subtract(old)
            for h in old:
                if self._counts[h] <= 0:
                    del self._counts[h]
                    self._hot.discard(h)
        if len(self._window) < cfg.min_window or depth == 0:
            return
        size = len(self._window)
        key = block_hashes[depth - 1]
        if depth < min(cfg.max_depth, len(block_hashes)) and self._counts[key] / size > self.extend_share:
            self._hot.add(key)
        # Release hot prefixes on this request's path whose traffic has faded.
        shrink = self.shrink_share
        for h in counted:
            if h in self._hot and self._counts[h] / size < shrink:
                self._hot.discard(h)
