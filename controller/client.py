"""The controller's connection to the server. Runs in the reactor thread; talks to callers
through one :class:`~achilles.controller.events.EventSink` per job or request, putting typed
events (:mod:`achilles.controller.events`) on it."""

from __future__ import annotations

import errno
import logging
from typing import Any, Dict, List, Optional, Union

from twisted.internet import defer, error as netError, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

from achilles.controller.events import (ChunkResult, ConnectionLostEvent, Event, EventSink,
                                        GraphDone, deliver,
                                        JobFailed, JobProgress, Output, OutputTail, PipeOutput,
                                        PipeResult, Reply,
                                        TaskDone,
                                        Want)
from achilles.core import shm, wire
from achilles.core.errors import AuthenticationError, ConnectionFailed, ServerBusy
from achilles.core.protocol import PeerSideProtocol, handles
from achilles.core.reactor import get_reactor
from achilles.controller.segments import Segments

log = logging.getLogger("achilles.controller")

CONNECT_TIMEOUT = 10.0


def _tls_refused(reason: Failure) -> bool:
    """Whether a connection ended because its TLS handshake failed (on either side)."""
    from OpenSSL.SSL import Error as TLSError

    return reason.check(TLSError) is not None


class ControllerProtocol(PeerSideProtocol):
    """Routes server messages to the waiting caller's queue."""

    local_role = "controller"

    def __init__(self, username: str, auth_key: bytes, address: str,
                 segments: Optional[Segments] = None) -> None:
        super().__init__()
        self.username = username
        self.auth_key = auth_key
        self.address = address
        self.ready: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        # touched on the reactor thread only (callers go through add_job & co.)
        self.jobs: Dict[str, EventSink] = {}
        self.requests: Dict[int, EventSink] = {}
        self.lost_reason = ""
        #: This process's shared-memory settings (None: off here).
        self.segments = segments
        #: This connection proved it shares the server's shared memory (it read the probe):
        #: large map payloads may go as references (:mod:`achilles.core.shm`).
        self.shm_ok = False
        #: Events of the read being handled, per sink, delivered together when it is done.
        self._held: Optional[Dict[EventSink, List[Event]]] = None

    def dataReceived(self, data: bytes) -> None:
        """Handle one read; each sink gets the events it brought in one go (one wake-up of
        the thread reading it, however many results the read held)."""
        self._held = {}
        try:
            super().dataReceived(data)
        finally:
            self._release()

    def _release(self) -> None:
        held, self._held = self._held, None
        if held:
            for sink, events in held.items():
                deliver(sink, events)

    def _put(self, sink: EventSink, event: Event) -> None:
        held = self._held
        if held is None:
            sink.put(event)
        else:
            held.setdefault(sink, []).append(event)

    def on_authenticated(self) -> None:
        self.ready.callback(self)

    def on_closed(self, reason: Failure) -> None:
        if not self.ready.called and self.auth_error is None and _tls_refused(reason):
            # Not a busy server: retrying would only fail the same way until the timeout.
            self.ready.errback(Failure(ConnectionFailed(
                f"TLS with the server at {self.address} failed ({reason.getErrorMessage()}); "
                "check that ACHILLES_TLS_CA here names the CA of the server's certificate and, "
                "if the server asks for client certificates, ACHILLES_TLS_CLIENT_CERT and "
                "ACHILLES_TLS_CLIENT_KEY")))
        elif not self.ready.called and self.auth_error is None and self.handshake.state == "start":
            self.ready.errback(Failure(ServerBusy(
                f"the server at {self.address} dropped the connection before its greeting "
                f"({reason.getErrorMessage()}); it may be over its pre-auth connection caps "
                "(ACHILLES_MAX_PREAUTH_PER_SOURCE)")))
        elif not self.ready.called:
            err = self.auth_error or ConnectionFailed(
                f"the server at {self.address} closed the connection during the handshake "
                f"({reason.getErrorMessage()}); is it an Achilles server, and do both sides "
                "agree on TLS (ACHILLES_TLS_CA here, --tls-cert on the server)?")
            self.ready.errback(Failure(err))
        self._release()
        self.lost_reason = reason.getErrorMessage()
        lost = ConnectionLostEvent(self.lost_reason, id(self))
        for sink in list(self.jobs.values()) + list(self.requests.values()):
            sink.put(lost)
        self.closed.callback(None)

    # --- routing, called on the reactor thread only ----------------------------------------
    def add_job(self, job_id: str, sink: EventSink) -> int:
        """Route ``job_id``'s events to ``sink``; returns this connection's id. If the
        connection is already closed, ``sink`` gets its :class:`ConnectionLostEvent` at once."""
        self.jobs[job_id] = sink
        if self.state != "ready":
            sink.put(ConnectionLostEvent(self.lost_reason or "connection closed", id(self)))
        return id(self)

    def remove_job(self, job_id: str) -> None:
        """Stop routing ``job_id``'s events; its result segments nobody read are unlinked."""
        self.jobs.pop(job_id, None)
        if self.segments is not None:
            self.segments.forget(job_id)

    def start_request(self, request_id: int, sink: EventSink, message: List[bytes]) -> None:
        """Send a request; its :class:`Reply` (or :class:`ConnectionLostEvent`) goes to ``sink``."""
        self.requests[request_id] = sink
        if self.state != "ready":
            sink.put(ConnectionLostEvent(self.lost_reason or "connection closed", id(self)))
            return
        self.send_many([message])

    def forget_request(self, request_id: int) -> None:
        """Drop a request nobody waits for any more."""
        self.requests.pop(request_id, None)

    # --- server messages --------------------------------------------------------------------
    @handles(wire.SHM_PROBE)
    def shm_probe(self, name: str, digest: bytes) -> None:
        segments = self.segments
        shared = segments is not None and shm.check_probe(segments.path, name, digest)
        # SHM_OK goes first: a reference this end sends later always follows it.
        self.send(wire.SHM_OK, shared)
        self.shm_ok = shared

    @handles(wire.WANT)
    def want(self, job_id: str, n: int, processes: int, capacity: int) -> None:
        sink = self.jobs.get(job_id)
        if sink is not None:
            self._put(sink, Want(n, processes, capacity))

    @handles(wire.RESULT)
    def result(self, job_id: str, chunk_id: int, status: int, elapsed: float, node: str,
               payload: bytes) -> None:
        sink = self.jobs.get(job_id)
        if status == wire.OK and shm.is_ref(payload) and self.segments is not None:
            if sink is None:  # nobody reads this job any more
                self.segments.discard(payload)
                return
            payload = bytes(payload)
            self.segments.arrived(job_id, payload)
        if sink is not None:
            self._put(sink, ChunkResult(chunk_id, status, payload, elapsed, node))

    @handles(wire.OUTPUT)
    def output(self, job_id: str, chunk_id: int, node: str, dropped: int,
               payload: bytes) -> None:
        sink = self.jobs.get(job_id)
        if sink is not None:
            self._put(sink, Output(chunk_id, node, dropped, bytes(payload)))

    @handles(wire.OUTPUT_TAIL)
    def output_tail(self, job_id: str, chunk_id: int, node: str, payload: bytes) -> None:
        sink = self.jobs.get(job_id)
        if sink is not None:
            self._put(sink, OutputTail(chunk_id, node, bytes(payload)))

    @handles(wire.PIPE_OUTPUT)
    def pipe_output(self, pipe_id: str, stage: int, copy: int, node: str, dropped: int,
                    payload: bytes) -> None:
        sink = self.jobs.get(pipe_id)
        if sink is not None:
            self._put(sink, PipeOutput(stage, copy, node, dropped, bytes(payload)))

    @handles(wire.TASK_DONE)
    def task_done(self, graph_id: str, task_id: int, status: int, node: str, elapsed: float,
                  payload: bytes) -> None:
        sink = self.jobs.get(graph_id)
        if sink is not None:
            self._put(sink, TaskDone(task_id, status, payload, node, elapsed))

    @handles(wire.GRAPH_DONE)
    def graph_done(self, graph_id: str, report: Dict[int, Dict[str, Any]]) -> None:
        sink = self.jobs.get(graph_id)
        if sink is not None:
            self._put(sink, GraphDone(report))

    @handles(wire.PIPE_RESULT)
    def pipe_result(self, pipe_id: str, origin: int, key: list, last: bool, kind: int,
                    payload: bytes) -> None:
        sink = self.jobs.get(pipe_id)
        if sink is not None:
            self._put(sink, PipeResult(origin, tuple(key), last, kind, bytes(payload)))
    @handles(wire.JOB_PROGRESS)
    def job_progress(self, job_id: str, done: float, failed: int, skipped: int, retried: int,
                     by_name: Dict[str, List[int]]) -> None:
        sink = self.jobs.get(job_id)
        if sink is not None:
            self._put(sink, JobProgress(done, failed, skipped, retried, by_name))

    @handles(wire.JOB_FAILED)
    def job_failed(self, job_id: str, message: str) -> None:
        sink = self.jobs.get(job_id)
        if sink is not None:
            self._put(sink, JobFailed(message))

    @handles(wire.STATUS_REPLY, wire.KILL_DONE)
    def reply(self, request_id: int, value: Any) -> None:
        sink = self.requests.pop(request_id, None)
        if sink is not None:
            self._put(sink, Reply(value))



