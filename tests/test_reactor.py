"""The lean epoll event loop (achilles.core.reactor.lean_events) on a real loopback socket."""

from __future__ import annotations

import pytest
from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor

from achilles.core.reactor import lean_events, runs_turn_hooks, turn_hooks
from achilles.core.socketwrite import _idle_socket, write_pieces


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


def talk_to_echo(reactor, client, record) -> None:
    """Run ``reactor`` with ``client(reactor, record)`` connected to an echo server on
    loopback until the client stops it (or 20 s pass), then close every socket it holds."""
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    protocol.ClientCreator(reactor, client, reactor, record).connectTCP(
        "127.0.0.1", port.getHost().port)
    reactor.callLater(20, reactor.stop)
    reactor.run(installSignalHandlers=False)
    port.stopListening()
    for reader in reactor.getReaders() + reactor.getWriters():
        reader.connectionLost(None)


@pytest.mark.timeout(30)
def test_lean_events_deliver_reads_and_survive_a_raising_handler():
    """With lean_events, a reactor hands each ready socket to its protocol (an echo round
    trip works both ways), and a protocol whose dataReceived raises loses its connection
    while the loop goes on, as with Twisted's own doPoll."""
    reactor = EPollReactor()
    assert not runs_turn_hooks(reactor)
    lean_events(reactor)
    assert reactor.doIteration.__func__.__name__ == "_lean_poll" and runs_turn_hooks(reactor)
    got: list = []
    talk_to_echo(reactor, Probe, got)
    assert got == [b"one", b"two", "lost"]


@pytest.mark.timeout(30)
def test_turn_hooks_run_before_each_poll_and_after_its_events():
    """A lean reactor runs every turn hook once before it polls and once after handling what
    the poll returned, so writes held during a turn go out before the loop sleeps."""
    reactor = EPollReactor()
    lean_events(reactor)
    seen: list = []
    hook = lambda: seen.append(len(calls))  # noqa: E731
    calls: list = []
    turn_hooks.append(hook)
    try:
        reactor.callLater(0, calls.append, 1)
        reactor.callLater(0.05, reactor.stop)
        reactor.run(installSignalHandlers=False)
    finally:
        turn_hooks.remove(hook)
    assert seen[:2] == [1, 1] and len(seen) >= 4 and len(seen) % 2 == 0


class Writer(protocol.Protocol):
    """Writes through write_pieces twice: once on an idle connection, once behind a Twisted
    write still queued; records whether the direct path was open each time and what echoes."""

    def __init__(self, reactor, seen: dict) -> None:
        self.reactor, self.seen, self.received = reactor, seen, b""

    def connectionMade(self) -> None:
        self.seen["idle"] = _idle_socket(self.transport) is self.transport.socket
        write_pieces(self.transport, [b"a", memoryview(b"bc"), bytearray(b"d")])
        self.transport.write(b"e")  # queued in Twisted until its next doWrite
        self.seen["queued"] = _idle_socket(self.transport)
        write_pieces(self.transport, [b"f", memoryview(b"g")])

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= 7:
            self.seen["echo"] = self.received
            self.transport.loseConnection()
            self.reactor.stop()


@pytest.mark.timeout(30)
def test_write_pieces_goes_direct_only_on_an_idle_plain_tcp_connection():
    """On the installed Twisted, an idle plain TCP connection is written straight to its
    socket (the fast path exists); with a Twisted write still queued it is not, and the bytes
    arrive in the order written either way."""
    reactor = EPollReactor()
    seen: dict = {}
    talk_to_echo(reactor, Writer, seen)
    assert seen == {"idle": True, "queued": None, "echo": b"abcdefg"}
