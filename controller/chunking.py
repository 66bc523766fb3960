"""Chunk sizes: invisible to the caller, small first for latency, growing to amortize overhead."""

from __future__ import annotations

import collections
import math
import threading
from typing import Hashable, Optional, Tuple

#: A chunk should keep a worker busy about this long once its cost is known.
TARGET_SECONDS = 0.05
MAX_ITEMS = 200_000
GROWTH = 16
#: In a balanced ``map``, once the items' cost is known, no chunk holds less work than this
#: (a chunk costs ~0.1 ms of CPU or more across the roles, whatever it holds).
MIN_CHUNK_SECONDS = 0.001
#: Before the server's first ``WANT`` of a balanced ``map`` says how many processes the
#: cluster has, chunks sized from the count an earlier job saw hold at most this much work
#: by the items' known cost (so a cluster that grew since costs at most this much balance).
EARLY_CHUNK_SECONDS = 0.002
#: Functions whose item cost :class:`ItemCosts` remembers, at most.
MAX_REMEMBERED = 256
#: Timed items :class:`ItemCosts` weighs per function, at most (older ones weigh less then).
MAX_PRIOR_ITEMS = 1_000_000


class ChunkSizer:
    """Picks the next chunk's size.

    A fixed ``chunksize`` wins. Otherwise the first chunks hold one item (so the first result
    comes back fast) and later ones grow toward :data:`TARGET_SECONDS` of work, measured on the
    workers, never above ``multiprocessing.Pool``'s own size (``len / (4 x processes)``) when
    the input's length is known, so every process gets a share.

    With ``balance`` (``map`` over an input of known length, where only the whole list
    matters), chunks are also at least ``remaining / (2 x processes)`` (guided
    self-scheduling): few large chunks first, shrinking toward the end so the processes finish
    together, with little coordination per item. Once the items' cost is known (from this
    job's finished chunks and ``prior``, ``(seconds, items)`` that earlier jobs of the function
    measured, weighing at most as many items as this job has), balanced chunks also hold at
    least :data:`MIN_CHUNK_SECONDS` of work, so the shrinking tail does not end in many chunks
    whose coordination costs more than their work; and when ``len / (2 x processes)`` items
    are less work than that, chunks are that large (two per process instead of Pool's four).
    No floor goes above ``len / (2 x processes)``: a wrong estimate gives at worst two chunks
    per process. ``limit`` caps automatic sizes (a job with ``maxtasksperchild`` never sends a
    worker more items in one chunk than it may run).

    Until the server says how many processes there are (:attr:`processes`, from its first
    ``WANT``), a balanced job whose items' cost is known sizes its chunks as if there were
    ``early_processes`` (what an earlier job on the same ``Cluster`` was told), each holding
    at most :data:`EARLY_CHUNK_SECONDS` of work: the chunks sent on the initial credit then
    keep the workers busy while that ``WANT`` is on its way, instead of holding one item.
    """

    def __init__(self, chunksize: Optional[int] = None, total: Optional[int] = None,
                 balance: bool = False, limit: Optional[int] = None,
                 prior: Optional[Tuple[float, int]] = None, early_processes: int = 0) -> None:
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        self.fixed = chunksize
        self.limit = limit  # no automatic chunk above this (maxtasksperchild)
        self.total = total
        self.balance = balance and total is not None
        self.processes = 0
        self.early_processes = max(0, early_processes)
        self.current = 1
        self.issued = 0
        self.prior = prior if prior is not None and prior[1] > 0 else (0.0, 0)
        if total and self.prior[1] > total:  # earlier jobs weigh no more than this one's items
            self.prior = (self.prior[0] * total / self.prior[1], total)
        #: Worker seconds and items of this job's finished chunks.
        self.timed = (0.0, 0)

    def cap(self) -> int:
        """The largest size allowed now."""
        return self._cap(self.processes)

    def _cap(self, processes: int) -> int:
        top = MAX_ITEMS if self.limit is None else max(1, min(MAX_ITEMS, self.limit))
        if self.total is not None and processes:
            share = math.ceil(self.total / (4 * processes))
            if self.balance:  # chunks of at most MIN_CHUNK_SECONDS of work: two per process
                share = max(share, min(math.ceil(self.total / (2 * processes)), self.floor()))
            return max(1, min(top, share))
        return top

    def size(self) -> int:
        """Items in the next chunk (call :meth:`issue` with the number actually sent)."""
        if self.fixed:
            return self.fixed
        processes, bound = self.processes, MAX_ITEMS
        if not processes and self.balance and self.early_processes:
            per_item = self.per_item()
            if per_item is not None:
                processes = self.early_processes
                if per_item > 0:
                    bound = max(1, int(EARLY_CHUNK_SECONDS / per_item))
        size = self.current
        if self.balance and processes and self.total is not None:
            remaining = self.total - self.issued
            size = max(size, math.ceil(remaining / (2 * processes)), self.floor())
        return max(1, min(size, self._cap(processes), bound))

    def per_item(self) -> Optional[float]:
        """Worker seconds per item over this job's finished chunks and the prior, if any."""
        seconds, items = self.timed[0] + self.prior[0], self.timed[1] + self.prior[1]
        return seconds / items if items else None

    def floor(self) -> int:
        """Items in :data:`MIN_CHUNK_SECONDS` of work (1 while the cost is unknown)."""
        per_item = self.per_item()
        if per_item is None:
            return 1
        return MAX_ITEMS if per_item <= 0 else max(1, math.ceil(MIN_CHUNK_SECONDS / per_item))

    def issue(self, n_items: int) -> None:
        """Record that a chunk of ``n_items`` was sent."""
        self.issued += n_items

    def observe(self, n_items: int, elapsed: float) -> None:
        """Learn from a finished chunk: ``n_items`` took ``elapsed`` seconds on a worker."""
        if self.fixed or n_items <= 0:
            return
        self.timed = (self.timed[0] + max(0.0, elapsed), self.timed[1] + n_items)
        per_item = elapsed / n_items
        ideal = MAX_ITEMS if per_item <= 0 else TARGET_SECONDS / per_item
        grown = min(ideal, max(self.current, n_items) * GROWTH, self.cap())
        self.current = max(1, int(grown))


