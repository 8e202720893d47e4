"""Process-tree helpers for the launcher: find, signal, pin and de-prioritise a server's threads.

Linux-only (reads /proc). A vLLM server is three processes (API server -> EngineCore -> Worker)
plus a multiprocessing resource tracker; all of them are reached from the API server's pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1

# A thread is taken for NIXL's UCX progress thread when, on an idle server, it burns at least
# this share of a core and spends most of it in the kernel (its loop is ucp_worker_arm ->
# read(eventfd) -> EBUSY -> again). Compute threads are user-time dominated and idle here.
SPIN_MIN_SHARE = 0.15


def _stat_fields(path: str) -> list[str] | None:
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rfind(")") + 2 :].split()


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every live process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(f"/proc/{entry}/stat")) is not None:
            table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def process_tree(root: int) -> list[int]:
    """``root``, its descendants, and anything left in its process group (reparented orphans)."""
    table = _proc_table()
    found = {root} if root in table else set()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.update(pid for pid, (_, pgid) in table.items() if pgid == root)
    return sorted(found)


def tree_threads(root: int) -> list[tuple[int, int]]:
    """(pid, tid) of every thread of every process in ``root``'s tree."""
    threads: list[tuple[int, int]] = []
    for pid in process_tree(root):
        try:
            threads += [(pid, int(t)) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # process exited meanwhile
            continue
    return threads


def set_tree_affinity(root: int, cpus: list[int]) -> int:
    """Pin every thread of every process in ``root``'s tree to ``cpus``; returns threads pinned.

    Per thread, not per process: sched_setaffinity(pid) only changes that one thread, and NIXL
    re-pinned one thread (the worker's main thread) after the others had been created.
    """
    pinned = 0
    for _, tid in tree_threads(root):
        try:
            os.sched_setaffinity(tid, cpus)
            pinned += 1
        except OSError:  # thread exited meanwhile
            pass
    return pinned


def _thread_times(threads: list[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for pid, tid in threads:
        # Not /proc/<tid>/stat: for a non-leader thread that shows the whole process's times.
        fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        if fields is not None:
            out[tid] = (int(fields[11]), int(fields[12]))  # utime, stime (clock ticks)
    return out


def find_spinning_threads(root: int, window: float = 1.0) -> list[int]:
    """Threads of ``root``'s tree that busy-loop in the kernel while the server is idle."""
    threads = tree_threads(root)
    before = _thread_times(threads)
    time.sleep(window)
    after = _thread_times(threads)
    hz = os.sysconf("SC_CLK_TCK")
    spinning = []
    for tid, (u1, s1) in after.items():
        u0, s0 = before.get(tid, (u1, s1))
        share = ((u1 - u0) + (s1 - s0)) / hz / window
        if share >= SPIN_MIN_SHARE and (s1 - s0) > (u1 - u0):
            spinning.append(tid)
    return spinning


SPINNER_POLICIES = ("idle", "nice", "leave")


def deprioritize(tids: list[int], policy: str) -> int:
    """Lower the CPU priority of busy-looping threads; returns how many were changed.

    "idle": SCHED_IDLE (CFS weight 3 vs 1024): the thread runs almost only on idle time. Best
    median prefill/decode latency, but while its core is saturated a NIXL progress thread can
    starve for a second or more, which delays KV-transfer completion.
    "nice": nice 19 (weight 15): about 5x less starvation, at a higher median transfer time.
    "leave": change nothing.
    """
    if policy not in SPINNER_POLICIES:
        raise ValueError(f"spinner policy must be one of {SPINNER_POLICIES}, got {policy!r}")
    if policy == "leave":
        return 0
    done = 0
    for tid in tids:
        try:
            if policy == "idle":
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.setpriority(os.PRIO_PROCESS, tid, 19)  # per thread on Linux
            done += 1
        except OSError:
            pass
    return done


def signal_tree(root: int, sig: signal.Signals) -> None:
    for pid in process_tree(root):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    try:
        os.killpg(root, sig)  # the server is its own group leader (start_new_session)
    except OSError:
        pass


def alive(pid: int) -> bool:
    fields = _stat_fields(f"/proc/{pid}/stat")
    return fields is not None and fields[0] != "Z"  # a zombie is dead, just not reaped yet


def die_with_parent() -> None:
    """preexec hook: SIGTERM the child if the launcher dies without cleaning up (e.g. SIGKILL)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
