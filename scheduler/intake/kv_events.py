"""KV-event intake: keeps one prefill instance's exact block index in the ClusterView.

Wire format (vLLM 0.32 ``vllm/distributed/kv_events.py``): multipart ``[topic, seq(8B BE, from 0
per engine process), msgpack(KVEventBatch)]`` on PUB; a batch is the array ``[ts, events, dp_rank]``
of maps tagged ``"type": BlockStored | BlockRemoved | AllBlocksCleared``. The replay endpoint is a
ROUTER: a DEALER sends ``[b"", start(8B BE)]`` and gets ``[b"", topic, seq, payload]`` per buffered
batch >= start, then ``[b"", b"", -1(8B), b""]``. vLLM's hashes are engine-internal (seeded, int or
bytes), so each BlockStored is re-hashed into our chained xxh3 ids from its tokens and an engine ->
ours map serves BlockRemoved. The structs are mirrored here so the scheduler needs no vLLM import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dualmap_pd.cluster import UNKNOWN_PARENT, ClusterView
from dualmap_pd.hashing import hash_block

logger = logging.getLogger(__name__)

EngineHash = bytes | int
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay socket's end-of-stream marker
StoredCallback = Callable[[str, list[int]], None]  # (instance, our hashes newly indexed)
ResetCallback = Callable[[str, str], None]  # (instance, reason) whenever the index is emptied


class BlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    # Defaults (vLLM has none for these three) so older engines that lack them still decode.
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class _WireBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]  # decoded one by one so an unknown event type skips only itself
    data_parallel_rank: int | None = None


@dataclass
class DecodedBatch:
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    unknown_events: int = 0


_BATCH_DECODER = msgspec.msgpack.Decoder(_WireBatch)  # stateless, built once for speed
_EVENT_DECODER = msgspec.msgpack.Decoder(KVEvent)


def decode_batch(payload: bytes) -> DecodedBatch:
    """Decode one payload frame. Raises msgspec.DecodeError if the batch itself is malformed."""
    wire = _BATCH_DECODER.decode(payload)
    events: list[KVEvent] = []
    for raw in wire.events:
        with contextlib.suppress(msgspec.DecodeError):
            events.append(_EVENT_DECODER.decode(raw))
    return DecodedBatch(wire.ts, events, wire.data_parallel_rank, len(wire.events) - len(events))


class SeqStatus(str, Enum):
    FIRST = "first"  # nothing seen since start/reset: earlier events are simply not ours
    NEXT = "next"
    GAP = "gap"
    RESTART = "restart"  # seq went backwards: a new engine process
    DUPLICATE = "duplicate"  # already applied from a replay answer


@dataclass
class KVEventStats:
    batches: int = 0
    events_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    all_cleared: int = 0
    gaps: int = 0
    lost_batches: int = 0
    resyncs: int = 0  # index dropped because events were (or may have been) lost
    replays: int = 0  # replay answers that covered what was missing
    replay_failures: int = 0
    restarts: int = 0
    disconnects: int = 0
    duplicates: int = 0  # live copies of batches a replay already applied
    unknown_parents: int = 0
    ignored_events: int = 0  # other KV group, foreign block size, unknown event type
    decode_errors: int = 0
    callback_errors: int = 0
    last_seq: int | None = None


@dataclass(slots=True)
class _Entry:
    ours: int | None  # None: no plain-token prompt maps here (LoRA, extra keys, unknown chain)
    parent: EngineHash | None
    media: set[str | None] = field(default_factory=set)  # empty: translation kept, not held


class KVEventSubscriber:
    """Subscribes to one engine's KV events and mirrors its cache into ``view`` for ``instance``.

    A block is indexed once per engine hash whatever the number of physical copies: a BlockRemoved
    of one copy may thus hide another; the index errs towards fewer hits, never phantom ones.
    """

    def __init__(
        self, instance: str, endpoint: str, view: ClusterView, block_size: int,
        replay_endpoint: str | None = None, topic: str = "kv-events", *,
        bind: bool = False,  # True when the engine's endpoint names a host (it connects to us)
        group_idx: int = 0,  # the KV cache group to mirror (a plain decoder model has only 0)
        catch_up: bool = True,  # on a first batch with seq > 0, replay the engine's buffer from 0
        replay_timeout_s: float = 2.0, stale_capacity: int = 1 << 16,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if block_size != view.block_size:  # chained per block: another size never matches
            raise ValueError(f"block_size {block_size} != view.block_size {view.block_size}")
        self.instance, self.endpoint, self.view, self.block_size = instance, endpoint, view, block_size
        self.replay_endpoint, self.topic, self.bind = replay_endpoint, topic, bind
        self.group_idx, self.catch_up, self.replay_timeout_s = group_idx, catch_up, replay_timeout_s
        self.stale_capacity = stale_capacity
        self.stats = KVEventStats()
        self._blocks: dict[EngineHash, _Entry] = {}
        self._refs: dict[int, int] = {}  # our hash -> held engine entries mapping to it
        # Translations kept after a gap: content -> hash is fixed for an engine's lifetime, so a
        # later BlockStored whose parent is here still chains (and proves the parent held).
        self._stale: OrderedDict[EngineHash, _Entry] = OrderedDict()
        self._last_seq: int | None = None
        self._dup_window: tuple[int, int] | None = None
        self._warned: set[str] = set()
        self._stored_cbs: list[StoredCallback] = []
        self._reset_cbs: list[ResetCallback] = []
        self._ctx = context
        self._sub: zmq.asyncio.Socket | None = None
        self._recv_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self.caught_up = asyncio.Event()  # set once the start-up replay (if any) is done

    # -- callbacks --------------------------------------------------------------------------
    def on_stored(self, cb: StoredCallback) -> Callable[[], None]:
        """Call ``cb(instance, hashes)`` when newly stored blocks enter the index; returns unsubscribe."""
        self._stored_cbs.append(cb)
        return lambda: self._stored_cbs.remove(cb)

    def on_reset(self, cb: ResetCallback) -> Callable[[], None]:
        """Call ``cb(instance, reason)`` whenever this instance's index is emptied."""
        self._reset_cbs.append(cb)
        return lambda: self._reset_cbs.remove(cb)

    def _fire(self, cbs: list[Any], arg: Any) -> None:
        for cb in list(cbs):
            try:
                cb(self.instance, arg)
            except Exception:  # a listener's bug must not stop the intake
                self.stats.callback_errors += 1
                logger.exception("kv-events %s: callback failed", self.instance)

    # -- sequence handling (pure) -----------------------------------------------------------
    def classify(self, seq: int) -> SeqStatus:
        last = self._last_seq
        if last is None:
            return SeqStatus.FIRST
        if seq > last:
            return SeqStatus.NEXT if seq == last + 1 else SeqStatus.GAP
        # Live copies of what a replay gave us come from its trigger seq on; anything older
        # than that cannot be a copy, so the numbering restarted: a new engine process.
        w = self._dup_window
        return SeqStatus.DUPLICATE if w is not None and w[0] <= seq <= w[1] else SeqStatus.RESTART

    def apply_batch(self, seq: int, batch: DecodedBatch | bytes) -> SeqStatus:
        """Apply one batch with no replay available: a gap drops the index, a restart resets."""
        status = self.classify(seq)
        if status is SeqStatus.DUPLICATE:
            self.stats.duplicates += 1
            return status
        if status is SeqStatus.GAP:
            self._count_gap(seq)
            self.drop_index(f"lost batches {self._last_seq + 1}..{seq - 1}")  # type: ignore[operator]
        elif status is SeqStatus.RESTART:
            self.stats.restarts += 1
            self.reset(f"engine restarted (seq went back from {self._last_seq} to {seq})")
        self._apply(seq, batch)
        return status

    def apply_replay(self, start: int, batches: list[tuple[int, bytes]]) -> bool:
        """Apply a replay answer for seqs >= ``start``; True if it covered everything missing."""
        complete = bool(batches) and batches[0][0] == start
        if complete:
            self.stats.replays += 1
        else:
            self.stats.replay_failures += 1
            first = batches[0][0] if batches else None
            if self._last_seq is not None:
                self.drop_index(f"replay from seq {start} began at {first}")
        for seq, payload in batches:
            status = self.classify(seq)
            if status is SeqStatus.GAP or status is SeqStatus.NEXT or self._last_seq is None:
                self.apply_batch(seq, payload)  # a hole inside the answer counts as a gap
        return complete

    def _count_gap(self, seq: int) -> None:
        last = -1 if self._last_seq is None else self._last_seq
        self.stats.gaps += 1
        self.stats.lost_batches += seq - last - 1
        logger.warning("kv-events %s: sequence gap: last seq %d, got %d", self.instance, last, seq)

    def drop_index(self, reason: str) -> None:
        """Forget which blocks the engine holds (unknown now) but keep the hash translations."""
        self.stats.resyncs += 1
        for h, e in self._blocks.items():
            e.media.clear()
            self._stale[h] = e
            self._stale.move_to_end(h)
        while len(self._stale) > self.stale_capacity:
            self._stale.popitem(last=False)
        self._forget_held(reason, keep_seq=False)

    def reset(self, reason: str, *, keep_seq: bool = False) -> None:
        """Forget everything about the engine (restart, or the health logic says so)."""
        self._stale.clear()
        self._forget_held(reason, keep_seq=keep_seq)

    def _forget_held(self, reason: str, *, keep_seq: bool) -> None:
        (logger.info if keep_seq else logger.warning)(
            "kv-events %s: index emptied (%d blocks): %s", self.instance, len(self._refs), reason)
        self._blocks.clear()
        self._refs.clear()
        if not keep_seq:  # the stream is no longer trusted: the next batch starts afresh
            self._last_seq = self.stats.last_seq = None
            self._dup_window = None
        self._warned.discard("unknown_parent")
        if self.instance in self.view:
            self.view.clear_blocks(self.instance)
        self._fire(self._reset_cbs, reason)

    # -- event application ------------------------------------------------------------------
    def _apply(self, seq: int, batch: DecodedBatch | bytes) -> None:
        if isinstance(batch, bytes):
            try:
                batch = decode_batch(batch)
            except msgspec.DecodeError:  # its contents are lost: a gap, though seq moves on
                self.stats.decode_errors += 1
                self.drop_index(f"undecodable batch seq {seq}")
                batch = DecodedBatch(0.0, [])
        self._last_seq = self.stats.last_seq = seq
        if self._dup_window is not None and seq > self._dup_window[1]:
            self._dup_window = None
        self.stats.batches += 1
        self.stats.ignored_events += batch.unknown_events
        for ev in batch.events:
            if isinstance(ev, AllBlocksCleared):
                self.stats.all_cleared += 1
                self.reset("AllBlocksCleared", keep_seq=True)  # an event, not a loss
            elif ev.group_idx is not None and ev.group_idx != self.group_idx:
                self.stats.ignored_events += 1
                continue
            elif isinstance(ev, BlockStored):
                self._stored(ev)
            else:
                self._removed(ev)
            self.stats.events_applied += 1
        self._progress.set()

    def _lookup(self, h: EngineHash) -> _Entry | None:
        e = self._blocks.get(h)
        if e is None and (e := self._stale.pop(h, None)) is not None:
            self._blocks[h] = e  # the caller holds it right away
        return e

    def _hold(self, e: _Entry, medium: str | None, new: list[tuple[int, int | None]]) -> None:
        """Mark ``e`` held in ``medium``; a block held nowhere before enters the view."""
        if not e.media and e.ours is not None:
            n = self._refs.get(e.ours, 0)
            self._refs[e.ours] = n + 1
            if n == 0:
                new.append((e.ours, self._parent_ours(e)))
        e.media.add(medium)

    def _parent_ours(self, e: _Entry) -> int | None:
        """Our hash of ``e``'s parent block (None: a prompt's first block), so the view knows
        the chain; UNKNOWN_PARENT if the parent never translated."""
        if e.parent is None:
            return None
        pe = self._blocks.get(e.parent) or self._stale.get(e.parent)
        return pe.ours if pe is not None and pe.ours is not None else UNKNOWN_PARENT

    def _stored(self, ev: BlockStored) -> None:
        bs, n = ev.block_size, len(ev.block_hashes)
        chainable = bs == self.block_size and len(ev.token_ids) == n * bs
        if not chainable:
            self.stats.ignored_events += 1
            self._warn_once("shape", "BlockStored of %d tokens in %d blocks of %d (ours %d): not indexed",
                            len(ev.token_ids), n, bs, self.block_size)
        # LoRA / salted / multimodal KV (and all its descendants) never serves a plain token prompt.
        alien = ev.lora_id is not None or ev.lora_name is not None or not chainable
        new: list[tuple[int, int | None]] = []  # (our hash, our hash of its parent)
        cur: int | None = None
        parent = ev.parent_block_hash
        unchained = False
        if parent is not None:
            pe = self._lookup(parent)
            if pe is None:
                self.stats.unknown_parents += 1
                self._warn_once("unknown_parent", "BlockStored with an unknown parent (stored before we "
                                "subscribed, or lost): not indexed; seq %s", self._last_seq)
            else:
                cur = pe.ours
                self._revive(parent, ev.medium, new)
            unchained = cur is None
        for i, h in enumerate(ev.block_hashes):
            extra = ev.extra_keys[i] if ev.extra_keys and i < len(ev.extra_keys) else None
            unchained = unchained or alien or extra is not None
            ours = None if unchained else hash_block(cur, ev.token_ids[i * bs : (i + 1) * bs])
            e = self._lookup(h)
            if e is None:
                e = self._blocks[h] = _Entry(ours, parent)
            elif e.ours is None and ours is not None:
                if e.media:  # an orphan learns its chain (e.g. a "full" report from block 0)
                    self._refs[ours] = self._refs.get(ours, 0) + 1
                    if self._refs[ours] == 1:
                        new.append((ours, cur))
                e.ours, e.parent = ours, parent
            self._hold(e, ev.medium, new)
            cur, parent, unchained = e.ours, h, e.ours is None
        self.stats.blocks_stored += n
        if new and self.instance in self.view:
            hashes = [h for h, _ in new]
            self.view.add_blocks(self.instance, hashes, [p for _, p in new])
            self._fire(self._stored_cbs, hashes)

    def _revive(self, h: EngineHash | None, medium: str | None, new: list[tuple[int, int | None]]) -> None:
        """A block being stored proves its ancestors are held: re-add any the index lost."""
        while h is not None and (e := self._lookup(h)) is not None and not e.media:
            self._hold(e, medium, new)
            h = e.parent

    def _removed(self, ev: BlockRemoved) -> None:
        gone: list[int] = []
        for h in ev.block_hashes:
            e = self._blocks.get(h)
            if e is None:
                self._stale.pop(h, None)
                continue
            if ev.medium is None:
                e.media.clear()
            else:
                e.media.discard(ev.medium)
            if e.media:  # still held in another tier (e.g. CPU offload)
                continue
            del self._blocks[h]
            if e.ours is not None:
                n = self._refs.pop(e.ours, 1) - 1
                if n > 0:
                    self._refs[e.ours] = n
                else:
                    gone.append(e.ours)
        self.stats.blocks_removed += len(ev.block_hashes)
        if gone and self.instance in self.view:
            self.view.remove_blocks(self.instance, gone)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        # Once per epoch: after a late start every extension of an old prefix would warn.
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(level, "kv-events %s: " + msg, self.instance, *args)

    def engine_hashes(self) -> dict[EngineHash, int | None]:
        """Engine hash -> our hash of every block the index believes held (tests, debugging)."""
        return {h: e.ours for h, e in self._blocks.items() if e.media}

    # -- sockets ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._sub is not None:
            return
        self._ctx = self._ctx or zmq.asyncio.Context.instance()
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100_000)  # as deep as vLLM's send HWM: never drop on our side
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        # pyzmq's default monitor address derives from the socket's fd, which the OS reuses while
        # a closed socket's monitor may still hold it: name ours uniquely.
        monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED, f"inproc://kv-events-monitor-{uuid.uuid4().hex}")
        if self.bind:
            sub.bind(self.endpoint)
            self.endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves a "*" port
        else:
            sub.connect(self.endpoint)
        self._sub = sub
        loop = asyncio.get_running_loop()
        self._recv_task = loop.create_task(self._recv_loop(sub))
        self._monitor_task = loop.create_task(self._monitor_loop(sub, monitor))

    async def stop(self) -> None:
        await _cancel(self._recv_task)
        if self._sub is not None:
            # libzmq's IO thread sends monitor events with a *blocking* send: stop the monitor
            # while its PAIR reader is still open, or a late event (e.g. the disconnect caused by
            # this close) blocks that thread, and with it every socket of the context, for good.
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
        await _cancel(self._monitor_task)  # closes the PAIR reader
        self._recv_task = self._monitor_task = None
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    async def wait_for_seq(self, seq: int, timeout: float = 5.0) -> bool:
        """Wait until a batch with sequence number >= ``seq`` has been applied."""
        return await self.wait_until(lambda: self._last_seq is not None and self._last_seq >= seq, timeout)

    async def wait_until(self, cond: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``cond()`` holds, re-checked after every applied batch."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            self._progress.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)
        return True

    async def catch_up_now(self) -> bool:
        """Rebuild the index from the engine's replay buffer before any live batch arrives (a
        restarted scheduler would otherwise know nothing until the engine next publishes).
        Live batches the answer already covered are then skipped as duplicates."""
        if not (self.catch_up and self.replay_endpoint) or self._last_seq is not None:
            return False
        batches = await self.fetch_replay(0)
        if not batches or self._last_seq is not None:
            return False
        self.apply_replay(0, batches)
        if self._last_seq is not None:
            self._dup_window = (batches[0][0], self._last_seq)
        return True

    async def _recv_loop(self, sub: zmq.asyncio.Socket) -> None:
        topic = self.topic.encode()
        try:
            await self.catch_up_now()
        except Exception:  # the live stream still works (and catches up on its first batch)
            logger.exception("kv-events %s: start-up replay failed", self.instance)
        finally:
            self.caught_up.set()
        while True:
            frames = await sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8 or (topic and frames[0] != topic):
                self.stats.decode_errors += 1
                continue
            try:
                await self.handle_message(int.from_bytes(frames[1], "big"), frames[2])
            except Exception:  # keep the subscription alive whatever one batch does
                logger.exception("kv-events %s: failed to apply a batch", self.instance)

    async def handle_message(self, seq: int, payload: bytes) -> SeqStatus:
        """One live message: repair a gap (or catch up on start) from the replay socket first."""
        status = self.classify(seq)
        start: int | None = None
        if self.replay_endpoint is not None:
            if status is SeqStatus.GAP:
                start = self._last_seq + 1  # type: ignore[operator]
                self._count_gap(seq)
            elif status in (SeqStatus.FIRST, SeqStatus.RESTART) and self.catch_up and seq > 0:
                start = 0  # the engine's replay buffer may still hold everything we missed
                if status is SeqStatus.RESTART:
                    self.stats.restarts += 1
                    self.reset(f"engine restarted (seq went back from {self._last_seq} to {seq})")
        if start is not None:
            batches = await self.fetch_replay(start)
            if batches is not None:
                self.apply_replay(start, batches)
                if self._last_seq is not None and self._last_seq >= seq:
                    self._dup_window = (seq, self._last_seq)
            else:
                self.stats.replay_failures += 1
                if self._last_seq is not None:
                    self.drop_index(f"replay from seq {start} failed")
        return self.apply_batch(seq, payload)

    async def fetch_replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """Ask the engine's replay ROUTER for batches >= ``start``; None on timeout or error."""
        if self.replay_endpoint is None or self._ctx is None:
            return None
        # A fresh DEALER per request: a late answer to an abandoned request cannot leak in.
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replay_timeout_s
        out: list[tuple[int, bytes]] = []
        try:
            sock.connect(self.replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while (left := deadline - loop.time()) > 0 and await sock.poll(int(left * 1000)):
                frames = await sock.recv_multipart()
                if len(frames) != 4 or len(frames[2]) != 8:
                    break
                if frames[2] == END_SEQ:
                    return out
                out.append((int.from_bytes(frames[2], "big"), frames[3]))
            logger.warning("kv-events %s: replay from seq %d timed out or was malformed", self.instance, start)
        except zmq.ZMQError as exc:
            logger.warning("kv-events %s: replay from seq %d failed: %s", self.instance, start, exc)
        finally:
            sock.close(linger=0)
        return None

    async def _monitor_loop(self, sub: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    # The engine may be restarting (new hashes, empty cache) or unreachable: its
                    # cache is unknown either way; the next batch resyncs (catch-up replay).
                    self.stats.disconnects += 1
                    if self._last_seq is not None or self._blocks:
                        self.drop_index(f"publisher {self.endpoint} disconnected")
        finally:  # never leave the monitor without its reader (see stop())
            with contextlib.suppress(zmq.ZMQError):
                sub.disable_monitor()
            monitor.close(linger=0)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
