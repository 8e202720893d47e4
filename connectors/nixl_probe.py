"""Raw NIXL throughput between two processes with DRAM buffers: the yardstick for a migration.

A *holder* process registers a buffer filled with a known pattern (it plays the source prefill
server, whose KV blocks are read) and a *reader* process pulls it with NIXL READs, as vLLM's
NixlConnector does on the target. The reader times post -> DONE for each transfer (the handle is
prepared once, like vLLM's prepped descriptor lists) and checks the bytes it got. Both run as
separate spawned processes so neither shares the benchmark's interpreter, and each can be pinned
to the CPU of the server it stands for; the parent only exchanges metadata over pipes.

``descriptors`` splits each transfer into that many equal descriptors: vLLM reads one descriptor
per layer for a run of contiguous blocks (``vllm:nixl_num_descriptors`` shows it), so passing the
model's layer count makes the raw number comparable with the engine's.

Needs the ``nixl`` package (vllm-cpu extra); importing this module does not import it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

_PATTERN_MOD = 251  # prime, so a shifted or truncated copy cannot match by accident


@dataclass(frozen=True, slots=True)
class ProbeResult:
    size_bytes: int
    descriptors: int
    reps: int
    median_seconds: float
    min_seconds: float
    verified: bool  # the reader's buffer equals the holder's pattern after the transfers

    @property
    def mb_per_s(self) -> float:
        """Throughput at the median time, in MB/s (10^6 bytes)."""
        return self.size_bytes / self.median_seconds / 1e6 if self.median_seconds > 0 else 0.0


class ProbeError(RuntimeError):
    """The probe could not run (nixl missing, a child died, a transfer failed)."""


def _pin(cpus: Sequence[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))


def _agent(name: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def _split(addr: int, size: int, parts: int) -> list[tuple[int, int, int]]:
    """``parts`` equal (address, length, device) descriptors covering [addr, addr + size)."""
    step = size // parts
    return [(addr + i * step, step if i < parts - 1 else size - i * step, 0) for i in range(parts)]


def _holder(conn: Connection, max_size: int, cpus: Sequence[int] | None) -> None:
    import numpy as np

    try:
        _pin(cpus)
        agent = _agent("dualmap-probe-holder")
        buf = (np.arange(max_size, dtype=np.int64) % _PATTERN_MOD).astype(np.uint8)
        addr = buf.ctypes.data
        reg = agent.register_memory([(addr, max_size, 0, "")], "DRAM")
        conn.send(("ready", agent.get_agent_metadata(), addr))
        while True:
            msg = conn.recv()  # ("descs", size, parts) or ("stop",)
            if msg[0] == "stop":
                break
            _, size, parts = msg
            descs = agent.get_xfer_descs(_split(addr, size, parts), "DRAM")
            conn.send(("descs", agent.get_serialized_descs(descs)))
        agent.deregister_memory(reg)
        conn.send(("bye",))
    except Exception as exc:  # report to the parent instead of dying silently
        conn.send(("error", f"holder: {type(exc).__name__}: {exc}"))


def _reader(
    conn: Connection,
    holder_meta: bytes,
    sizes: Sequence[int],
    reps: int,
    parts: int,
    cpus: Sequence[int] | None,
    timeout: float,
) -> None:
    import numpy as np

    try:
        _pin(cpus)
        agent = _agent("dualmap-probe-reader")
        max_size = max(sizes)
        buf = np.zeros(max_size, dtype=np.uint8)
        addr = buf.ctypes.data
        reg = agent.register_memory([(addr, max_size, 0, "")], "DRAM")
        remote = agent.add_remote_agent(holder_meta)
        results = []
        for size in sizes:
            conn.send(("need_descs", size, parts))
            remote_descs = agent.deserialize_descs(conn.recv())
            local_descs = agent.get_xfer_descs(_split(addr, size, parts), "DRAM")
            buf[:size] = 0
            handle = agent.initialize_xfer("READ", local_descs, remote_descs, remote)
            times = []
            for i in range(reps + 1):  # the first transfer also sets up the UCX endpoint
                t0 = time.perf_counter()
                state = agent.transfer(handle)
                while state == "PROC":
                    if time.perf_counter() - t0 > timeout:
                        raise ProbeError(f"transfer of {size} bytes not done after {timeout} s")
                    state = agent.check_xfer_state(handle)
                if state != "DONE":
                    raise ProbeError(f"transfer of {size} bytes failed (state {state})")
                if i:
                    times.append(time.perf_counter() - t0)
            expected = (np.arange(size, dtype=np.int64) % _PATTERN_MOD).astype(np.uint8)
            verified = bool(np.array_equal(buf[:size], expected))
            agent.release_xfer_handle(handle)
            results.append((size, statistics.median(times), min(times), verified))
        agent.remove_remote_agent(remote)
        agent.deregister_memory(reg)
        conn.send(("results", results))
    except Exception as exc:
        conn.send(("error", f"reader: {type(exc).__name__}: {exc}"))


def _expect(conn: Connection, kind: str, timeout: float) -> tuple[Any, ...]:
    if not conn.poll(timeout):
        raise ProbeError(f"no {kind!r} message from a probe process after {timeout:.0f} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise ProbeError(msg[1])
    if msg[0] != kind:
        raise ProbeError(f"probe protocol: expected {kind!r}, got {msg[0]!r}")
    return msg


def probe_throughput(
    sizes: Sequence[int],
    *,
    reps: int = 5,
    descriptors: int = 1,
    holder_cpus: Sequence[int] | None = None,
    reader_cpus: Sequence[int] | None = None,
    timeout: float = 120.0,
) -> list[ProbeResult]:
    """READ throughput of NIXL (UCX) between two fresh processes for each size in ``sizes``."""
    if not sizes or min(sizes) <= 0 or reps < 1 or descriptors < 1:
        raise ValueError("need positive sizes, reps >= 1 and descriptors >= 1")
    if min(sizes) < descriptors:
        raise ValueError("each size must be at least one byte per descriptor")
    ctx = mp.get_context("spawn")  # no fork: the parent may hold threads, sockets, an event loop
    h_parent, h_child = ctx.Pipe()
    r_parent, r_child = ctx.Pipe()
    holder = ctx.Process(target=_holder, args=(h_child, max(sizes), holder_cpus), daemon=True)
    holder.start()
    reader: Any = None
    try:
        _, meta, _ = _expect(h_parent, "ready", timeout)
        reader = ctx.Process(
            target=_reader,
            args=(r_child, meta, list(sizes), reps, descriptors, reader_cpus, timeout),
            daemon=True,
        )
        reader.start()
        while True:  # relay descriptor requests until the reader reports
            if not r_parent.poll(timeout):
                raise ProbeError(f"reader silent for {timeout:.0f} s")
            msg = r_parent.recv()
            if msg[0] == "error":
                raise ProbeError(msg[1])
            if msg[0] == "results":
                results = msg[1]
                break
            h_parent.send(("descs", msg[1], msg[2]))
            r_parent.send(_expect(h_parent, "descs", timeout)[1])
        h_parent.send(("stop",))
        _expect(h_parent, "bye", timeout)
    finally:
        for proc in (reader, holder):
            if proc is None:
                continue
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [
        ProbeResult(size, descriptors, reps, med, low, ok) for size, med, low, ok in results
    ]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Raw NIXL READ throughput between two processes")
    ap.add_argument("sizes", nargs="*", type=int, default=[4 << 20, 16 << 20, 256 << 20])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--descriptors", type=int, default=1)
    args = ap.parse_args(argv)
    print(f"{'bytes':>12} {'descs':>5} {'median ms':>10} {'MB/s':>9} verified")
    for r in probe_throughput(args.sizes, reps=args.reps, descriptors=args.descriptors):
        print(f"{r.size_bytes:>12} {r.descriptors:>5} {r.median_seconds * 1e3:>10.2f} "
              f"{r.mb_per_s:>9.0f} {r.verified}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
