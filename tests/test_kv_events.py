"""KV-event intake: real vLLM frames, exact index maintenance, loss handling, sockets."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dualmap_pd.cluster import ClusterView
from dualmap_pd.hashing import block_hashes
from scheduler.intake.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventSubscriber,
    SeqStatus,
    decode_batch,
)
from tests.fakes import kv_publisher as fk
from tests.fakes.kv_publisher import FakeBlockPool, FakeKVPublisher, KVEventEncoder

FIXTURE = Path(__file__).parent / "fixtures" / "vllm032_kv_events.json"
BS = 128


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def make(bs: int = BS, **kw: Any) -> tuple[ClusterView, KVEventSubscriber]:
    view = ClusterView(bs)
    view.add_instance("p0", "prefill")
    return view, KVEventSubscriber("p0", "tcp://127.0.0.1:1", view, bs, **kw)


@pytest.fixture(scope="module")
def capture() -> dict[str, Any]:
    d = json.loads(FIXTURE.read_text())
    d["raw"] = [[bytes.fromhex(x) for x in f] for f in d["frames"]]
    return d


# -- real bytes ---------------------------------------------------------------------------------
def test_decoder_on_real_frames(capture: dict[str, Any]) -> None:
    kinds = []
    for i, (topic, seq, payload) in enumerate(capture["raw"]):
        assert topic == b"kv-events" and len(seq) == 8 and int.from_bytes(seq, "big") == i
        b = decode_batch(payload)
        assert b.unknown_events == 0 and b.data_parallel_rank == 0 and b.ts > 1.7e9
        kinds.append([type(e).__name__ for e in b.events])
    assert kinds[0] == ["BlockStored"] and kinds[4] == ["BlockRemoved"] * 6 + ["BlockStored"]
    assert kinds[10] == ["AllBlocksCleared", "BlockStored"]
    a = decode_batch(capture["raw"][0][2]).events[0]
    assert isinstance(a, BlockStored) and a.parent_block_hash is None and a.block_size == BS
    assert a.medium == "GPU" and a.group_idx == 0 and a.lora_id is None and a.extra_keys == [None] * 4
    assert all(isinstance(h, int) for h in a.block_hashes)  # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1
    assert a.token_ids == capture["prompts"]["A"][: 4 * BS]
    b1 = decode_batch(capture["raw"][1][2]).events[0]  # B shares A's first 300 tokens: 2 full blocks
    assert isinstance(b1, BlockStored) and b1.parent_block_hash == a.block_hashes[1]


def test_mirror_struct_reencodes_real_payloads_byte_for_byte(capture: dict[str, Any]) -> None:
    for _, _, payload in capture["raw"]:
        obj = msgspec.msgpack.decode(payload, type=fk.KVEventBatch)
        assert msgspec.msgpack.encode(obj) == payload


def test_index_follows_real_engine(capture: dict[str, Any]) -> None:
    view, sub = make()
    p = capture["prompts"]
    bh = {k: block_hashes(v, BS) for k, v in p.items()}
    every = set().union(*bh.values())
    held: set[bytes | int] = set()  # the engine's blocks, from the raw events
    for seq, (_, seq_b, payload) in enumerate(capture["raw"]):
        assert sub.apply_batch(int.from_bytes(seq_b, "big"), payload) in (SeqStatus.FIRST, SeqStatus.NEXT)
        for ev in decode_batch(payload).events:
            if isinstance(ev, BlockStored):
                held.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                held.difference_update(ev.block_hashes)
            else:
                held.clear()
        idx = view["p0"].cached_blocks
        assert idx <= every, f"seq {seq}: a hash that is no prompt prefix"
        assert len(idx) == len(held) and set(sub.engine_hashes()) == held
        if seq == 1:
            assert idx == set(bh["A"][:4]) | set(bh["B"][:4])
            assert view.hit_blocks("p0", bh["B"]) == 4
    assert view["p0"].cached_blocks == set(bh["G"][:2])
    s = sub.stats
    assert (s.gaps, s.resyncs, s.unknown_parents, s.ignored_events, s.all_cleared) == (0, 0, 0, 0, 1)


def test_real_replay_answer(capture: dict[str, Any]) -> None:
    rep = [[bytes.fromhex(x) for x in f] for f in capture["replay"]]
    assert rep[-1] == [b"", b"", END_SEQ, b""]
    start = capture["replay_from"]
    batches = []
    for empty, topic, seq_b, payload in rep[:-1]:
        seq = int.from_bytes(seq_b, "big")
        assert empty == b"" and topic == b"kv-events" and capture["raw"][seq][2] == payload
        batches.append((seq, payload))
    assert [s for s, _ in batches] == list(range(start, 8))
    view_a, a = make()
    view_b, b = make()
    for seq in range(8):
        a.apply_batch(seq, capture["raw"][seq][2])
    b.apply_batch(0, capture["raw"][0][2])
    b.apply_batch(1, capture["raw"][1][2])
    assert b.apply_replay(start, batches)
    assert view_b["p0"].cached_blocks == view_a["p0"].cached_blocks and b.stats.replays == 1


def _sample_events(enc: KVEventEncoder) -> list[Any]:
    return [enc.stored([1, b"\x02" * 32], None, list(range(8)), 4),
            enc.stored([3], 1, [9] * 4, 4, lora_id=3, lora_name="l", medium="CPU", session_id="s"),
            enc.removed([b"\x02" * 32]), enc.cleared()]


@pytest.mark.vllm  # no server, but importing vllm takes 10-30 s
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_fake_encoding_equals_vllm_own_structs() -> None:
    ours, theirs = KVEventEncoder(use_vllm=False), KVEventEncoder(use_vllm=True)  # imports vllm: slow
    assert theirs.structs.vllm and not ours.structs.vllm
    assert ours.encode(_sample_events(ours), ts=1.5) == theirs.encode(_sample_events(theirs), ts=1.5)


# -- index maintenance (pure) -------------------------------------------------------------------
@pytest.mark.parametrize("int_hashes", [True, False])
def test_index_equals_engine_blocks_under_eviction(int_hashes: bool) -> None:
    view, sub = make(bs=4)
    enc = KVEventEncoder()
    pool = FakeBlockPool(block_size=4, capacity_blocks=20, int_hashes=int_hashes)
    rng = random.Random(1)
    prefixes = [[rng.randrange(100) for _ in range(rng.randrange(4, 24))] for _ in range(6)]
    for seq in range(300):
        tokens = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randrange(0, 20))]
        events = pool.run(enc, tokens)
        if seq % 50 == 49:
            events += pool.evict(enc, 3)
        sub.apply_batch(seq, enc.encode(events))
        cached = view["p0"].cached_blocks
        assert cached == pool.expected()
        # The chain the events carry reaches the view: its prefix match (a binary search while
        # the cache has no gaps) agrees with a plain walk.
        for p in prefixes + [tokens]:
            ours = block_hashes(p, 4)
            walk = next((i for i, h in enumerate(ours) if h not in cached), len(ours))
            assert view.hit_blocks("p0", ours) == walk
    assert sub.stats.blocks_removed > 0 and sub.stats.unknown_parents == 0
    assert view["p0"].gap_blocks == 0  # the engine evicts tails first: no gaps, binary search


def test_gap_without_replay_drops_index_then_revives_chain() -> None:
    view, sub = make(bs=4)
    enc, pool = KVEventEncoder(), FakeBlockPool(block_size=4)
    base = list(range(12))
    sub.apply_batch(5, enc.encode(pool.run(enc, base)))  # the first seq is never a gap
    assert len(view["p0"].cached_blocks) == 3 and sub.stats.gaps == 0
    pool.run(enc, [7] * 8)  # lost
    events = pool.run(enc, base + [1] * 4)  # parent = base's block 2 (known translation)
    assert sub.apply_batch(8, enc.encode(events)) is SeqStatus.GAP
    s = sub.stats
    assert (s.gaps, s.lost_batches, s.resyncs, s.unknown_parents) == (1, 2, 1, 0)
    # Storing a child proves its ancestors are held: the whole chain is back, nothing else.
    assert view["p0"].cached_blocks == set(block_hashes(base + [1] * 4, 4))


def test_restart_resets_index() -> None:
    view, sub = make(bs=4)
    enc, pool = KVEventEncoder(), FakeBlockPool(block_size=4)
    for seq in range(3):
        sub.apply_batch(seq, enc.encode(pool.run(enc, [seq] * 8)))
    fresh = FakeBlockPool(block_size=4, seed=b"new process")
    assert sub.apply_batch(0, enc.encode(fresh.run(enc, [9] * 4))) is SeqStatus.RESTART
    assert view["p0"].cached_blocks == fresh.expected() and sub.stats.restarts == 1
    assert sub.apply_batch(1, enc.encode([])) is SeqStatus.NEXT


def test_unknown_parent_counted_and_healed_by_full_report() -> None:
    view, sub = make(bs=4)
    enc, pool = KVEventEncoder(), FakeBlockPool(block_size=4)
    prompt = list(range(16))
    chain = pool.chain(prompt)
    # Blocks 0-1 were stored before we subscribed; we see only the extension.
    sub.apply_batch(7, enc.encode([enc.stored([h for h, _ in chain[2:]], chain[1][0], prompt[8:], 4)]))
    assert sub.stats.unknown_parents == 1 and view["p0"].cached_blocks == set()
    # kv_cache_report_mode="full" re-reports a hit from block 0: the orphans learn their chain.
    sub.apply_batch(8, enc.encode([enc.stored([h for h, _ in chain], None, prompt, 4)]))
    assert view["p0"].cached_blocks == set(block_hashes(prompt, 4))
    sub.apply_batch(9, enc.encode([enc.removed([chain[3][0]])]))
    assert view["p0"].cached_blocks == set(block_hashes(prompt, 4)[:3])


def test_foreign_blocks_and_media() -> None:
    view, sub = make(bs=4)
    enc = KVEventEncoder()
    t = list(range(8))
    ours = block_hashes(t, 4)
    evs = [
        enc.stored([11, 12], None, t, 4, lora_id=1, lora_name="a"),  # LoRA KV never serves base prompts
        enc.stored([13], 12, [5] * 4, 4),  # child of a LoRA block: foreign too, not "unknown"
        enc.stored([21], None, t[:4], 4, extra_keys=[("salt",)]),  # cache_salt
        enc.stored([31], None, t[:4], 4, group_idx=1),  # another KV cache group
        enc.stored([41], None, t[:2], 2),  # a block size that is not ours
        enc.stored([51, 52], None, t, 4),
        enc.stored([51, 52], None, t, 4, medium="CPU"),
    ]
    sub.apply_batch(0, enc.encode(evs))
    assert view["p0"].cached_blocks == set(ours) and sub.stats.unknown_parents == 0
    sub.apply_batch(1, enc.encode([enc.removed([51, 52])]))  # GPU copy gone, CPU copy stays
    assert view["p0"].cached_blocks == set(ours)
    sub.apply_batch(2, enc.encode([enc.removed([52], medium="CPU")]))
    assert view["p0"].cached_blocks == {ours[0]}
    sub.apply_batch(3, enc.encode([enc.cleared()]))
    assert view["p0"].cached_blocks == set() and sub.classify(4) is SeqStatus.NEXT


def test_unknown_event_type_and_garbage() -> None:
    view, sub = make(bs=4)
    enc = KVEventEncoder()
    good = msgspec.msgpack.encode({"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                                   "token_ids": [1, 2, 3, 4], "block_size": 4, "future_field": 1})
    payload = msgspec.msgpack.encode([1.0, [msgspec.Raw(good), {"type": "BlockMoved", "x": 1}]])
    sub.apply_batch(0, payload)
    assert sub.stats.ignored_events == 1 and len(view["p0"].cached_blocks) == 1
    sub.apply_batch(1, b"\xc1garbage")
    assert sub.stats.decode_errors == 1 and view["p0"].cached_blocks == set()
    sub.apply_batch(2, enc.encode([]))
    assert sub.stats.last_seq == 2


def broken(*_: object) -> None:
    raise RuntimeError("listener bug")


def test_callbacks() -> None:
    _, sub = make(bs=4)
    enc = KVEventEncoder()
    got: list[tuple[str, list[int]]] = []
    resets: list[str] = []
    unsub = sub.on_stored(lambda inst, hs: got.append((inst, list(hs))))
    sub.on_reset(lambda inst, why: resets.append(why))
    sub.on_stored(broken)  # a broken listener does not break intake
    sub.apply_batch(0, enc.encode([enc.stored([1, 2], None, list(range(8)), 4)]))
    assert got == [("p0", block_hashes(list(range(8)), 4))] and sub.stats.callback_errors == 1
    sub.apply_batch(1, enc.encode([enc.stored([1], None, list(range(4)), 4)]))  # already held
    unsub()
    sub.apply_batch(2, enc.encode([enc.cleared()]))
    assert len(got) == 1 and resets == ["AllBlocksCleared"]


def test_block_size_must_match_view() -> None:
    with pytest.raises(ValueError):
        KVEventSubscriber("p0", "tcp://127.0.0.1:1", ClusterView(128), 16)


# -- sockets ------------------------------------------------------------------------------------
async def _live(pub: FakeKVPublisher, **kw: Any) -> tuple[ClusterView, KVEventSubscriber]:
    view = ClusterView(4)
    view.add_instance("p0", "prefill")
    sub = KVEventSubscriber("p0", pub.endpoint, view, 4, replay_endpoint=pub.replay_endpoint, **kw)
    await sub.start()
    assert await asyncio.to_thread(pub.wait_subscribed), (pub.endpoint, pub.subscriptions, sub.stats)
    await asyncio.wait_for(sub.caught_up.wait(), 5)  # the start-up replay asks for seq 0 first
    return view, sub


def test_live_stream_and_gap_repaired_by_replay() -> None:
    async def main() -> None:
        with FakeKVPublisher(replay_endpoint="tcp://127.0.0.1:*") as pub:
            view, sub = await _live(pub)
            pool = FakeBlockPool(block_size=4, capacity_blocks=12)
            rng = random.Random(3)
            for phase, drop_at in ((range(0, 20), 10), (range(20, 40), 25)):
                for i in phase:  # wait between phases: one replay must not cover both gaps
                    if i == drop_at:
                        pub.drop_next(3)
                    pub.publish(pool.run(pub, [rng.randrange(5) for _ in range(rng.randrange(4, 20))]))
                assert await sub.wait_for_seq(phase[-1])
            assert view["p0"].cached_blocks == pool.expected()
            s = sub.stats
            assert (s.gaps, s.replays, s.resyncs) == (2, 2, 0) and pub.replay_requests == [0, 10, 25]
            await sub.stop()

    run(main())


@pytest.mark.parametrize("mode", ["no_answer", "lost_for_good", "no_replay_endpoint"])
def test_gap_replay_fails_then_index_dropped(mode: str) -> None:
    async def main() -> None:
        replay = None if mode == "no_replay_endpoint" else "tcp://127.0.0.1:*"
        with FakeKVPublisher(replay_endpoint=replay) as pub:
            view, sub = await _live(pub, replay_timeout_s=0.3)
            enc_pool = FakeBlockPool(block_size=4)
            pub.publish(enc_pool.run(pub, [1] * 8))
            assert await sub.wait_for_seq(0)
            pub.replay_ok = mode != "no_answer"
            if mode == "lost_for_good":
                pub.skip_seq(2)
            else:
                pub.drop_next(2)
            for t in ([2] * 4, [3] * 4, [4] * 4):
                pub.publish(enc_pool.run(pub, t))
            assert await sub.wait_for_seq(pub.next_seq - 1)
            # What was before the gap is unknown now; what came after is exact (a replay that
            # starts late still brings the batches it has).
            after = [[2] * 4, [3] * 4, [4] * 4] if mode == "lost_for_good" else [[4] * 4]
            assert view["p0"].cached_blocks == {block_hashes(t, 4)[0] for t in after}
            assert sub.stats.gaps == 1 and sub.stats.resyncs == 1
            await sub.stop()

    run(main())


def test_catch_up_on_start_and_restart_and_disconnect() -> None:
    async def main() -> None:
        pub = FakeKVPublisher(replay_endpoint="tcp://127.0.0.1:*")
        pool = FakeBlockPool(block_size=4)
        for t in ([1] * 8, [2] * 8, [3] * 4):
            pub.publish(pool.run(pub, t))  # nobody listening: lost live, kept for replay
        view, sub = await _live(pub)
        # A (re)started subscriber rebuilds from the replay buffer before any live batch.
        assert view["p0"].cached_blocks == pool.expected() and sub.stats.last_seq == 2
        pub.publish(pool.run(pub, [1] * 8 + [4] * 4))
        assert await sub.wait_for_seq(3)
        assert view["p0"].cached_blocks == pool.expected() and sub.stats.gaps == 0
        assert pub.replay_requests == [0] and sub.stats.replays == 1
        # A new engine process: numbering restarts, cache empty.
        pub.restart()
        pool = FakeBlockPool(block_size=4, seed=b"second life")
        pub.publish(pool.run(pub, [9] * 4))
        assert await sub.wait_until(lambda: sub.stats.restarts == 1)
        assert view["p0"].cached_blocks == pool.expected() and sub.stats.restarts == 1
        pub.close()
        for _ in range(100):
            if sub.stats.disconnects:
                break
            await asyncio.sleep(0.05)
        assert sub.stats.disconnects == 1 and view["p0"].cached_blocks == set()
        await sub.stop()

    run(main())


def test_subscriber_binds_when_engine_connects() -> None:
    async def main() -> None:
        view = ClusterView(4)
        view.add_instance("p0", "prefill")
        sub = KVEventSubscriber("p0", "tcp://127.0.0.1:*", view, 4, bind=True)
        await sub.start()
        with FakeKVPublisher(sub.endpoint, connect=True) as pub:
            assert await asyncio.to_thread(pub.wait_subscribed)
            pub.publish([pub.stored([5], None, [1, 2, 3, 4], 4)])
            assert await sub.wait_for_seq(0)
        assert view["p0"].cached_blocks == set(block_hashes([1, 2, 3, 4], 4))
        await sub.stop()

    run(main())


def test_bad_frames_are_skipped() -> None:
    async def main() -> None:
        with FakeKVPublisher() as pub:
            view, sub = await _live(pub)
            pub.send_raw([b"kv-events", b"\x00" * 3, b"x"])
            pub.send_raw([b"kv-events", b"\x00" * 8])
            pub.publish([pub.stored([5], None, [1, 2, 3, 4], 4)])
            assert await sub.wait_for_seq(0)
            assert sub.stats.decode_errors == 2 and len(view["p0"].cached_blocks) == 1
            await sub.stop()

    run(main())


def test_events_types_are_exported() -> None:
    assert decode_batch(KVEventEncoder().encode([KVEventEncoder().cleared()])).events == [AllBlocksCleared()]
