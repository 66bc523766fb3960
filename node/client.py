"""The node's connection to the server: handshake, registration, tasks in, results out."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Dict, Optional, Tuple

from twisted.internet import protocol, reactor
from twisted.python.failure import Failure

from achilles import wire
from achilles.handshake import derive_key
from achilles.protocol import PeerSideProtocol, bind_handlers
from achilles.node.pool import Task, WorkerPool

log = logging.getLogger("achilles.node")


@bind_handlers({wire.JOB_CODE: "job_code", wire.TASK: "task", wire.CANCEL: "cancel",
                wire.JOB_DONE: "job_done", wire.SHUTDOWN: "shutdown", wire.PING: "ping",
                wire.PONG: "pong"})
class NodeProtocol(PeerSideProtocol):
    """One session with the server. Results of an earlier session are never sent on this one."""

    role = "node"
    factory: "NodeFactory"

    def __init__(self, session: int) -> None:
        super().__init__()
        self.session = session
        self.jobs: Dict[str, Tuple[bytes, bytes, Dict[str, Any]]] = {}

    def on_authenticated(self) -> None:
        f = self.factory
        f.resetDelay()
        f.current = self
        log.info("connected to server %s as %s with %d processes", self.peer_address, f.name,
                 f.pool.processes)
        self.send(wire.NODE_READY, f.name, f.pool.processes, socket.gethostname(), os.getpid(),
                  f.resources)

    def on_closed(self, reason: Failure) -> None:
        f = self.factory
        if f.current is self:
            f.current = None
            dropped = f.pool.drain()
            log.warning("lost the server connection (%s); dropped %d queued chunk(s)",
                        reason.getErrorMessage(), dropped)
        if self.auth_error is not None:
            f.fatal(str(self.auth_error))

    def job_code(self, job_id: str, func_bytes: bytes, callback_bytes: bytes,
                 options: Dict[str, Any]) -> None:
        self.jobs[job_id] = (func_bytes, callback_bytes, options)

    def task(self, job_id: str, chunk_id: int, careful: bool, timeout: Optional[float],
             payload: bytes) -> None:
        code = self.jobs.get(job_id)
        if code is None:
            log.error("task for unknown job %s ignored", job_id[:8])
            return
        self.factory.pool.submit(Task(self.session, job_id, chunk_id, code[0], code[1], payload,
                                      bool(careful), timeout, str(code[2].get("kind", "map"))))

    def cancel(self, job_id: str, reason: str = "") -> None:
        self.jobs.pop(job_id, None)
        self.factory.pool.cancel_job(self.session, job_id)

    def job_done(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def shutdown(self, reason: str = "") -> None:
        log.warning("server asked this node to stop: %s", reason)
        self.factory.stop()

    def ping(self, token: Any) -> None:
        self.send(wire.PONG, token)

    def pong(self, token: Any) -> None:
        pass

    def send_result(self, task: Task, status: int, payload: bytes, elapsed: float) -> None:
        self.send(wire.RESULT, task.job_id, task.chunk_id, status, elapsed, self.factory.name,
                  payload)


class NodeFactory(protocol.ReconnectingClientFactory):
    """Connects, and reconnects with backoff while the server is unreachable."""

    maxDelay = 5.0
    initialDelay = 0.5
    factor = 2.0

    def __init__(self, name: str, processes: int, username: str, secret_key: str,
                 address: str, resources: Optional[Dict[str, float]] = None,
                 heartbeat: float = wire.DEFAULT_HEARTBEAT) -> None:
        self.name = name
        self.heartbeat = heartbeat
        self.username = username
        self.auth_key = derive_key(username, secret_key)
        self.address = address
        self.resources = dict(resources or {})
        self.current: Optional[NodeProtocol] = None
        self.exit_code = 0
        self.stopping = False
        self._sessions = 0
        self.pool = WorkerPool(processes, self._from_worker)

    def buildProtocol(self, addr: Any) -> NodeProtocol:
        self._sessions += 1
        proto = NodeProtocol(self._sessions)
        proto.factory = self
        proto.username = self.username
        proto.auth_key = self.auth_key
        proto.heartbeat = self.heartbeat
        return proto

    def _from_worker(self, task: Task, status: int, payload: bytes, elapsed: float) -> None:
        reactor.callFromThread(self._deliver, task, status, payload, elapsed)

    def _deliver(self, task: Task, status: int, payload: bytes, elapsed: float) -> None:
        proto = self.current
        if proto is not None and proto.session == task.session:
            proto.send_result(task, status, payload, elapsed)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.stopping:
            log.warning("cannot reach the server at %s (%s); retrying", self.address,
                        reason.getErrorMessage())
        super().clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        if not self.stopping:
            super().clientConnectionLost(connector, reason)

    def fatal(self, message: str) -> None:
        """Stop for good with a clear error (a failed handshake is a configuration error)."""
        log.error("%s", message)
        self.exit_code = 2
        self.stop()

    def stop(self) -> None:
        """Stop reconnecting and stop the reactor."""
        if self.stopping:
            return
        self.stopping = True
        self.stopTrying()
        if self.current is not None:
            self.current.transport.loseConnection()
        reactor.callLater(0, reactor.stop)