class ItemCosts:
    """What items of each function cost on the workers in this Cluster's jobs
    (``(seconds, items)``), for :class:`ChunkSizer`'s ``prior``: one per ``Cluster``, safe
    from any thread, the :data:`MAX_REMEMBERED` functions used last."""

    def __init__(self, max_entries: int = MAX_REMEMBERED) -> None:
        self.max_entries = max_entries
        self._costs: "collections.OrderedDict[Hashable, Tuple[float, int]]" = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[Tuple[float, int]]:
        """The last ``(seconds, items)`` kept for ``key``, or None."""
        with self._lock:
            cost = self._costs.get(key)
            if cost is not None:
                self._costs.move_to_end(key)
            return cost

    def put(self, key: Hashable, seconds: float, items: int) -> None:
        """Add a job's measured cost to what is kept (weighted by items, so a one-item job
        barely moves the figure of a large one; the oldest weigh less once more than
        :data:`MAX_PRIOR_ITEMS` items were timed)."""
        if items <= 0:
            return
        with self._lock:
            old_seconds, old_items = self._costs.get(key, (0.0, 0))
            seconds, items = old_seconds + seconds, old_items + items
            if items > MAX_PRIOR_ITEMS:
                seconds, items = seconds * MAX_PRIOR_ITEMS / items, MAX_PRIOR_ITEMS
            self._costs[key] = (seconds, items)
            self._costs.move_to_end(key)
            while len(self._costs) > self.max_entries:
                self._costs.popitem(last=False)
