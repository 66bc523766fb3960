"""Where a call's CPU goes: per process and per thread, on Pool and on Achilles.

``python bench/percall.py`` runs the same work on ``multiprocessing.Pool(2)`` and on
``achilles.LocalCluster(nodes=1, processes=2)`` and prints, besides each side's p50, the CPU
time every process and thread spent per call, read from the kernel's per-thread run-time
counters (``/proc/PID/task/TID/schedstat``, nanoseconds: user and system time, including what
a thread burns waking up and handing the interpreter lock to another). Shapes:

- ``single``: one-item calls (``Pool.apply``; a one-item ``map``, W5's shape), CPU per call;
- ``dispatch``: ``map`` of 2,000 items at chunksize 1 (D1's shape), CPU per item.

A process's line splits its main thread from its other threads: in Achilles' controller the
main thread is the caller and the other one its reactor; in the server the main thread is the
reactor; in the node the main thread is the reactor and the others supervise one worker
process each. Every row runs once per round, in an order that rotates; figures are the medians
over the rounds. The counters cover everything the processes did meanwhile (heartbeats,
timers), which is little beside thousands of calls a second.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = ("single", "dispatch")
DISPATCH_ITEMS = 2000


def _children(pid: int) -> List[int]:
    """The PIDs whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def achilles_roles() -> Dict[int, str]:
    """This process and its descendants, each named by its role in a ``LocalCluster``."""
    me = os.getpid()
    roles = {me: "controller"}
    todo = [me]
    while todo:
        parent = todo.pop()
        for pid in _children(parent):
            cmd = _cmdline(pid)
            if b"achilles.server\0" in cmd:
                roles[pid] = "server"
            elif b"achilles.node\0" in cmd:
                roles[pid] = "node"
            elif b"forkserver" in cmd and roles.get(parent) == "helpers":
                roles[pid] = "workers"  # forked by the forkserver: the node's workers
            else:
                roles[pid] = "helpers"  # forkserver, resource tracker
            todo.append(pid)
    return roles


def pool_roles() -> Dict[int, str]:
    """This process (the caller, with Pool's handler threads) and its pool's workers."""
    me = os.getpid()
    return {me: "caller", **{pid: "workers" for pid in _children(me)}}


def thread_times(roles: Dict[int, str]) -> Dict[Tuple[int, int], int]:
    """``(pid, tid) -> ns`` the thread has run, for every thread of the given processes."""
    out = {}
    for pid in roles:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    out[(pid, int(tid))] = int(fh.read().split()[0])
            except OSError:
                pass
    return out


def split(roles: Dict[int, str], before: Dict[Tuple[int, int], int],
          after: Dict[Tuple[int, int], int], per: int) -> Dict[str, List[float]]:
    """µs per call by role: ``[total, main thread, other threads, how many others]``."""
    out: Dict[str, List[float]] = {}
    for (pid, tid), ns in after.items():
        spent = (ns - before.get((pid, tid), 0)) / per / 1e3
        row = out.setdefault(roles[pid], [0.0, 0.0, 0.0, 0])
        row[0] += spent
        if tid == pid:
            row[1] += spent
        else:
            row[2] += spent
            row[3] += 1
    return out


def measure(call: Callable[[int], Any], roles: Callable[[], Dict[int, str]], calls: int,
            warmup: int, per_call: int) -> Tuple[float, Dict[str, List[float]]]:
    """p50 seconds of ``call`` and the CPU of ``roles``' threads per unit of work."""
    for i in range(warmup):
        call(i)
    named = roles()
    before = thread_times(named)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    after = thread_times(named)
    return statistics.median(times), split(named, before, after, calls * per_call)


def pool_run(shape: str, calls: int, warmup: int) -> Tuple[float, Dict[str, List[float]]]:
    """The shape on ``multiprocessing.Pool(2)``."""
    from bench.run import square

    with multiprocessing.Pool(2) as pool:
        if shape == "single":
            return measure(lambda i: pool.apply(square, (i,)), pool_roles, calls, warmup, 1)
        items = range(DISPATCH_ITEMS)
        return measure(lambda i: pool.map(square, items, chunksize=1), pool_roles,
                       max(1, calls // 100), max(1, warmup // 100), DISPATCH_ITEMS)


def achilles_run(shape: str, calls: int, warmup: int) -> Tuple[float, Dict[str, List[float]]]:
    """The shape on ``achilles.LocalCluster(nodes=1, processes=2)``."""
    import achilles
    from bench.run import square

    with achilles.LocalCluster(nodes=1, processes=2) as cluster:
        if shape == "single":
            return measure(lambda i: cluster.map(square, [i]), achilles_roles, calls, warmup, 1)
        items = range(DISPATCH_ITEMS)
        return measure(lambda i: cluster.map(square, items, chunksize=1), achilles_roles,
                       max(1, calls // 100), max(1, warmup // 100), DISPATCH_ITEMS)


ROLE_ORDER = ("caller", "controller", "server", "node", "workers", "helpers")


def report(label: str, p50s: List[float], splits: List[Dict[str, List[float]]],
           unit: str) -> str:
    """One line: the median p50, total CPU per unit and each role's share (medians)."""
    roles = [r for r in ROLE_ORDER if any(r in s for s in splits)]
    med = {r: [statistics.median(s.get(r, [0.0, 0.0, 0.0, 0])[k] for s in splits)
               for k in range(4)] for r in roles}
    total = statistics.median(sum(v[0] for v in s.values()) for s in splits)
    parts = []
    for r in roles:
        whole, main, others, count = med[r]
        if count and r not in ("workers", "helpers"):
            parts.append(f"{r} {whole:.0f} (main {main:.0f}, {int(count)} other "
                         f"thread{'s' if count > 1 else ''} {others:.0f})")
        else:
            parts.append(f"{r} {whole:.0f}")
    what = "call" if unit == "call" else "map"
    return (f"{label:18s} p50 {statistics.median(p50s) * 1e3:7.3f} ms per {what}, CPU per "
            f"{unit} {total:5.0f} us: " + ", ".join(parts))


def main(argv: List[str]) -> int:
    """Measure each shape on Pool and Achilles; print one line per side."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES + ("all",), default="all", help="(all)")
    p.add_argument("--calls", type=int, default=2000,
                   help="timed one-item calls per row and round; dispatch maps a hundredth "
                        "as many (2000)")
    p.add_argument("--warmup", type=int, default=300, help="untimed calls first (300)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    args = p.parse_args(argv)
    shapes = SHAPES if args.shape == "all" else (args.shape,)
    for shape in shapes:
        rows: List[Tuple[str, Callable[..., Tuple[float, Dict[str, List[float]]]]]] = [
            ("Pool(2)", pool_run), ("Achilles", achilles_run)]
        got: Dict[str, List[Tuple[float, Dict[str, List[float]]]]] = {r: [] for r, _ in rows}
        for r in range(args.rounds):
            for label, run in rows[r % 2:] + rows[:r % 2]:
                got[label].append(run(shape, args.calls, args.warmup))
        unit = "call" if shape == "single" else "item"
        for label, _ in rows:
            print(report(f"{shape} {label}", [g[0] for g in got[label]],
                         [g[1] for g in got[label]], unit))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
