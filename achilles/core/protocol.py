"""Twisted protocols shared by the three roles: framing, the handshake, and message dispatch.

A connection is a small state machine: ``handshake`` (only the pre-auth JSON frames of
:mod:`achilles.core.handshake`, each at most :data:`wire.PREAUTH_MAX_FRAME` bytes) -> ``ready``
(session-tagged messages, validated against :data:`wire.REGISTRY` and dispatched to the
method marked ``@handles(code)``) -> ``closed``. Any protocol or authentication error closes
the connection with a logged reason. Timers (handshake deadline, heartbeats) run on
:attr:`AchillesProtocol.clock`, the reactor unless a test gives a ``task.Clock``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Optional, TypeVar

from twisted.internet import protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from achilles.core import wire
from achilles.core.errors import AchillesError, AuthenticationError, FrameTooLarge, ProtocolError
from achilles.core.handshake import PeerHandshake, ServerHandshake
from achilles.core.logs import printable
from achilles.core.reactor import (Clock, DelayedCall, Transport, get_reactor, runs_turn_hooks,
                                   transport_of, turn_hooks)
from achilles.core.session import FrameOpener, FrameSealer
from achilles.core.socketwrite import TCP_TYPES, write_pieces

log = logging.getLogger("achilles.protocol")

#: Messages up to this size (bytes) sent to one peer in one reactor turn share a BATCH frame...
BATCH_ITEM = 16 << 10
#: ... of at most about this size.
BATCH_BYTES = 64 << 10

HANDSHAKE_TIMEOUT = 10.0
# Seconds a refused peer has to read its AUTH_FAIL before the socket is aborted. A graceful
# close is tried first, but over TLS it waits for the peer's close_notify, which a hostile
# peer never sends.
REFUSED_LINGER = 2.0
HEARTBEAT = wire.DEFAULT_HEARTBEAT

F = TypeVar("F", bound=Callable[..., Any])


def handles(*codes: wire.Msg) -> Callable[[F], F]:
    """Mark a method as the handler of these post-auth messages; it is called with the
    message's declared fields, already validated."""

    def mark(method: F) -> F:
        method._achilles_handles = codes  # type: ignore[attr-defined]
        return method

    return mark


def default_clock() -> Clock:
    """The global reactor, as a clock."""
    return get_reactor()


