"""The controller's connection to the server. Runs in the reactor thread; talks to callers
through one queue per job or request."""

from __future__ import annotations

import logging
import queue
from typing import Any, Dict, List, Union

from twisted.internet import defer, error as netError, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

from achilles.core import wire
from achilles.core.errors import AuthenticationError, ConnectionFailed
from achilles.core.protocol import PeerSideProtocol, handles
from achilles.core.reactor import get_reactor

log = logging.getLogger("achilles.controller")

CONNECT_TIMEOUT = 10.0


class ControllerProtocol(PeerSideProtocol):
    """Routes server messages to the waiting caller's queue."""

    local_role = "controller"

    def __init__(self, username: str, auth_key: bytes, address: str) -> None:
        super().__init__()
        self.username = username
        self.auth_key = auth_key
        self.address = address
        self.ready: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.jobs: Dict[str, "queue.Queue[tuple]"] = {}
        self.requests: Dict[int, "queue.Queue[tuple]"] = {}
        self.lost_reason = ""

    def on_authenticated(self) -> None:
        self.ready.callback(self)

    def on_closed(self, reason: Failure) -> None:
        if not self.ready.called:
            err = self.auth_error or ConnectionFailed(
                f"the server at {self.address} closed the connection during the handshake "
                f"({reason.getErrorMessage()}); is it an Achilles server, and do both sides "
                "agree on TLS (ACHILLES_TLS_CA here, --tls-cert on the server)?")
            self.ready.errback(Failure(err))
        self.lost_reason = reason.getErrorMessage()
        for q in list(self.jobs.values()) + list(self.requests.values()):
            q.put(("lost", self.lost_reason, id(self)))
        self.closed.callback(None)

    @handles(wire.WANT)
    def want(self, job_id: str, n: int, processes: int, capacity: int) -> None:
        q = self.jobs.get(job_id)
        if q is not None:
            q.put(("want", n, processes, capacity))

    @handles(wire.RESULT)
    def result(self, job_id: str, chunk_id: int, status: int, elapsed: float, node: str,
               payload: bytes) -> None:
        q = self.jobs.get(job_id)
        if q is not None:
            q.put(("result", chunk_id, status, payload, elapsed, node))

    @handles(wire.TASK_DONE)
    def task_done(self, graph_id: str, task_id: int, status: int, node: str, elapsed: float,
                  payload: bytes) -> None:
        q = self.jobs.get(graph_id)
        if q is not None:
            q.put(("task_done", task_id, status, payload, node, elapsed))

    @handles(wire.GRAPH_DONE)
    def graph_done(self, graph_id: str, report: Dict[int, Dict[str, Any]]) -> None:
        q = self.jobs.get(graph_id)
        if q is not None:
            q.put(("graph_done", report))

    @handles(wire.JOB_FAILED)
    def job_failed(self, job_id: str, message: str) -> None:
        q = self.jobs.get(job_id)
        if q is not None:
            q.put(("failed", message))

    @handles(wire.STATUS_REPLY, wire.KILL_DONE)
    def reply(self, request_id: int, value: Any) -> None:
        q = self.requests.pop(request_id, None)
        if q is not None:
            q.put(("reply", value))



def connect(host: str, port: int, username: str, auth_key: bytes,
            timeout: float = CONNECT_TIMEOUT, heartbeat: float = wire.DEFAULT_HEARTBEAT,
            tls: Any = None) -> defer.Deferred:
    """Connect and authenticate; fires with a ready :class:`ControllerProtocol`.

    ``auth_key`` is ``derive_key(username, secret_key)``, derived once by the caller.
    ``tls`` is Twisted client TLS options (see :mod:`achilles.core.tls`), or None for plain TCP.
    """
    address = f"{host}:{port}"
    proto = ControllerProtocol(username, auth_key, address)
    proto.heartbeat = heartbeat
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
