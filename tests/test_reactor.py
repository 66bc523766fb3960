"""The lean epoll event loop (achilles.core.reactor.lean_events) on a real loopback socket."""

from __future__ import annotations

import pytest
from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor

from achilles.core.reactor import lean_events


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Probe(protocol.Protocol):
    """Sends two messages, the second once the first came back; fails the second read."""

    def __init__(self, reactor, got: list) -> None:
        self.reactor, self.got = reactor, got

    def connectionMade(self) -> None:
        self.transport.write(b"one")

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)
        if data == b"one":
            self.transport.write(b"two")
        else:
            raise RuntimeError("a handler that raises")

    def connectionLost(self, reason) -> None:
        self.got.append("lost")
        self.reactor.stop()


@pytest.mark.timeout(30)
def test_lean_events_deliver_reads_and_survive_a_raising_handler():
    """With lean_events, a reactor hands each ready socket to its protocol (an echo round
    trip works both ways), and a protocol whose dataReceived raises loses its connection
    while the loop goes on, as with Twisted's own doPoll."""
    reactor = EPollReactor()
    lean_events(reactor)
    assert reactor.doIteration.__func__.__name__ == "_lean_poll"
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    got: list = []
    protocol.ClientCreator(reactor, Probe, reactor, got).connectTCP(
        "127.0.0.1", port.getHost().port)
    reactor.callLater(20, reactor.stop)
    reactor.run(installSignalHandlers=False)
    port.stopListening()
    for reader in reactor.getReaders() + reactor.getWriters():
        reader.connectionLost(None)
    assert got == [b"one", b"two", "lost"]
