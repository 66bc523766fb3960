"""``--exit-with-stdin``: a daemon started by :class:`achilles.LocalCluster` stops when its
parent goes away (its stdin pipe closes), so no test or script can leave one behind."""

from __future__ import annotations

from typing import Callable

from twisted.internet import protocol


class _Watch(protocol.Protocol):
    def __init__(self, on_eof: Callable[[], None]) -> None:
        self.on_eof = on_eof

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.on_eof()


def exit_with_stdin(on_eof: Callable[[], None]) -> None:
    """Call ``on_eof`` in the reactor when stdin reaches end of file."""
    from twisted.internet import stdio

    stdio.StandardIO(_Watch(on_eof))
