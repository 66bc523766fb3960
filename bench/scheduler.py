"""Scheduler dispatch rate against cluster size: pure bookkeeping, fake nodes, no I/O.

``python bench/scheduler.py`` builds a :class:`Scheduler` with 10, 100, 1,000 and 10,000 fake
nodes (4 processes each), one controller and one map job, then for about ``--seconds`` per size
repeats: the controller sends a chunk (one dispatch), and a node returns a result for the
oldest chunk in flight. It prints dispatches per second for each size. Dispatch cost should not
grow with the number of nodes. Only the public API is used, so the script also runs against
older checkouts (copy it into their ``bench/`` folder) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Any, Deque, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from achilles.core import wire  # noqa: E402
from achilles.server.scheduler import Scheduler  # noqa: E402


class FakePeer:
    """Drops every message; remembers what TASKs it was sent so results can come back."""

    def __init__(self, inflight: Deque[Tuple[Any, str, int]], node: Any = None) -> None:
        self.inflight = inflight
        self.node = node
        self.tasks = 0

    def send(self, code: int, *fields: Any) -> None:
        if code == wire.TASK:
            self.tasks += 1
            self.inflight.append((self.node, fields[0], fields[1]))


def measure(n_nodes: int, seconds: float, processes: int = 4) -> float:
    """Dispatches per second with ``n_nodes`` fake nodes."""
    sched = Scheduler(prefetch=2)
    inflight: Deque[Tuple[Any, str, int]] = collections.deque()
    ctrl = sched.add_controller(FakePeer(collections.deque()), "ctrl:1")
    peers = []
    for i in range(n_nodes):
        peer = FakePeer(inflight)
        peer.node = sched.add_node(peer, f"n{i}", f"10.0.0.{i % 250}:1", processes)
        peers.append(peer)
    sched.submit(ctrl, "job", "f", b"F", b"C", {})
    keep = min(n_nodes * processes, 1000)  # chunks kept in flight
    chunk_id = 0
    for _ in range(keep):
        sched.add_chunk(ctrl, "job", chunk_id, 1, b"x")
        chunk_id += 1
    start_tasks = sum(p.tasks for p in peers)
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            node, job_id, cid = inflight.popleft()
            sched.result(node, job_id, cid, wire.OK, b"r", 0.0)
            sched.add_chunk(ctrl, "job", chunk_id, 1, b"x")
            chunk_id += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    return (sum(p.tasks for p in peers) - start_tasks) / (now - start)


def main() -> None:
    """Print dispatches/s per cluster size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per size (default 1)")
    parser.add_argument("--sizes", default="10,100,1000,10000", help="node counts")
    args = parser.parse_args()
    print(f"{'nodes':>7}  {'dispatches/s':>13}")
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"{size:>7}  {measure(size, args.seconds):>13,.0f}", flush=True)


if __name__ == "__main__":
    main()
