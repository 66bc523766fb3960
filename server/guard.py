"""Pre-auth defences of the server: per-source connection caps and a failure memory.

Everything is keyed by *source* (:func:`source_key`): an IPv4 address, or the /64 network of
an IPv6 address (one host usually owns a whole /64, so its addresses are one source).

- :class:`PreauthLimiter` caps the connections that have not finished the handshake, in total
  and per source; the server refuses (aborts at connect) anything beyond. This is the main
  defence: an idle or flooding source uses its own share and nobody else's.
- :class:`HandshakeGuard` remembers failed or abandoned handshakes per source for
  :data:`WINDOW` seconds. Past :data:`FREE_FAILURES` failures, new connections from that source
  wait before the server says HELLO: the delay doubles with each further failure up to
  :data:`MAX_DELAY`, kept short because legitimate clients behind the same address (NAT,
  loopback) wait too. Authenticated connections and other sources are not affected.
- :class:`LogThrottle` keeps a flood from flooding the log.
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Deque, Dict, Optional

from achilles.core.config import DEFAULT_MAX_PREAUTH, DEFAULT_MAX_PREAUTH_PER_SOURCE

WINDOW = 60.0
FREE_FAILURES = 10
BASE_DELAY = 0.05
MAX_DELAY = 0.5
MAX_ADDRESSES = 10_000
IPV6_PREFIX = 64


def source_key(host: str) -> str:
    """The source a peer address counts as: the IPv4 address itself (also when written as an
    IPv4-mapped IPv6 address), the ``/64`` of an IPv6 address, or ``host`` unchanged when it
    is not an IP address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class HandshakeGuard:
    """Failure memory per source, with the delay each source must wait.

    At most ``max_sources`` sources are remembered; past that, the one that failed least
    recently is forgotten (LRU, O(1)).
    """

    def __init__(self, max_sources: int = MAX_ADDRESSES) -> None:
        self.max_sources = max_sources
        self._failures: "collections.OrderedDict[str, Deque[float]]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failures(self, address: str, now: float) -> int:
        """Failures of ``address``'s source within the last :data:`WINDOW` seconds."""
        return self._recent(source_key(address), now)

    def _recent(self, key: str, now: float) -> int:
        times = self._failures.get(key)
        if times is None:
            return 0
        while times and now - times[0] > WINDOW:
            times.popleft()
        if not times:
            del self._failures[key]
        return len(times)

    def record_failure(self, address: str, now: float) -> None:
        """Remember a failed or abandoned handshake from ``address``."""
        key = source_key(address)
        times = self._failures.get(key)
        if times is None:
            if len(self._failures) >= self.max_sources:
                self._failures.popitem(last=False)
            times = self._failures[key] = collections.deque(maxlen=4 * FREE_FAILURES)
        else:
            self._failures.move_to_end(key)
        times.append(now)

    def delay(self, address: str, now: float) -> float:
        """Seconds ``address`` must wait for its HELLO (0 for well-behaved sources)."""
        excess = self.failures(address, now) - FREE_FAILURES
        if excess < 0:
            return 0.0
        return min(MAX_DELAY, BASE_DELAY * (2 ** min(excess, 16)))


class PreauthLimiter:
    """Counts connections that have not finished the handshake, in total and per source."""

    def __init__(self, total: int = DEFAULT_MAX_PREAUTH,
                 per_source: int = DEFAULT_MAX_PREAUTH_PER_SOURCE) -> None:
        self.total = total
        self.per_source = per_source
        self.count = 0
        self._by_source: Dict[str, int] = {}

    def held_by(self, key: str) -> int:
        """Pre-auth connections currently open from source ``key``."""
        return self._by_source.get(key, 0)

    def admit(self, key: str) -> Optional[str]:
        """Count a new connection from source ``key``; or, when a cap is reached, count
        nothing and return why it must be refused."""
        held = self._by_source.get(key, 0)
        if held >= self.per_source:
            return (f"{held} connections from {key} are already in the handshake (cap "
                    f"ACHILLES_MAX_PREAUTH_PER_SOURCE={self.per_source}; raise it if many "
                    "legitimate peers share that address)")
        if self.count >= self.total:
            return (f"{self.count} connections are already in the handshake (cap "
                    f"ACHILLES_MAX_PREAUTH={self.total})")
        self._by_source[key] = held + 1
        self.count += 1
        return None

    def release(self, key: str) -> None:
        """Forget one connection from ``key`` (it authenticated or closed)."""
        held = self._by_source.get(key, 0)
        if held <= 0:
            return
        if held == 1:
            del self._by_source[key]
        else:
            self._by_source[key] = held - 1
        self.count -= 1


class LogThrottle:
    """Lets one message through per ``interval`` seconds and counts the ones held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: Optional[float] = None
        self._held_back = 0

    def allow(self, now: float) -> Optional[int]:
        """None if this message must be dropped; otherwise how many were dropped since the
        last one let through."""
        if self._last is not None and now - self._last < self.interval:
            self._held_back += 1
            return None
        self._last = now
        dropped, self._held_back = self._held_back, 0
        return dropped