class Outbox:
    """Frames for plain TCP connections, held until the end of the reactor's turn.

    A connection's messages of one turn (every read the last poll returned, every timer and
    call from another thread) are sealed and written together in one ``sendmsg`` right before
    the next poll, straight to the socket while Twisted's own buffer for it is empty: no
    writer registered with epoll and unregistered again, and one system call per connection
    per turn however many messages it got. The flush runs as a turn hook of a lean reactor
    (:func:`achilles.core.reactor.lean_events`), else as a zero-delay call of the global
    reactor (which runs before its next poll), and before the reactor shuts down.
    """

    def __init__(self) -> None:
        self.pending: List["AchillesProtocol"] = []
        self.scheduled = False
        self._trigger = False

    def add(self, proto: "AchillesProtocol") -> None:
        """``proto`` holds frames to write at the end of this turn."""
        self.pending.append(proto)
        if not self.scheduled:
            self.scheduled = True
            reactor = get_reactor()
            if not self._trigger:
                self._trigger = True
                reactor.addSystemEventTrigger("before", "shutdown", self.flush)
            if not runs_turn_hooks(reactor):
                reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Write every held frame."""
        if not self.pending:
            return
        self.scheduled = False
        pending, self.pending = self.pending, []
        for proto in pending:
            proto.flush()


OUTBOX = Outbox()
turn_hooks.append(OUTBOX.flush)


class AchillesProtocol(protocol.Protocol):
    """Base protocol. Subclasses mark handlers with :func:`handles` and fill the hooks.

    :attr:`local_role` is this end's role; :attr:`peer_role`, once known, picks the messages
    the peer may send (:func:`wire.inbound`).
    """

    handlers: ClassVar[Dict[int, str]] = {}
    local_role: ClassVar[str] = ""
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: Seconds of silence after which the peer counts as dead; PINGs go out 4 times as often.
    heartbeat: float = HEARTBEAT
    max_frame: int = wire.DEFAULT_MAX_FRAME

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: Dict[int, str] = {}
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                for code in getattr(attr, "_achilles_handles", ()):
                    table[code] = name
        if cls.local_role:
            for code in table:
                if not any(receiver == cls.local_role
                           for _, receiver in wire.REGISTRY[code].routes):
                    raise TypeError(f"{cls.__name__} handles {wire.name_of(code)}, which is "
                                    f"never sent to a {cls.local_role}")
        cls.handlers = table

    def __init__(self, clock: Optional[Clock] = None) -> None:
        self.clock: Clock = clock or default_clock()
        self.decoder = wire.FrameDecoder()
        self.state = "handshake"
        self.peer_address = "?"
        self.peer_role: Optional[str] = None
        self._inbound: FrozenSet[int] = frozenset()
        self._sealer: Optional[FrameSealer] = None
        self._timer: Optional[DelayedCall] = None
        self._beat: Optional[LoopingCall] = None
        self._last_heard = 0.0
        self._last_tick = 0.0  # clock seconds of the last heartbeat tick
        self._listening_since = 0.0  # the end of the last stall of this process
        self._corked = False  # post-auth frames wait in _out for the end of the reactor's turn
        self._out: List[List[bytes]] = []
        self._limit = 0  # send_limit, once the handshake fixed it

    @property
    def last_heard(self) -> float:
        """Clock seconds when this peer last sent anything (0 before the heartbeat starts)."""
        return self._last_heard

    @property
    def link(self) -> Transport:
        """This connection's transport (once connected). Frames still held for the end of the
        turn are written first, so whatever is done with the link comes after them."""
        if self._out:
            self.flush()
        return transport_of(self)

    # --- hooks ------------------------------------------------------------------------------
    def start_handshake(self) -> None:
        """Send the first handshake frames, if this side speaks first."""

    def handshake_frame(self, code: int, body: bytes) -> None:
        """Handle one pre-auth frame; call :meth:`authenticated` when the peer is proven."""
        raise NotImplementedError

    def on_authenticated(self) -> None:
        """Called once both sides are proven."""

    def on_closed(self, reason: Failure) -> None:
        """Called when the connection is gone, in any state."""

    def on_refused(self, reason: str) -> None:
        """Called when the handshake fails (bad proof, bad frame, timeout)."""

    # --- machinery --------------------------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.link.getPeer()
        self.peer_address = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except Exception:  # not a TCP socket (tests with StringTransport, TLS wrappers)
                pass
        self._timer = self.clock.callLater(self.handshake_timeout, self._handshake_timed_out)
        self.start_handshake()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.state == "handshake":
            self.fail(f"handshake not finished within {self.handshake_timeout:g} s")
        elif self.state == "closed":
            # Refused before auth and still not gone (a TLS peer that never answers our
            # close_notify keeps it open): drop it now.
            self.link.abortConnection()

    def _abort_after(self, seconds: float) -> None:
        """Abort this (already closing) connection ``seconds`` from now, or at the handshake
        deadline if that comes first, in case the graceful close never completes."""
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + seconds:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(seconds, self._handshake_timed_out)

    def authenticated(self, peer_role: str, send_key: bytes, recv_key: bytes) -> None:
        """Move to ``ready``: lift the frame limit, accept the peer's post-auth messages, and
        tag every frame from now on with the session keys."""
        self.state = "ready"
        self.peer_role = peer_role
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._inbound = wire.inbound(self.local_role, peer_role)
        self._sealer = FrameSealer(send_key)
        self._limit = self.send_limit
        self._corked = type(self.transport) in TCP_TYPES
        self.decoder.set_limit(self.max_frame, self._inbound, FrameOpener(recv_key))
        self._start_heartbeat()
        self.on_authenticated()

    def _start_heartbeat(self) -> None:
        self._last_heard = self._last_tick = self._listening_since = self.clock.seconds()
        if self.heartbeat > 0:
            self._beat = LoopingCall(self._heartbeat_tick)
            # LoopingCall declares the zope interface IReactorTime, which mypy cannot match
            # structurally without the mypy-zope plugin; every Clock provides it.
            self._beat.clock = self.clock  # type: ignore[assignment]
            self._beat.start(self.heartbeat / 4, now=False)

    def _heartbeat_tick(self) -> None:
        now = self.clock.seconds()
        if now - self._last_tick > self.heartbeat / 2:
            # This tick is overdue: this process did not run for a while (stopped, starved,
            # paused). Timers run before reads, so the peer's messages may be waiting unread:
            # its silence counts from now, not from before the stall.
            self._listening_since = now
        self._last_tick = now
        silent = now - max(self._last_heard, self._listening_since)
        if silent > self.heartbeat:
            log.warning("no heartbeat from %s for %.1f s; dropping the connection",
                        self.peer_address, silent)
            self.state = "closed"
            self.link.abortConnection()
            return
        self.send(wire.PING, 0)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "closed":
            return
        if self._beat is not None:
            self._last_heard = self.clock.seconds()
        try:
            self.decoder.feed(data)
            while self.state != "closed":
                item = self.decoder.next_frame()
                if item is None:
                    return
                code, body = item
                if self.state == "handshake":
                    self.handshake_frame(code, bytes(body))  # pre-auth frames are small
                else:
                    self.dispatch(code, body)
        except (ProtocolError, AuthenticationError) as exc:
            self.fail(str(exc))

    def dispatch(self, code: int, body: "bytes | memoryview") -> None:
        """Decode a post-auth message, validate it against its declaration, and call its
        handler. A handler that raises closes the connection (its peer's work is then
        re-queued by the scheduler) with the error logged; it never goes unnoticed."""
        name = self.handlers.get(code)
        if name is None or code not in self._inbound:
            raise ProtocolError(f"{wire.name_of(code)} is not valid on this connection")
        fields = wire.decode_message(body, code)
        try:
            getattr(self, name)(*fields)
        except ProtocolError:
            raise
        except Exception:
            log.exception("handling %s from %s failed; closing the connection",
                          wire.name_of(code), self.peer_address)
            raise ProtocolError(f"handling {wire.name_of(code)} failed") from None

    def send(self, code: int, *fields: Any) -> None:
        """Send one post-auth message."""
        if self.state == "ready":
            self.send_encoded(wire.encode_message(code, fields))

    @property
    def send_limit(self) -> int:
        """The largest message this end may send: its own limit, or the server's if lower."""
        return self.max_frame

    def check_size(self, pieces: List[bytes]) -> None:
        """Raise :class:`FrameTooLarge`, naming the setting, if a message is over the limit."""
        size = wire.message_size(pieces)
        if size > (self._limit or self.send_limit):
            raise FrameTooLarge(
                f"a {wire.name_of(pieces[0][0])} message of {size:,} bytes is over the "
                f"{self.send_limit:,}-byte limit; send less per message (a smaller chunksize, "
                "smaller arguments or results) or raise ACHILLES_MAX_FRAME on every machine")

    def send_encoded(self, pieces: List[bytes]) -> None:
        """Send an already-encoded message (from :func:`wire.encode_message`); a message over
        the frame limit raises :class:`FrameTooLarge` here, on the sending side."""
        if self.state == "ready":
            assert self._sealer is not None
            self.check_size(pieces)
            if self._corked:
                if not self._out:
                    OUTBOX.add(self)
                self._out.append(pieces)
            else:
                write_pieces(self.transport, self._sealer.seal(pieces))

    def send_many(self, messages: List[List[bytes]]) -> None:
        """Send several encoded messages in one write."""
        if self.state == "ready":
            assert self._sealer is not None
            for m in messages:
                self.check_size(m)
            if self._corked:
                if not self._out:
                    OUTBOX.add(self)
                self._out.extend(messages)
                return
            seal = self._sealer.seal
            write_pieces(self.transport, [piece for m in messages for piece in seal(m)])

    def flush(self) -> None:
        """Seal and write the messages held for the end of this turn (see :class:`Outbox`):
        runs of small ones as one BATCH frame each."""
        out, self._out = self._out, []
        if not out or self.state != "ready":
            return
        assert self._sealer is not None
        seal = self._sealer.seal
        if len(out) == 1:
            frames = seal(out[0])
        else:
            frames = []
            run: List[List[bytes]] = []
            run_bytes = 0
            limit = min(BATCH_BYTES, self.send_limit // 2)
            for m in out:
                size = wire.message_size(m)
                if size <= BATCH_ITEM and run_bytes + size <= limit:
                    run.append(m)
                    run_bytes += size
                    continue
                if run:
                    frames += seal(run[0] if len(run) == 1 else wire.encode_batch(run))
                if size <= BATCH_ITEM:
                    run, run_bytes = [m], size
                else:
                    run, run_bytes = [], 0
                    frames += seal(m)
            if run:
                frames += seal(run[0] if len(run) == 1 else wire.encode_batch(run))
        write_pieces(self.transport, frames)

    @handles(wire.BATCH)
    def batch(self, messages: memoryview) -> None:
        for code, body in wire.split_batch(messages):
            self.dispatch(code, body)

    @handles(wire.PING)
    def ping(self, token: int) -> None:
        self.send(wire.PONG, token)

    @handles(wire.PONG)
    def pong(self, token: int) -> None:
        pass

    def fail(self, reason: str) -> None:
        """Log why and drop the connection at once: after a protocol error nothing more is
        read or sent, and a graceful close would wait for a TLS peer's close_notify, possibly
        forever."""
        if self.state == "closed":
            return
        if self.state == "handshake":
            self.on_refused(reason)
        log.warning("closing connection from %s: %s", self.peer_address, printable(reason))
        self.state = "closed"
        self.link.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.state = "closed"
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self._beat = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.on_closed(reason)


class ServerSideProtocol(AchillesProtocol):
    """The server's end of a connection: it speaks first and checks the peer's proof."""

    local_role = "server"

    username: str = ""
    auth_key: bytes = b""  # handshake.derive_key(username, secret), derived once per process

    def start_handshake(self) -> None:
        self.handshake = ServerHandshake(self.username, self.auth_key, max_frame=self.max_frame)
        self.role: Optional[str] = None
        delay = self.hello_delay()
        if delay > 0:
            self.clock.callLater(delay, self._say_hello)
        else:
            self._say_hello()

    def _say_hello(self) -> None:
        if self.state == "handshake":
            for data in self.handshake.start():
                self.link.write(data)

    def hello_delay(self) -> float:
        """Seconds to wait before saying HELLO (to slow down a flooding address)."""
        return 0.0

    def handshake_frame(self, code: int, body: bytes) -> None:
        try:
            replies = self.handshake.receive(code, body)
        except AuthenticationError as exc:
            log.warning("refused %s: %s", self.peer_address, exc)
            self.link.write(self.handshake.fail_frame())
            self.state = "closed"
            self.on_refused(str(exc))
            self.link.loseConnection()
            self._abort_after(REFUSED_LINGER)
            return
        for data in replies:
            self.link.write(data)
        self.role = self.handshake.role
        assert self.role is not None
        send_key, recv_key = self.handshake.session_keys()
        self.authenticated(self.role, send_key, recv_key)


class PeerSideProtocol(AchillesProtocol):
    """A node's or controller's end: it answers the server and checks the server's proof.
    Subclasses set :attr:`local_role` (``node`` or ``controller``)."""

    username: str = ""
    auth_key: bytes = b""  # handshake.derive_key(username, secret), derived once per process
    auth_error: Optional[AchillesError] = None

    @property
    def send_limit(self) -> int:
        announced = self.handshake.server_max_frame
        return self.max_frame if announced is None else min(self.max_frame, announced)

    def start_handshake(self) -> None:
        self.handshake = PeerHandshake(self.local_role, self.username, self.auth_key)

    def handshake_frame(self, code: int, body: bytes) -> None:
        try:
            replies = self.handshake.receive(code, body)
        except (AuthenticationError, ProtocolError) as exc:
            self.auth_error = exc if isinstance(exc, AuthenticationError) else AuthenticationError(str(exc))
            raise
        for data in replies:
            self.link.write(data)
        if self.handshake.state == "done":
            send_key, recv_key = self.handshake.session_keys()
            self.authenticated("server", send_key, recv_key)
