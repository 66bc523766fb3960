"""Typed views of Twisted's reactor, clock, delayed calls and transports.

Twisted declares these as zope interfaces, whose methods are written without ``self``; a type
checker without the mypy-zope plugin misreads every call on them (``reactor.stop()``,
``transport.write(data)``). The Protocols here describe the parts Achilles uses, and the
accessors hand out the real objects typed as such.
"""

from __future__ import annotations

import errno
import types
from typing import Any, Callable, Iterable, List, Optional, Protocol, cast

from twisted.python import log as twisted_log


class DelayedCall(Protocol):
    """A call scheduled with :meth:`Clock.callLater`."""

    def active(self) -> bool:
        """Whether it has neither run nor been cancelled."""

    def cancel(self) -> None:
        """Drop it (only while :meth:`active`)."""

    def getTime(self) -> float:
        """When it is due, on its clock."""


class Clock(Protocol):
    """The reactor's time: the global reactor, or a ``twisted.internet.task.Clock`` in tests."""

    def seconds(self) -> float:
        """The current time."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kwargs: Any) -> DelayedCall:
        """Run ``callable(*args, **kwargs)`` after ``delay`` seconds."""


class Reactor(Clock, Protocol):
    """The parts of the global reactor that Achilles uses."""

    running: bool

    def run(self, installSignalHandlers: bool = True) -> None:
        """Run the event loop until :meth:`stop`."""

    def stop(self) -> None:
        """Stop the event loop."""

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``callable`` in the reactor thread (safe from any thread)."""

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``callable`` once the loop runs."""

    def addReader(self, reader: Any) -> None:
        """Call ``reader.doRead()`` whenever its ``fileno()`` is readable."""

    def removeReader(self, reader: Any) -> None:
        """Stop watching ``reader``."""

    def addWriter(self, writer: Any) -> None:
        """Call ``writer.doWrite()`` whenever its ``fileno()`` is writable."""

    def removeWriter(self, writer: Any) -> None:
        """Stop watching ``writer``."""

    def addSystemEventTrigger(self, phase: str, eventType: str, callable: Callable[..., Any],
                              *args: Any, **kwargs: Any) -> Any:
        """Run ``callable`` at a phase (``before``, ``during``, ``after``) of an event
        (``startup``, ``shutdown``)."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        """Listen on a TCP port; returns the listening port."""

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        """Listen on a TLS port; returns the listening port."""

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Optional[Any] = None) -> Any:
        """Connect over TCP."""

    def connectSSL(self, host: str, port: int, factory: Any, contextFactory: Any,
                   timeout: float = 30, bindAddress: Optional[Any] = None) -> Any:
        """Connect over TLS."""


class Transport(Protocol):
    """A connection's transport, as a protocol uses it."""

    def write(self, data: bytes) -> None:
        """Send bytes."""

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Send several byte strings in order."""

    def loseConnection(self) -> None:
        """Close after sending what is buffered."""

    def abortConnection(self) -> None:
        """Close at once, dropping what is buffered."""

    def getPeer(self) -> Any:
        """The remote address."""

    def getHost(self) -> Any:
        """The local address."""


#: Run by a reactor made lean (:func:`lean_events`) right before each poll and after the
#: events it returned: what one turn of the loop produced (held writes) goes out then.
turn_hooks: List[Callable[[], None]] = []


def _lean_poll(self: Any, timeout: Optional[float]) -> None:
    """``EPollReactor.doPoll`` without Twisted's per-event log context (see :func:`lean_events`),
    running :data:`turn_hooks` before the poll and after its events."""
    for hook in turn_hooks:
        hook()
    try:
        events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except OSError as exc:
        if exc.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    handle = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            handle(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            twisted_log.err()
    for hook in turn_hooks:
        hook()


def lean_events(reactor: Any) -> None:
    """Make an epoll reactor hand each ready socket straight to its handler.

    Twisted's ``doPoll`` wraps every event in ``log.callWithLogger``, which copies a logging
    context dict per event for Twisted's own log prefix (Achilles logs through ``logging``):
    a few microseconds per socket read or write, on every message. Other reactors are left
    as they are. Call it once per process, before the reactor runs. Such a reactor also
    runs :data:`turn_hooks` each turn.
    """
    from twisted.internet.epollreactor import EPollReactor

    # _lean_poll uses Twisted's private poller state; a Twisted without it stays as it is.
    internals = ("_poller", "_selectables", "_doReadOrWrite")
    if isinstance(reactor, EPollReactor) and all(hasattr(reactor, a) for a in internals):
        setattr(reactor, "doIteration", types.MethodType(_lean_poll, reactor))
        setattr(reactor, "_achilles_lean", True)


def runs_turn_hooks(reactor: Any) -> bool:
    """Whether ``reactor`` runs :data:`turn_hooks` every turn (:func:`lean_events` made it so)."""
    return getattr(reactor, "_achilles_lean", False)


def get_reactor() -> Reactor:
    """The global reactor (installing the default one on first use)."""
    from twisted.internet import reactor

    return cast(Reactor, reactor)


def transport_of(proto: Any) -> Transport:
    """``proto.transport``, typed (a connected Twisted protocol's transport)."""
    return cast(Transport, proto.transport)
