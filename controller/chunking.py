"""Chunk sizes: invisible to the caller, small first for latency, growing to amortize overhead."""

from __future__ import annotations

import math
from typing import Optional

#: A chunk should keep a worker busy about this long once its cost is known.
TARGET_SECONDS = 0.05
MAX_ITEMS = 200_000
GROWTH = 16


class ChunkSizer:
    """Picks the next chunk's size.

    A fixed ``chunksize`` wins. Otherwise the first chunks hold one item (so the first result
    comes back fast) and later ones grow toward :data:`TARGET_SECONDS` of work, measured on the
    workers, never above ``multiprocessing.Pool``'s own size (``len / (4 x processes)``) when
    the input's length is known, so every process gets a share.

    With ``balance`` (``map`` over an input of known length, where only the whole list
    matters), chunks are also at least ``remaining / (2 x processes)`` (guided
    self-scheduling): few large chunks first, shrinking toward the end so the processes finish
    together, with little coordination per item. ``limit`` caps automatic sizes (a job with
    ``maxtasksperchild`` never sends a worker more items in one chunk than it may run).
    """

    def __init__(self, chunksize: Optional[int] = None, total: Optional[int] = None,
                 balance: bool = False, limit: Optional[int] = None) -> None:
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        self.fixed = chunksize
        self.limit = limit  # no automatic chunk above this (maxtasksperchild)
        self.total = total
        self.balance = balance and total is not None
        self.processes = 0
        self.current = 1
        self.issued = 0

    def cap(self) -> int:
        """The largest size allowed now."""
        top = MAX_ITEMS if self.limit is None else max(1, min(MAX_ITEMS, self.limit))
        if self.total is not None and self.processes:
            return max(1, min(top, math.ceil(self.total / (4 * self.processes))))
        return top

    def size(self) -> int:
        """Items in the next chunk (call :meth:`issue` with the number actually sent)."""
        if self.fixed:
            return self.fixed
        size = self.current
        if self.balance and self.processes and self.total is not None:
            remaining = self.total - self.issued
            size = max(size, math.ceil(remaining / (2 * self.processes)))
        return max(1, min(size, self.cap()))

    def issue(self, n_items: int) -> None:
        """Record that a chunk of ``n_items`` was sent."""
        self.issued += n_items

    def observe(self, n_items: int, elapsed: float) -> None:
        """Learn from a finished chunk: ``n_items`` took ``elapsed`` seconds on a worker."""
        if self.fixed or n_items <= 0:
            return
        per_item = elapsed / n_items
        ideal = MAX_ITEMS if per_item <= 0 else TARGET_SECONDS / per_item
        grown = min(ideal, max(self.current, n_items) * GROWTH, self.cap())
        self.current = max(1, int(grown))
