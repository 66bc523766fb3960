"""Slows down addresses that keep failing the handshake (password guessing, floods).

Each failed or abandoned handshake is remembered per address for :data:`WINDOW` seconds. Past
:data:`FREE_FAILURES` failures, that address waits before the server says HELLO: the delay
doubles with each further failure up to :data:`MAX_DELAY`. Connections that are already
authenticated, and other addresses, are not affected.
"""

from __future__ import annotations

import collections
from typing import Deque, Dict

WINDOW = 60.0
FREE_FAILURES = 10
BASE_DELAY = 0.05
MAX_DELAY = 5.0
MAX_ADDRESSES = 10_000


class HandshakeGuard:
    """Failure memory per address, with the delay each address must wait."""

    def __init__(self) -> None:
        self._failures: Dict[str, Deque[float]] = {}

    def _recent(self, address: str, now: float) -> Deque[float]:
        times = self._failures.get(address)
        if times is None:
            return collections.deque()
        while times and now - times[0] > WINDOW:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def record_failure(self, address: str, now: float) -> None:
        """Remember a failed or abandoned handshake from ``address``."""
        if address not in self._failures and len(self._failures) >= MAX_ADDRESSES:
            oldest = min(self._failures, key=lambda a: self._failures[a][-1])
            del self._failures[oldest]
        times = self._failures.setdefault(address, collections.deque())
        times.append(now)
        if len(times) > 4 * FREE_FAILURES:
            times.popleft()

    def delay(self, address: str, now: float) -> float:
        """Seconds ``address`` must wait for its HELLO (0 for well-behaved addresses)."""
        excess = len(self._recent(address, now)) - FREE_FAILURES
        if excess < 0:
            return 0.0
        return min(MAX_DELAY, BASE_DELAY * (2 ** min(excess, 16)))
