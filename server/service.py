"""The server's Twisted side: one connection protocol for nodes and controllers, and the factory."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from achilles.core import wire
from achilles.core.config import (DEFAULT_FAST_DEPTH, DEFAULT_FAST_WINDOW,
                                  DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_PREAUTH,
                                  DEFAULT_MAX_PREAUTH_PER_SOURCE)
from achilles.core.handshake import derive_key
from achilles.core.logs import printable
from achilles.core.protocol import ServerSideProtocol, default_clock, handles
from achilles.core.reactor import Clock, get_reactor, transport_of
from achilles.server.guard import HandshakeGuard, LogThrottle, PreauthLimiter, source_key
from achilles.server.monitor import Monitor
from achilles.server.pipelines import PipelineJob
from achilles.server.scheduler import ControllerState, NodeState, Scheduler

log = logging.getLogger("achilles.server")

KILL_GRACE = 10.0

class ServerConnection(ServerSideProtocol):
    """One authenticated peer; its role (node or controller) picks the messages it may send
    (:func:`achilles.core.wire.inbound`)."""

    factory: "ServerFactory"

    def __init__(self, clock: Optional[Clock] = None) -> None:
        super().__init__(clock)
        self.node: Optional[NodeState] = None
        self.controller: Optional[ControllerState] = None
        self.role: Optional[str] = None
        #: The peer read this server's shared-memory probe (SHM_OK): references may go to it.
        self.shm_ok = False
        self._refused = False
        #: Source this connection counts against in the pre-auth limiter, until it is released.
        self.preauth_source: Optional[str] = None

    def dataReceived(self, data: bytes) -> None:
        """Apply every message of one read as a scheduler batch (see ``Scheduler.begin_batch``)."""
        scheduler = self.factory.scheduler
        scheduler.begin_batch()
        try:
            super().dataReceived(data)
        finally:
            scheduler.end_batch()

    def _release_preauth(self) -> None:
        if self.preauth_source is not None:
            self.factory.preauth.release(self.preauth_source)
            self.preauth_source = None

    def on_authenticated(self) -> None:
        self._release_preauth()
        relay = self.factory.scheduler.shm
        if relay is not None:
            self.send(wire.SHM_PROBE, relay.probe.name, relay.probe.digest)
        if self.role == "controller":
            self.controller = self.factory.scheduler.add_controller(self, self.peer_address)
        else:
            log.debug("node at %s authenticated", self.peer_address)

    def _host(self) -> str:
        return getattr(self.link.getPeer(), "host", "?")

    def hello_delay(self) -> float:
        now = self.clock.seconds()
        delay = self.factory.guard.delay(self._host(), now)
        if delay:
            dropped = self.factory.slowdown_log.allow(now)
            if dropped is not None:
                more = f" ({dropped} more slowed down since the last such message)" if dropped else ""
                log.warning("slowing down handshakes from %s (%.2f s): too many failures%s",
                            self._host(), delay, more)
        return delay

    def on_refused(self, reason: str) -> None:
        if not self._refused:
            self._refused = True
            self.factory.guard.record_failure(self._host(), self.clock.seconds())
            self.factory.monitor.handshake_failed()

    def on_closed(self, reason: Failure) -> None:
        self._release_preauth()
        if self.role is None:
            self.on_refused("closed during the handshake")
        sched = self.factory.scheduler
        if self.node is not None:
            sched.remove_node(self.node)
            self.factory.node_gone()
        if self.controller is not None:
            sched.remove_controller(self.controller)

    @handles(wire.SHM_OK)
    def shm_answer(self, shared: bool) -> None:
        self.shm_ok = bool(shared) and self.factory.scheduler.shm is not None

    # --- node messages ----------------------------------------------------------------------
    @handles(wire.NODE_READY)
    def node_ready(self, name: str, processes: int, hostname: str, pid: int,
                   resources: Dict[str, float]) -> None:
        if self.node is None:
            self.node = self.factory.scheduler.add_node(
                self, printable(name, 100), self.peer_address, int(processes), printable(hostname, 100),
                int(pid), resources)

    @handles(wire.NODE_LOAD)
    def node_load(self, load1: float, cpus: int, mem_total: int, mem_available: int) -> None:
        if self.node is not None:
            self.node.load = {"load1": float(load1), "cpus": cpus, "mem_total": mem_total,
                              "mem_available": mem_available}

    @handles(wire.RESULT)
    def node_result(self, job_id: str, chunk_id: int, status: int, elapsed: float,
                    node_name: str, payload: bytes) -> None:
        if self.node is not None:
            self.factory.monitor.bytes_from_nodes += len(payload)
            self.factory.scheduler.result(self.node, job_id, chunk_id, status, payload, elapsed)

    @handles(wire.TASK_ERROR)
    def task_error(self, job_id: str, chunk_id: int, index: int, type_name: str, message: str,
                   traceback: str, output: list) -> None:
        if self.node is not None:
            self.factory.monitor.task_error(self.node, job_id, chunk_id, index, type_name,
                                            message, traceback, list(output))
    @handles(wire.OUTPUT)
    def node_output(self, job_id: str, chunk_id: int, node_name: str, dropped: int,
                    payload: bytes) -> None:
        if self.node is not None:
            self.factory.scheduler.output(self.node, job_id, chunk_id, dropped, payload)

    @handles(wire.OUTPUT_TAIL)
    def node_output_tail(self, job_id: str, chunk_id: int, node_name: str,
                         payload: bytes) -> None:
        if self.node is not None:
            self.factory.scheduler.output_tail(self.node, job_id, chunk_id, payload)
    @handles(wire.TASK_PROGRESS)
    def task_progress(self, job_id: str, chunk_id: int, n: float) -> None:
        if self.node is not None:
            self.factory.scheduler.progress(self.node, job_id, chunk_id, n)

    @handles(wire.PIPE_OUT)
    def pipe_out(self, pipe_id: str, stage: int, copy: int, incarnation: int, seq: int,
                 status: int, n_items: int, skipped: int, exhausted: bool, errors: bytes,
                 payload: bytes) -> None:
        job = self.factory.scheduler.jobs.get(pipe_id)
        if self.node is not None and isinstance(job, PipelineJob):
            job.answer(self.node, stage, copy, incarnation, seq, status, n_items, skipped,
                       exhausted, errors, payload)

    @handles(wire.PIPE_OUTPUT)
    def pipe_output(self, pipe_id: str, stage: int, copy: int, node_name: str, dropped: int,
                    payload: bytes) -> None:
        job = self.factory.scheduler.jobs.get(pipe_id)
        if self.node is not None and isinstance(job, PipelineJob):
            job.output(self.node, stage, copy, dropped, payload)

    # --- controller messages ----------------------------------------------------------------
    def _controller(self) -> ControllerState:
        # Controller messages are accepted only once a controller has authenticated.
        assert self.controller is not None
        return self.controller

    @handles(wire.SUBMIT)
    def submit(self, job_id: str, function: str, func_bytes: bytes, callback_bytes: bytes,
               options: Dict[str, Any]) -> None:
        self.factory.scheduler.submit(self._controller(), job_id, function, func_bytes,
                                      callback_bytes, options)

    @handles(wire.GRAPH)
    def graph(self, graph_id: str, funcs: bytes, tasks: list, outputs: list) -> None:
        self.factory.scheduler.submit_graph(self._controller(), graph_id, funcs, tasks, outputs)

    @handles(wire.PIPE_START)
    def pipe_start(self, pipe_id: str, name: str, stages: list, options: Dict[str, Any]) -> None:
        self.factory.scheduler.submit_pipeline(self._controller(), pipe_id, name, stages, options)

    @handles(wire.PIPE_FEED)
    def pipe_feed(self, pipe_id: str, batch: int, n_items: int, consumed: int, end: bool,
                  payload: bytes) -> None:
        job = self.factory.scheduler.pipeline(self._controller(), pipe_id)
        if job is not None:
            job.feed(batch, n_items, consumed, end, payload)

    @handles(wire.CHUNK)
    def chunk(self, job_id: str, chunk_id: int, n_items: int, payload: bytes) -> None:
        self.factory.monitor.bytes_from_controllers += len(payload)
        self.factory.scheduler.add_chunk(self._controller(), job_id, chunk_id, n_items, payload)

    @handles(wire.END)
    def end(self, job_id: str, n_chunks: int) -> None:
        self.factory.scheduler.end(self._controller(), job_id, n_chunks)

    @handles(wire.WATCH)
    def watch(self, job_id: str) -> None:
        self.factory.scheduler.watch(self._controller(), job_id)

    @handles(wire.CANCEL)
    def cancel(self, job_id: str, reason: str) -> None:
        self.factory.scheduler.cancel(self._controller(), job_id, printable(reason))

    @handles(wire.STATUS)
    def status(self, request_id: int) -> None:
        self.send(wire.STATUS_REPLY, request_id, self.factory.scheduler.status())

    @handles(wire.KILL)
    def kill(self, request_id: int) -> None:
        log.warning("controller %s asked to stop the cluster", self.peer_address)

        def reply(stopped: int) -> None:
            self.send(wire.KILL_DONE, request_id, stopped)

        self.factory.kill_cluster().addCallback(reply)


def addr_text(addr: Any) -> str:
    """``host:port`` of a Twisted address."""
    return f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"


class RefusedConnection(protocol.Protocol):
    """Stands in for a connection over a pre-auth cap: drops it the moment it is made."""

    def connectionMade(self) -> None:
        transport_of(self).abortConnection()


class ServerFactory(protocol.ServerFactory):
    """Holds the scheduler and the credentials every connection checks, and caps the
    connections still in the handshake (in total and per source)."""

    # Twisted types ``protocol`` and ``buildProtocol`` for one protocol class that has a typed
    # ``factory`` property; this factory builds two kinds (the second refuses the connection).
    protocol = ServerConnection  # type: ignore[assignment]

    def __init__(self, username: str, secret_key: str, prefetch: int = 2,
                 heartbeat: float = wire.DEFAULT_HEARTBEAT,
                 fast_depth: int = DEFAULT_FAST_DEPTH, fast_window: float = DEFAULT_FAST_WINDOW,
                 max_crashes: int = wire.DEFAULT_MAX_CRASHES,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_preauth: int = DEFAULT_MAX_PREAUTH,
                 max_preauth_per_source: int = DEFAULT_MAX_PREAUTH_PER_SOURCE,
                 max_frame: int = wire.DEFAULT_MAX_FRAME,
                 clock: Optional[Clock] = None) -> None:
        self.max_frame = max_frame
        self.clock: Clock = clock or default_clock()
        self.username = username
        self.auth_key = derive_key(username, secret_key)
        self.heartbeat = heartbeat
        self.handshake_timeout = handshake_timeout
        self.scheduler = Scheduler(prefetch=prefetch, max_crashes=max_crashes, clock=self.clock,
                                   depth=fast_depth, window=fast_window)
        self.monitor = Monitor(self.scheduler, self.clock)
        self.guard = HandshakeGuard()
        self.preauth = PreauthLimiter(max_preauth, max_preauth_per_source)
        self._refusal_log = LogThrottle()
        self.slowdown_log = LogThrottle()
        self._waiting_for_nodes: List[defer.Deferred] = []
        self.stopping = False

    def buildProtocol(  # type: ignore[override]
            self, addr: Any) -> "ServerConnection | RefusedConnection":
        source = source_key(str(getattr(addr, "host", "?")))
        refusal = self.preauth.admit(source)
        if refusal is not None:
            dropped = self._refusal_log.allow(self.clock.seconds())
            if dropped is not None:
                more = f" ({dropped} more refused since the last such message)" if dropped else ""
                log.warning("refusing a connection from %s: %s%s", addr_text(addr), refusal, more)
            return RefusedConnection()
        proto = ServerConnection(self.clock)
        proto.factory = self
        proto.preauth_source = source
        proto.username = self.username
        proto.auth_key = self.auth_key
        proto.heartbeat = self.heartbeat
        proto.handshake_timeout = self.handshake_timeout
        proto.max_frame = self.max_frame
        return proto

    def node_gone(self) -> None:
        if not self.scheduler.nodes:
            waiting, self._waiting_for_nodes = self._waiting_for_nodes, []
            for d in waiting:
                d.callback(None)

    def kill_cluster(self) -> defer.Deferred:
        """Tell every node to shut down; fire with their number once all are gone (or after
        :data:`KILL_GRACE` seconds), then stop the server."""
        self.stopping = True
        nodes = list(self.scheduler.nodes.values())
        for node in nodes:
            node.peer.send(wire.SHUTDOWN, "the cluster is being stopped")
        gone: defer.Deferred = defer.Deferred()
        if nodes:
            self._waiting_for_nodes.append(gone)

            def give_up() -> None:
                if not gone.called:
                    gone.callback(None)

            timer = self.clock.callLater(KILL_GRACE, give_up)

            def stop_timer(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                return result

            gone.addBoth(stop_timer)
        else:
            gone.callback(None)

        def stop(_: Any) -> int:
            log.warning("cluster stopped: %d node(s) shut down; server exiting", len(nodes))
            self.clock.callLater(0.2, get_reactor().stop)
            return len(nodes)

        return gone.addCallback(stop)
