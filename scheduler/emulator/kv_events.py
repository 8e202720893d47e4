"""vLLM's KV-event publisher, emulated, byte-compatible with vLLM 0.32.

``KVEventPublisher`` speaks vLLM's ZmqEventPublisher protocol: multipart ``[topic, seq(8B BE),
msgpack(KVEventBatch)]`` on a PUB-compatible socket (XPUB, so a test can wait until a subscriber
is really subscribed instead of sleeping), plus the ROUTER replay protocol (``[b"", start(8B)]``
in; ``[b"", topic, seq, payload]`` per buffered batch, then ``[b"", b"", -1(8B), b""]``).
It can hide batches from the live stream (``drop_next``: a gap a replay can repair), lose them
outright (``skip_seq``), restart numbering like a new engine process (``restart``) and refuse
replays (``replay_ok = False``).

Events are encoded with vLLM's own structs when ``use_vllm=True`` (or when vllm is already
imported), otherwise with the identical msgspec definitions below: importing vllm costs tens of
seconds, and tests/test_kv_events.py checks that both encodings are byte-for-byte equal.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import msgspec
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


# -- identical copies of vllm/distributed/kv_events.py (0.32) wire structs ----------------------
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def wire_structs(use_vllm: bool | None = None) -> SimpleNamespace:
    """The struct classes to encode with: vLLM's own, or the identical copies above."""
    if use_vllm is None:
        use_vllm = "vllm" in sys.modules  # only if its import cost is already paid
    if use_vllm:
        from vllm.distributed import kv_events as m  # heavy and optional: imported on demand

        return SimpleNamespace(KVEventBatch=m.KVEventBatch, BlockStored=m.BlockStored,
                               BlockRemoved=m.BlockRemoved, AllBlocksCleared=m.AllBlocksCleared, vllm=True)
    return SimpleNamespace(KVEventBatch=KVEventBatch, BlockStored=BlockStored,
                           BlockRemoved=BlockRemoved, AllBlocksCleared=AllBlocksCleared, vllm=False)


class KVEventEncoder:
    """Builds vLLM events with a plain request's defaults and encodes batches (no sockets)."""

    def __init__(self, use_vllm: bool | None = None, data_parallel_rank: int = 0) -> None:
        self.structs = wire_structs(use_vllm)
        self.data_parallel_rank = data_parallel_rank
        self._encoder = msgspec.msgpack.Encoder()

    def stored(self, block_hashes: Sequence[bytes | int], parent: bytes | int | None,
               token_ids: Sequence[int], block_size: int, **fields: Any) -> Any:
        """A BlockStored with the defaults a plain vLLM request has (GPU, group 0, no LoRA)."""
        kw: dict[str, Any] = {"lora_id": None, "medium": "GPU", "lora_name": None,
                              "extra_keys": [None] * len(block_hashes), "group_idx": 0,
                              "kv_cache_spec_kind": "full_attention", **fields}
        return self.structs.BlockStored(block_hashes=list(block_hashes), parent_block_hash=parent,
                                        token_ids=list(token_ids), block_size=block_size, **kw)

    def removed(self, block_hashes: Sequence[bytes | int], **fields: Any) -> Any:
        kw: dict[str, Any] = {"medium": "GPU", "group_idx": 0, **fields}
        return self.structs.BlockRemoved(block_hashes=list(block_hashes), **kw)

    def cleared(self) -> Any:
        return self.structs.AllBlocksCleared()

    def encode(self, events: Sequence[Any], ts: float | None = None) -> bytes:
        batch = self.structs.KVEventBatch(ts=time.time() if ts is None else ts, events=list(events),
                                          data_parallel_rank=self.data_parallel_rank)
        return self._encoder.encode(batch)


class KVEventPublisher(KVEventEncoder):
    """Publishes KV event batches exactly as vLLM's ZmqEventPublisher does (see module doc)."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:*",
        replay_endpoint: str | None = None,
        topic: str = "kv-events",
        *,
        connect: bool = False,
        buffer_steps: int = 10_000,
        data_parallel_rank: int = 0,
        use_vllm: bool | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        super().__init__(use_vllm, data_parallel_rank)
        self.topic = topic.encode()
        self.buffer_steps = buffer_steps
        self.replay_ok = True
        self.replay_requests: list[int] = []
        self.sent: list[tuple[int, bytes]] = []  # what went out live, for assertions
        self.subscriptions: list[bytes] = []  # XPUB (un)subscribe messages seen by wait_subscribed
        self._ctx = context or zmq.Context.instance()
        self._seq = 0
        self._hide = 0
        self._buffer: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        if connect:
            self._pub.connect(endpoint)
            self.endpoint = endpoint
        else:
            self._pub.bind(endpoint)
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if replay_endpoint is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._thread = threading.Thread(target=self._serve_replay, args=(router,), daemon=True)
            self._thread.start()

    # -- sending --------------------------------------------------------------------------------
    def publish(self, events: Sequence[Any], ts: float | None = None) -> int:
        """Send one batch (buffered for replay); returns its seq."""
        return self.publish_payload(self.encode(events, ts))

    def publish_payload(self, payload: bytes) -> int:
        seq = self._seq
        self._seq += 1
        with self._lock:
            self._buffer.append((seq, payload))
            del self._buffer[: max(0, len(self._buffer) - self.buffer_steps)]
        if self._hide > 0:
            self._hide -= 1
        else:
            self.send_raw([self.topic, seq.to_bytes(8, "big"), payload])
            self.sent.append((seq, payload))
        return seq

    def send_raw(self, frames: Sequence[bytes]) -> None:
        self._pub.send_multipart(list(frames))

    def drop_next(self, n: int = 1) -> None:
        """The next ``n`` batches are published (and replayable) but never reach subscribers."""
        self._hide += n

    def skip_seq(self, n: int = 1) -> None:
        """Burn ``n`` sequence numbers: lost for good, not even in the replay buffer."""
        self._seq += n

    def restart(self, start_seq: int = 0) -> None:
        """Like a new engine process on the same endpoint: numbering restarts, buffer empty."""
        self._seq = start_seq
        self._hide = 0
        with self._lock:
            self._buffer.clear()

    @property
    def next_seq(self) -> int:
        return self._seq

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Block until a subscriber's subscription reached us (XPUB reports it)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self._pub.poll(int(left * 1000)):
            msg = self._pub.recv()
            self.subscriptions.append(msg)
            if msg[:1] == b"\x01":
                return True
        return False

    # -- replay ---------------------------------------------------------------------------------
    def _serve_replay(self, router: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not router.poll(50):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3 or not self.replay_ok:
                    continue  # vLLM logs and ignores a malformed request; "not ok" plays dead
                client, _, start_b = frames
                start = int.from_bytes(start_b, "big")
                self.replay_requests.append(start)
                with self._lock:
                    todo = [(s, p) for s, p in self._buffer if s >= start]
                for seq, payload in todo:
                    router.send_multipart([client, b"", self.topic, seq.to_bytes(8, "big"), payload])
                router.send_multipart([client, b"", b"", END_SEQ, b""])
        finally:
            router.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._pub.close(linger=0)

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
