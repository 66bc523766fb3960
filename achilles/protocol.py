"""Twisted protocols shared by the three roles: framing, the handshake, and message dispatch.

A connection is a small state machine: ``handshake`` (only the pre-auth JSON frames of
:mod:`achilles.handshake`, each at most :data:`wire.PREAUTH_MAX_FRAME` bytes) -> ``ready``
(pickled messages dispatched to the handler named in :attr:`AchillesProtocol.handlers`) ->
``closed``. Any protocol or authentication error closes the connection with a logged reason.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from achilles import wire
from achilles.errors import AchillesError, AuthenticationError, ProtocolError
from achilles.handshake import PeerHandshake, ServerHandshake

log = logging.getLogger("achilles.protocol")

HANDSHAKE_TIMEOUT = 10.0
HEARTBEAT = wire.DEFAULT_HEARTBEAT


class AchillesProtocol(protocol.Protocol):
    """Base protocol. Subclasses fill :attr:`handlers` ``{code: method name}`` and the hooks."""

    handlers: Dict[int, str] = {}
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: Seconds of silence after which the peer counts as dead; PINGs go out 4 times as often.
    heartbeat: float = HEARTBEAT
    max_frame: int = wire.DEFAULT_MAX_FRAME

    def __init__(self) -> None:
        self.decoder = wire.FrameDecoder()
        self.state = "handshake"
        self.peer_address = "?"
        self._timer: Optional[IDelayedCall] = None
        self._beat: Optional[LoopingCall] = None
        self._last_heard = 0.0

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
        peer = self.transport.getPeer()
        self.peer_address = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except Exception:  # not a TCP socket (tests with StringTransport, TLS wrappers)
                pass
        from twisted.internet import reactor

        self._timer = reactor.callLater(self.handshake_timeout, self._handshake_timed_out)
        self.start_handshake()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.state == "handshake":
            self.fail(f"handshake not finished within {self.handshake_timeout:g} s")
        elif self.state == "closed":
            # Refused before auth and still not gone (a TLS peer that never answers our
            # close_notify keeps it open): drop it now.
            self.transport.abortConnection()

    def authenticated(self) -> None:
        """Move to ``ready``: lift the frame limit and accept post-auth messages."""
        self.state = "ready"
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.decoder.set_limit(self.max_frame, wire.POSTAUTH_CODES)
        self._start_heartbeat()
        self.on_authenticated()

    def _start_heartbeat(self) -> None:
        from twisted.internet import reactor

        self._last_heard = reactor.seconds()
        if self.heartbeat > 0:
            self._beat = LoopingCall(self._heartbeat_tick)
            self._beat.clock = reactor
            self._beat.start(self.heartbeat / 4, now=False)

    def _heartbeat_tick(self) -> None:
        from twisted.internet import reactor

        silent = reactor.seconds() - self._last_heard
        if silent > self.heartbeat:
            log.warning("no heartbeat from %s for %.1f s; dropping the connection",
                        self.peer_address, silent)
            self.state = "closed"
            self.transport.abortConnection()
            return
        self.send(wire.PING, 0)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "closed":
            return
        if self._beat is not None:
            from twisted.internet import reactor

            self._last_heard = reactor.seconds()
        try:
            self.decoder.feed(data)
            while self.state != "closed":
                item = self.decoder.next_frame()
                if item is None:
                    return
                code, body = item
                if self.state == "handshake":
                    self.handshake_frame(code, body)
                else:
                    self.dispatch(code, body)
        except (ProtocolError, AuthenticationError) as exc:
            self.fail(str(exc))

    def dispatch(self, code: int, body: bytes) -> None:
        """Decode a post-auth message and call its handler."""
        name = self.handlers.get(code)
        if name is None:
            raise ProtocolError(f"{wire.NAMES.get(code, code)} is not valid on this connection")
        fields = wire.decode_message(body, code)
        try:
            getattr(self, name)(*fields)
        except TypeError as exc:
            raise ProtocolError(f"malformed {wire.NAMES[code]}: {exc}") from None

    def send(self, code: int, *fields: Any) -> None:
        """Send one post-auth message."""
        if self.state == "ready":
            self.transport.writeSequence(wire.encode_message(code, fields))

    def send_encoded(self, pieces: list) -> None:
        """Send an already-encoded message (from :func:`wire.encode_message`)."""
        if self.state == "ready":
            self.transport.writeSequence(pieces)

    def fail(self, reason: str) -> None:
        """Log why and close the connection (at once, without a graceful close, before auth)."""
        if self.state == "closed":
            return
        preauth = self.state == "handshake"
        if preauth:
            self.on_refused(reason)
        log.warning("closing connection from %s: %s", self.peer_address, reason)
        self.state = "closed"
        if preauth:
            # loseConnection would wait for a TLS peer's close_notify, possibly forever.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

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

    username: str = ""
    secret_key: str = ""

    def start_handshake(self) -> None:
        self.handshake = ServerHandshake(self.username, self.secret_key)
        self.role: Optional[str] = None
        delay = self.hello_delay()
        if delay > 0:
            from twisted.internet import reactor

            reactor.callLater(delay, self._say_hello)
        else:
            self._say_hello()

    def _say_hello(self) -> None:
        if self.state == "handshake":
            for data in self.handshake.start():
                self.transport.write(data)

    def hello_delay(self) -> float:
        """Seconds to wait before saying HELLO (to slow down a flooding address)."""
        return 0.0

    def handshake_frame(self, code: int, body: bytes) -> None:
        try:
            replies = self.handshake.receive(code, body)
        except AuthenticationError as exc:
            log.warning("refused %s: %s", self.peer_address, exc)
            self.transport.write(self.handshake.fail_frame())
            self.state = "closed"
            self.on_refused(str(exc))
            self.transport.loseConnection()
            return
        for data in replies:
            self.transport.write(data)
        self.role = self.handshake.role
        self.authenticated()


class PeerSideProtocol(AchillesProtocol):
    """A node's or controller's end: it answers the server and checks the server's proof."""

    role: str = ""
    username: str = ""
    secret_key: str = ""
    auth_error: Optional[AchillesError] = None

    def start_handshake(self) -> None:
        self.handshake = PeerHandshake(self.role, self.username, self.secret_key)

    def handshake_frame(self, code: int, body: bytes) -> None:
        try:
            replies = self.handshake.receive(code, body)
        except (AuthenticationError, ProtocolError) as exc:
            self.auth_error = exc if isinstance(exc, AuthenticationError) else AuthenticationError(str(exc))
            raise
        for data in replies:
            self.transport.write(data)
        if self.handshake.state == "done":
            self.authenticated()


def bind_handlers(table: Dict[int, str]) -> Callable[[type], type]:
    """Class decorator checking that every handler named in ``table`` exists."""

    def check(cls: type) -> type:
        for code, name in table.items():
            if not callable(getattr(cls, name, None)):
                raise TypeError(f"{cls.__name__} lacks handler {name} for {wire.NAMES[code]}")
        cls.handlers = dict(table)
        return cls

    return check