def connect(host: str, port: int, username: str, auth_key: bytes,
            timeout: float = CONNECT_TIMEOUT, heartbeat: float = wire.DEFAULT_HEARTBEAT,
            tls: Any = None, max_frame: int = wire.DEFAULT_MAX_FRAME,
            segments: Optional[Segments] = None) -> defer.Deferred:
    """Connect and authenticate; fires with a ready :class:`ControllerProtocol`.

    ``auth_key`` is ``derive_key(username, secret_key)``, derived once by the caller.
    ``tls`` is Twisted client TLS options (see :mod:`achilles.core.tls`), or None for plain TCP.
    ``segments``: this process's shared-memory end (:mod:`achilles.controller.segments`), or
    None to answer the server's probe with "not shared".
    """
    address = f"{host}:{port}"
    proto = ControllerProtocol(username, auth_key, address, segments)
    proto.heartbeat = heartbeat
    proto.max_frame = max_frame
    if tls is None:
        endpoint: Union[TCP4ClientEndpoint, SSL4ClientEndpoint] = TCP4ClientEndpoint(
            reactor, host, port, timeout=timeout)
    else:
        endpoint = SSL4ClientEndpoint(reactor, host, port, tls, timeout=timeout)

    def failed(f: Failure) -> Failure:
        if f.check(netError.ConnectionRefusedError):
            raise ConnectionFailed(
                f"cannot reach the Achilles server at {address}: connection refused; start "
                "`achilles-server` there or fix ACHILLES_HOST / ACHILLES_PORT") from None
        if f.check(netError.ConnectError) and getattr(f.value, "osError", None) == errno.ECONNRESET:
            raise ServerBusy(
                f"the server at {address} reset the connection at once; it may be over its "
                "pre-auth connection caps (ACHILLES_MAX_PREAUTH_PER_SOURCE)") from None
        if f.check(netError.TimeoutError, netError.DNSLookupError, netError.ConnectError):
            raise ConnectionFailed(
                f"cannot reach the Achilles server at {address}: {f.getErrorMessage()}; check "
                "ACHILLES_HOST / ACHILLES_PORT and the network") from None
        return f

    d = connectProtocol(endpoint, proto)
    d.addErrback(failed)
    d.addCallback(lambda _: proto.ready)

    def auth_timeout() -> None:
        if not proto.ready.called and proto.transport is not None:
            proto.auth_error = AuthenticationError(
                f"the server at {address} did not finish the handshake in {timeout:g} s; if it "
                "uses TLS, set ACHILLES_TLS_CA (--tls-ca) here")
            proto.link.loseConnection()

    get_reactor().callLater(timeout, auth_timeout)
    return d
