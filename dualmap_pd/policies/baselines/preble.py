"""Preble's E2 global scheduler (exploitation + exploration, with post-assignment rebalancing).

Sources: Srivatsa et al., "Preble: Efficient Distributed Prompt Scheduling for LLM Serving",
ICLR 2025; code github WukLab/preble, multi_node/global_scheduler_with_time.py
(``GlobalSchedulerWithTime.runtime_selector`` and ``handle_important_node_stealing``) and its
``SlidingWindowHistogram`` / ``TTFTWindowedOverloadedDetector``. Per request:

1. Insert the prompt into a global radix tree of routed prompts. ``new`` = tokens past the
   longest match, ``cached`` = matched tokens.
2. Exploit if cached > new: candidates are the instances the matched prefix is allocated to
   (``get_parent_gpu_allocation``: the deepest matched node with a live allocation; none -> all);
   take the lowest load cost among them.
3. Explore otherwise: the lowest load cost over all instances. Load cost (paper, section 4) =
   L_i (prefill time of the requests routed to i in the last H = 3 minutes, each priced at its
   cache miss on i) + P_i (this request's miss cost on i).
4. Allocate the whole path to the chosen instance; book the request's cost on its "important
   node" (the nearest node up the path whose own tokens outnumber the context before it).
5. Rebalance after every request once warm (>= 50 requests per instance routed): instances
   sorted by load (counting nodes with >= 2 requests in the window); while the heaviest is
   >= 1.5x the lightest, move its cheapest important nodes (and subtrees) to the lightest as long
   as the move does not invert them; if it has a single such node, replicate it to the lightest
   instead, but only if that node's TTFT there doubled (mean over the newer half of the window
   >= 2x the older half). Then the next heaviest against the (updated) lightest.

Mapping and deviations:
- Tree nodes are runs of chained block hashes; allocation, window load and TTFT history live on
  them exactly as Preble keeps them per node; splits copy allocations and move the node's
  history to the new parent when only the parent is "important" (``handle_split_node_histogram``).
- Window: allocations older than H are void (Preble resets a node's allocation when it leaves
  the histogram window) and tree nodes untouched for H are pruned; an old prefix then falls to
  the explore rule, whose P_i still rewards instances that cache it.
- P_i uses the real cache index (``view.hit_blocks_all``) and the shared cost model in place of
  Preble's fitted prefill-time regression; the decode-time term of L_i is left out because
  prefill instances do not decode in a disaggregated cluster. The optional eviction term M_i is
  left out as in Preble's default (``enable_eviction=False``).
- Rebalancing acts on routing only (future requests of a moved prefix go to the new instance):
  nothing already sent is moved, as in Preble, which dispatches to engines at once.
- TTFT samples come from ``on_prefill_done`` (TTFT = prefill finish - arrival in disaggregated
  serving).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from dualmap_pd.cluster import ClusterView
from dualmap_pd.policies.base import PREFILL_POLICIES, PolicyContext, PrefillPolicy
from dualmap_pd.policies.baselines.common import PrefillCache
from dualmap_pd.request import Decision, NoInstanceError, RoutedRequest


@dataclass(frozen=True)
class PrebleConfig:
    window_s: float = 180.0  # H: SlidingWindowHistogram(window_duration=timedelta(minutes=3))
    rebalance: bool = True
    rebalance_threshold: float = 1.5  # HIGH_LOAD_THRESHOLD
    warmup_requests_per_instance: int = 50  # no rebalancing before 50 x instances requests
    replicate_ttft_factor: float = 2.0  # is_node_overloaded: newer half >= 2 x older half
    prune_interval_s: float = 45.0  # how often stale tree nodes are swept (memory only)

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.rebalance_threshold < 1.0:
            raise ValueError("window_s must be > 0 and rebalance_threshold >= 1")


class _Node:
    """A radix-tree node: a run of block hashes starting ``start`` blocks into the prompt."""

    __slots__ = ("blocks", "start", "parent", "children", "alloc", "last", "gid")

    def __init__(self, blocks: list[int], start: int, parent: _Node | None, now: float) -> None:
        self.blocks = blocks
        self.start = start
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.alloc: dict[str, float] = {}  # instance -> last time the node was allocated to it
        self.last = now
        self.gid: int | None = None  # window-history id while the node is an important node

    def important(self) -> bool:
        # Preble's is_large_node: the node's own tokens outnumber the context before it.
        return len(self.blocks) > self.start


class _Rec:
    __slots__ = ("time", "inst", "gid", "cost")

    def __init__(self, time: float, inst: str, gid: int, cost: float) -> None:
        self.time, self.inst, self.gid, self.cost = time, inst, gid, cost


class _Agg:
    """Window history of one important node on one instance."""

    __slots__ = ("cost", "count", "recs")

    def __init__(self) -> None:
        self.cost = 0.0
        self.count = 0
        self.recs: deque[_Rec] = deque()


@PREFILL_POLICIES.register
class PreblePolicy(PrefillPolicy):
    """Preble E2 (ICLR 2025, github WukLab/preble); see module docstring."""

    name = "preble"

    def __init__(self, ctx: PolicyContext, config: PrebleConfig | None = None) -> None:
        super().__init__(ctx)
        self.config = config or PrebleConfig()
        self.root = _Node([], 0, None, 0.0)
        self.root.gid = 0  # prompts shorter than a block book here; never rebalanced
        self._group_node: dict[int, _Node] = {0: self.root}
        self._next_gid = 1
        self._window: deque[_Rec] = deque()
        self._agg: dict[tuple[str, int], _Agg] = {}
        self._load: dict[str, float] = {}  # L_i: all nodes
        self._load2: dict[str, float] = {}  # nodes with >= 2 requests in the window (rebalancing)
        self._gcount: dict[int, int] = {}
        self._ginst: dict[int, set[str]] = {}
        self._inst_groups: dict[str, set[int]] = {}
        self._ttft: dict[tuple[int, str], deque[tuple[float, float]]] = {}
        self._req_gid: dict[str, int] = {}
        self._routed = 0
        self._last_prune = 0.0
        self._cache = PrefillCache()

    def on_membership_change(self, view: ClusterView) -> None:
        self._cache.refresh(view)

    # -- tree ---------------------------------------------------------------------------------
    def _match(self, blocks: Sequence[int], fresh: float) -> tuple[int, _Node]:
        """Matched blocks and the deepest node touched (read-only)."""
        node, i, n = self.root, 0, len(blocks)
        deepest = self.root
        while i < n:
            child = node.children.get(blocks[i])
            if child is None or child.last < fresh:
                break
            seg = child.blocks
            lim = min(len(seg), n - i)
            j = 1
            while j < lim and seg[j] == blocks[i + j]:
                j += 1
            i += j
            deepest = child
            if j < len(seg):
                break
            node = child
        return i, deepest

    def _split(self, child: _Node, j: int) -> _Node:
        """Split ``child`` after its first ``j`` blocks; returns the new upper node."""
        up = _Node(child.blocks[:j], child.start, child.parent, child.last)
        up.alloc = dict(child.alloc)  # handle_split_nodes_gpu_allocations
        parent = child.parent
        if parent is not None:
            parent.children[child.blocks[0]] = up
        child.blocks = child.blocks[j:]
        child.start += j
        child.parent = up
        up.children[child.blocks[0]] = child
        if child.gid is not None and up.important() and not child.important():
            # handle_split_node_histogram: the history follows the node that stays important.
            up.gid, child.gid = child.gid, None
            self._group_node[up.gid] = up
        return up

    def _drop_subtree(self, node: _Node) -> None:
        stack = [node]
        while stack:
            nd = stack.pop()
            if nd.gid is not None and nd.gid not in self._gcount:
                self._group_node.pop(nd.gid, None)
            stack.extend(nd.children.values())

    def _insert(self, blocks: Sequence[int], now: float) -> _Node:
        """Insert a prompt; returns the node it ends in (the root for a prompt with no block)."""
        fresh = now - self.config.window_s
        node, i, n = self.root, 0, len(blocks)
        while i < n:
            key = blocks[i]
            child = node.children.get(key)
            if child is not None and child.last < fresh:
                del node.children[key]
                self._drop_subtree(child)
                child = None
            if child is None:
                leaf = _Node(list(blocks[i:]), i, node, now)
                node.children[key] = leaf
                return leaf
            seg = child.blocks
            lim = min(len(seg), n - i)
            j = 1
            while j < lim and seg[j] == blocks[i + j]:
                j += 1
            if j < len(seg):
                child = self._split(child, j)
            i += j
            node = child
        return node

    # -- load ---------------------------------------------------------------------------------
    def _add(self, rec: _Rec) -> None:
        key = (rec.inst, rec.gid)
        agg = self._agg.get(key)
        if agg is None:
            agg = self._agg[key] = _Agg()
            self._ginst.setdefault(rec.gid, set()).add(rec.inst)
            self._inst_groups.setdefault(rec.inst, set()).add(rec.gid)
        agg.cost += rec.cost
        agg.count += 1
        agg.recs.append(rec)
        self._load[rec.inst] = self._load.get(rec.inst, 0.0) + rec.cost
        count = self._gcount.get(rec.gid, 0) + 1
        self._gcount[rec.gid] = count
        if count == 2:
            for inst in self._ginst[rec.gid]:
                self._load2[inst] = self._load2.get(inst, 0.0) + self._agg[(inst, rec.gid)].cost
        elif count > 2:
            self._load2[rec.inst] = self._load2.get(rec.inst, 0.0) + rec.cost

    def _expire(self, now: float) -> None:
        cutoff = now - self.config.window_s
        window = self._window
        while window and window[0].time < cutoff:
            rec = window.popleft()
            gid, inst = rec.gid, rec.inst
            count = self._gcount[gid]
            if count == 2:
                for i in self._ginst[gid]:
                    self._load2[i] -= self._agg[(i, gid)].cost
            elif count > 2:
                self._load2[inst] -= rec.cost
            agg = self._agg[(inst, gid)]
            agg.recs.popleft()  # the oldest of its node on its instance, as it is the oldest overall
            agg.cost -= rec.cost
            agg.count -= 1
            self._load[inst] -= rec.cost
            if agg.count == 0:
                del self._agg[(inst, gid)]
                self._ginst[gid].discard(inst)
                self._inst_groups[inst].discard(gid)
                self._load[inst] = max(0.0, self._load[inst])  # no float residue on an idle instance
                self._ttft.pop((gid, inst), None)
            if count == 1:
                del self._gcount[gid], self._ginst[gid]
            else:
                self._gcount[gid] = count - 1

    def _miss_cost(self, name: str, prompt_tokens: int, hit: int) -> float:
        return self.ctx.cost.prefill_time(prompt_tokens - hit, hit, name) if prompt_tokens > 0 else 0.0

    # -- selection ----------------------------------------------------------------------------
    def select(self, req: RoutedRequest, view: ClusterView, now: float) -> Decision:
        cfg = self.config
        fresh = now - cfg.window_s
        snap = self._cache.get(view)
        eligible = snap.eligible_names
        if not eligible:
            raise NoInstanceError("no healthy prefill instance")
        bs = view.block_size
        P = req.prompt_tokens
        matched, deepest = self._match(req.block_hashes, fresh)
        cached = min(P, matched * bs)
        candidates = eligible
        branch = "explore"
        if P - cached < cached:
            branch = "exploit"
            ok = snap.eligible_set
            node: _Node | None = deepest
            while node is not None and node is not self.root:
                alloc = [i for i, t in node.alloc.items() if t >= fresh and i in ok]
                if alloc:
                    candidates = sorted(alloc, key=snap.index.__getitem__)
                    break
                node = node.parent
        # Loads as of ``now``: drop window entries that expired since the last decision.
        stale: dict[str, float] = {}
        for rec in self._window:
            if rec.time >= fresh:
                break
            stale[rec.inst] = stale.get(rec.inst, 0.0) + rec.cost
        hits = view.hit_blocks_all(req.block_hashes)
        cost = self.ctx.cost
        scales = cost.prefill_scale
        cold = self._miss_cost(candidates[0], P, 0) / (scales.get(candidates[0], 1.0) if scales else 1.0)
        load = self._load
        best, best_cost, best_hit = candidates[0], float("inf"), 0
        for name in candidates:  # P_i inlined for the common no-hit case: this runs per instance
            hit = min(P, hits.get(name, 0) * bs)
            if hit:
                miss = self._miss_cost(name, P, hit)
            else:
                miss = cold * (scales.get(name, 1.0) if scales else 1.0)
            c = load.get(name, 0.0) - stale.get(name, 0.0) + miss
            if c < best_cost:
                best, best_cost, best_hit = name, c, hit
        return Decision(best, branch, (best,), best_hit, scores={best: best_cost})

    # -- learning -----------------------------------------------------------------------------
    def on_decision(self, req: RoutedRequest, decision: Decision, view: ClusterView, now: float) -> None:
        cfg = self.config
        inst = decision.instance
        self._expire(now)
        leaf = self._insert(req.block_hashes, now)
        node: _Node | None = leaf
        while node is not None:  # update_gpu_allocation_for_parent
            node.alloc[inst] = now
            node.last = now
            node = node.parent
        imp = leaf
        while imp is not self.root and not imp.important():
            imp = imp.parent  # type: ignore[assignment]  (the root ends every path)
        if imp.gid is None:
            imp.gid = self._next_gid
            self._next_gid += 1
            self._group_node[imp.gid] = imp
        hit = min(req.prompt_tokens, view.hit_tokens(inst, req.block_hashes))
        rec = _Rec(now, inst, imp.gid, self._miss_cost(inst, req.prompt_tokens, hit))
        self._window.append(rec)
        self._add(rec)
        self._req_gid[req.request_id] = imp.gid
        self._routed += 1
        if cfg.rebalance:
            self._rebalance(view, now)
        if now - self._last_prune >= cfg.prune_interval_s:
            self._prune(now)

    def on_prefill_done(self, req: RoutedRequest, instance: str, view: ClusterView, now: float) -> None:
        gid = self._req_gid.pop(req.request_id, None)
        if gid is None or (instance, gid) not in self._agg:
            return
        samples = self._ttft.setdefault((gid, instance), deque())
        samples.append((now, now - req.arrival))
        cutoff = now - self.config.window_s
        while samples and samples[0][0] < cutoff:
            samples.popleft()

    def _prune(self, now: float) -> None:
        self._last_prune = now
        fresh = now - self.config.window_s
        stack = [self.root]
        while stack:
            node = stack.pop()
            for key, child in list(node.children.items()):
                if child.last < fresh:
                    del node.children[key]
                    self._drop_subtree(child)
                else:
                    stack.append(child)

    # -- rebalancing (handle_important_node_stealing) -----------------------------------------
    def _overloaded(self, gid: int, inst: str, now: float) -> bool:
        samples = self._ttft.get((gid, inst))
        if not samples:
            return False
        half = now - self.config.window_s / 2
        first = [v for t, v in samples if t < half]
        second = [v for t, v in samples if t >= half]
        if not first or not second:
            return False
        return sum(second) / len(second) >= self.config.replicate_ttft_factor * (sum(first) / len(first))

    def _move(self, gid: int, heavy: str, light: str, now: float) -> None:
        """Reallocate an important node and its subtree to ``light`` and move its history."""
        agg = self._agg.pop((heavy, gid))
        self._ginst[gid].discard(heavy)
        self._inst_groups[heavy].discard(gid)
        two = self._gcount.get(gid, 0) >= 2
        self._load[heavy] -= agg.cost
        if two:
            self._load2[heavy] -= agg.cost
        for rec in agg.recs:
            rec.inst = light
        dst = self._agg.get((light, gid))
        if dst is None:
            dst = self._agg[(light, gid)] = _Agg()
            self._ginst[gid].add(light)
            self._inst_groups.setdefault(light, set()).add(gid)
        dst.cost += agg.cost
        dst.count += agg.count
        dst.recs = deque(sorted([*dst.recs, *agg.recs], key=lambda r: r.time))
        self._load[light] = self._load.get(light, 0.0) + agg.cost
        if two:
            self._load2[light] = self._load2.get(light, 0.0) + agg.cost
        self._ttft.pop((gid, heavy), None)
        stack = [self._group_node[gid]]  # update_children: the whole subtree goes to light
        while stack:
            node = stack.pop()
            node.alloc = {light: now}
            stack.extend(node.children.values())

    def _rebalance(self, view: ClusterView, now: float) -> None:
        cfg = self.config
        snap = self._cache.get(view)
        eligible = snap.eligible_names
        if len(eligible) < 2 or self._routed < cfg.warmup_requests_per_instance * len(eligible):
            return
        order = snap.index
        load2 = self._load2
        light = min(eligible, key=lambda n: (load2.get(n, 0.0), order[n]))
        light_load = load2.get(light, 0.0)
        heavies = sorted(
            (n for n in eligible if n != light and load2.get(n, 0.0) > 0.0),
            key=lambda n: (-load2[n], order[n]),
        )
        fresh = now - cfg.window_s
        thr = cfg.rebalance_threshold
        for heavy in heavies:
            heavy_load = load2[heavy]
            if heavy_load < thr * light_load:
                return
            cands: list[tuple[float, int]] = []
            for gid in self._inst_groups.get(heavy, ()):
                node = self._group_node.get(gid)
                if gid == 0 or node is None or self._gcount.get(gid, 0) <= 1:
                    continue
                if node.alloc.get(heavy, -math.inf) >= fresh:
                    cands.append((self._agg[(heavy, gid)].cost, gid))
            if len(cands) == 1:
                cost, gid = cands[0]
                node = self._group_node[gid]
                if node.alloc.get(light, -math.inf) < fresh and self._overloaded(gid, heavy, now):
                    node.alloc[light] = now  # replicate the hot prefix onto the lightest
                    self._ttft.pop((gid, heavy), None)
                    heavy_load -= cost / 2
                    light_load += cost / 2
            else:
                cands.sort()
                for cost, gid in cands:
                    if heavy_load - cost < light_load + cost:
                        break
                    heavy_load -= cost
                    light_load += cost
                    self._move(gid, heavy, light, now)
                    if heavy_load < thr * light_load:
                        break
