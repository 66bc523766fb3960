"""The node's connection to the server: handshake, registration, tasks in, results out."""

from __future__ import annotations

import logging
import os
import pickle
import socket
from typing import Any, Dict, List, Optional, Set, Tuple

from twisted.internet import protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from achilles.core import shm, wire
from achilles.core.config import DEFAULT_REFUSED_RETRY_MAX_DELAY, DEFAULT_RETRY_MAX_DELAY
from achilles.core.errors import FrameTooLarge, ProtocolError
from achilles.core.handshake import derive_key
from achilles.core.logs import printable
from achilles.core.output import decode_lines, encode_lines
from achilles.core.protocol import PeerSideProtocol, handles
from achilles.core.reactor import Clock, get_reactor
from achilles.core.serialization import error_record, error_text
from achilles.node.pool import Task, WorkerPool
from achilles.node.stages import CopyKey, StageHost

log = logging.getLogger("achilles.node")
reactor = get_reactor()

#: Seconds between two NODE_LOAD reports.
LOAD_INTERVAL = 5.0


def host_load() -> Tuple[float, int, int, int]:
    """``(1-minute load average, CPUs, total memory, available memory)``; memory in bytes,
    0 where this platform does not say."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = 0.0
    mem: Dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    mem[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return load1, os.cpu_count() or 1, mem.get("MemTotal", 0), mem.get("MemAvailable", 0)


def batch_failures(payload: bytes) -> List[Tuple[int, bytes]]:
    """``(index, error record)`` of each failed task in a batch of graph tasks' result (a
    graph batch is a chunk with a negative id), from this node's own worker."""
    try:
        outcomes = pickle.loads(payload)
    except Exception:
        return []
    return [(i, o[3]) for i, o in enumerate(outcomes)
            if o[1] == wire.ITEM_ERROR and isinstance(o[3], bytes)]


class NodeProtocol(PeerSideProtocol):
    """One session with the server. Results of an earlier session are never sent on this one."""

    local_role = "node"
    factory: "NodeFactory"

    def __init__(self, session: int, clock: Optional[Clock] = None) -> None:
        super().__init__(clock)
        self.session = session
        self.jobs: Dict[str, Tuple[bytes, bytes, Dict[str, Any]]] = {}
        self.refusal: Optional[str] = None
        self.was_ready = False
        #: This node read the server's shared-memory probe: large map payloads may be refs.
        self.shm_ok = False
        #: Map jobs whose last result was small: their chunks get no result segment (a
        #: segment name costs every chunk a little; a large result turns it back on).
        self.small_results: Set[str] = set()
        self._load: Optional[LoopingCall] = None

    def on_refused(self, reason: str) -> None:
        self.refusal = reason

    def on_authenticated(self) -> None:
        f = self.factory
        f.authenticated()
        self.was_ready = True
        f.current = self
        log.info("connected to server %s as %s with %d processes", self.peer_address, f.name,
                 f.pool.processes)
        self.send(wire.NODE_READY, f.name, f.pool.processes, socket.gethostname(), os.getpid(),
                  f.resources)
        self._load = LoopingCall(self.report_load)
        self._load.clock = self.clock  # type: ignore[assignment]  # see AchillesProtocol._start_heartbeat
        self._load.start(LOAD_INTERVAL)

    def report_load(self) -> None:
        """Tell the server how loaded this host is (for status and the dashboard)."""
        self.send(wire.NODE_LOAD, *host_load())

    def on_closed(self, reason: Failure) -> None:
        if self._load is not None and self._load.running:
            self._load.stop()
        f = self.factory
        if f.current is self:
            f.current = None
            dropped = f.pool.drain()
            stopped = f.stages.stop_all()
            log.warning("lost the server connection (%s); dropped %d queued chunk(s) and %d "
                        "stage copies", printable(reason.getErrorMessage()), dropped, stopped)
        if not self.was_ready and not f.stopping:
            why = self.auth_error or self.refusal or printable(reason.getErrorMessage())
            f.handshake_failed(str(why))

    @handles(wire.SHM_PROBE)
    def shm_probe(self, name: str, digest: bytes) -> None:
        f = self.factory
        self.shm_ok = f.shm_dir is not None and shm.check_probe(f.shm_dir, name, digest)
        self.send(wire.SHM_OK, self.shm_ok)

    @handles(wire.JOB_CODE)
    def job_code(self, job_id: str, func_bytes: bytes, callback_bytes: bytes,
                 options: Dict[str, Any]) -> None:
        self.jobs[job_id] = (func_bytes, callback_bytes, options)

    @handles(wire.TASK)
    def task(self, job_id: str, chunk_id: int, careful: bool, timeout: Optional[float],
             payload: bytes) -> None:
        code = self.jobs.get(job_id)
        if code is None:
            log.error("task for unknown job %s ignored", job_id[:8])
            return
        options = code[2]
        kind = str(options.get("kind", "map"))
        init, maxtasks = options.get("init", b""), options.get("maxtasks", 0)
        if not isinstance(init, bytes) or not isinstance(maxtasks, int) or kind != "map":
            init, maxtasks = b"", 0
        group = options.get("group") if isinstance(options.get("group"), str) else job_id
        f = self.factory
        segment = (f.shm_name() if self.shm_ok and kind == "map"
                   and job_id not in self.small_results else None)
        f.pool.submit(Task(self.session, job_id, chunk_id, code[0], code[1], payload,
                           bool(careful), timeout, kind, str(group), init,
                           max(0, maxtasks), options.get("output", True) is not False,
                           shm=segment))

    @handles(wire.CANCEL)
    def cancel(self, job_id: str, reason: str) -> None:
        self.jobs.pop(job_id, None)
        self.small_results.discard(job_id)
        self.factory.pool.cancel_job(self.session, job_id)
        self.factory.stages.stop_pipe(self.session, job_id)

    @handles(wire.JOB_DONE)
    def job_done(self, job_ids: List[str]) -> None:
        if not all(isinstance(job_id, str) for job_id in job_ids):
            raise ProtocolError("JOB_DONE with a job id that is not a string")
        for job_id in job_ids:
            self.jobs.pop(job_id, None)
            self.small_results.discard(job_id)
            self.factory.stages.stop_pipe(self.session, job_id)

    @handles(wire.PIPE_WORK)
    def pipe_work(self, pipe_id: str, stage: int, copy: int, incarnation: int, seq: int, op: str,
                  payload: bytes) -> None:
        self.factory.stages.work((self.session, pipe_id, stage, copy, incarnation), seq, op,
                                 bytes(payload))

    @handles(wire.SHUTDOWN)
    def shutdown(self, reason: str) -> None:
        log.warning("server asked this node to stop: %s", printable(reason))
        self.factory.stop()

    def send_output(self, task: Task, dropped: int, payload: bytes) -> None:
        """Send lines of a running chunk's output (``payload``, encoded); lines too large for
        a frame are counted as dropped instead."""
        self._send_lines(wire.OUTPUT, (task.job_id, task.chunk_id, self.factory.name), dropped,
                         payload)

    def send_stage_output(self, key: CopyKey, dropped: int, payload: bytes) -> None:
        """Send lines a stage copy wrote, as :meth:`send_output` does a chunk's."""
        _, pipe_id, stage, copy, _ = key
        self._send_lines(wire.PIPE_OUTPUT, (pipe_id, stage, copy, self.factory.name), dropped,
                         payload)

    def _send_lines(self, code: int, head: tuple, dropped: int, payload: bytes) -> None:
        pieces = wire.encode_message(code, head + (dropped, payload))
        try:
            self.check_size(pieces)
        except FrameTooLarge:
            count = len(decode_lines(payload))
            pieces = wire.encode_message(code, head + (dropped + count, encode_lines([])))
        self.send_encoded(pieces)

    def send_tail(self, task: Task, lines: List[list]) -> None:
        """Send a failed chunk's last lines (the oldest go while they do not fit a frame)."""
        lines = list(lines)
        while lines:
            pieces = wire.encode_message(wire.OUTPUT_TAIL, (task.job_id, task.chunk_id,
                                                            self.factory.name,
                                                            encode_lines(lines)))
            try:
                self.check_size(pieces)
            except FrameTooLarge:
                lines.pop(0)
                continue
            self.send_encoded(pieces)
            return

    def send_result(self, task: Task, status: int, payload: bytes, elapsed: float) -> None:
        """Send a chunk's outcome; one too large to send is turned into a FrameTooLarge error
        for its caller, so it never stalls the job. A failure's last lines of output go
        first."""
        shm_dir = self.factory.shm_dir
        if self.shm_ok and status == wire.OK and task.kind == "map":
            if len(payload) >= self.factory.shm_min or (task.shm is not None
                                                        and shm.is_ref(payload)):
                self.small_results.discard(task.job_id)
            else:
                self.small_results.add(task.job_id)
        if task.shm is not None and shm_dir is not None and status == wire.OK \
                and shm.is_ref(payload) and not shm.fits(payload, self.send_limit):
            # The frame limit holds whichever way a payload travels (the server may have to
            # send these bytes on to a controller on another host).
            size = shm.parse(payload).size
            shm.discard(shm_dir, payload)
            status, payload = wire.ITEM_ERROR, error_record(0, FrameTooLarge(
                f"the results of chunk {task.chunk_id} are {size:,} bytes, over the "
                f"{self.send_limit:,}-byte limit; send less per message (a smaller chunksize, "
                "smaller arguments or results) or raise ACHILLES_MAX_FRAME on every machine"),
                [])
        failures = (batch_failures(payload) if task.kind == "graph" and task.chunk_id < 0
                    and status == wire.OK else [])
        if (status != wire.OK or failures) and task.tail:
            self.send_tail(task, list(task.tail))
        pieces = wire.encode_message(wire.RESULT, (task.job_id, task.chunk_id, status, elapsed,
                                                   self.factory.name, payload))
        try:
            self.check_size(pieces)
        except FrameTooLarge as exc:
            record = error_record(0, FrameTooLarge(
                f"the results of chunk {task.chunk_id} are {len(payload):,} bytes: {exc}"), [])
            pieces = wire.encode_message(wire.RESULT, (task.job_id, task.chunk_id,
                                                       wire.ITEM_ERROR, elapsed,
                                                       self.factory.name, record))
            status, payload = wire.ITEM_ERROR, record
        if status == wire.ITEM_ERROR:
            self.report_error(task, payload)
        for index, record in failures:
            self.report_error(task, record, index)
        self.send_encoded(pieces)

    def report_error(self, task: Task, record: bytes, index: Optional[int] = None) -> None:
        """Tell the server a task's error as plain text (for the dashboard), ahead of its
        result; ``index``: the failed task's place in a batch of graph tasks."""
        text = error_text(record)
        if text is not None:
            lines = [line for line in task.tail or () if index is None or line[0] == index]
            if index is not None:
                text = (index,) + text[1:]
            self.send(wire.TASK_ERROR, task.job_id, task.chunk_id, *text,
                      [line[2] for line in lines])

    def send_stage_out(self, key: CopyKey, seq: int, status: int, n_items: int, skipped: int,
                       exhausted: bool, errors: bytes, payload: bytes) -> None:
        """Send a stage copy's answer; outputs too large to send fail the pipeline instead."""
        _, pipe_id, stage, copy, incarnation = key
        pieces = wire.encode_message(wire.PIPE_OUT, (pipe_id, stage, copy, incarnation, seq,
                                                     status, n_items, skipped, exhausted, errors,
                                                     payload))
        try:
            self.check_size(pieces)
        except FrameTooLarge as exc:
            record = error_record(0, FrameTooLarge(
                f"the outputs of stage copy {stage}.{copy} are {len(payload):,} bytes: {exc}"), [])
            pieces = wire.encode_message(wire.PIPE_OUT, (pipe_id, stage, copy, incarnation, seq,
                                                         wire.ITEM_ERROR, 0, 0, False, b"",
                                                         record))
        self.send_encoded(pieces)


class NodeFactory(protocol.ReconnectingClientFactory):
    """Connects, and reconnects with backoff for as long as the node runs.

    Nothing a peer sends stops the node: a refused or broken handshake (wrong secret, a fake
    or foreign server on the port) is logged as an ERROR and retried, with the backoff capped
    at :attr:`refusedMaxDelay` instead of :attr:`maxDelay` until a handshake succeeds or the
    port stops answering. Only local configuration errors, found before connecting, end it.
    ``retry_max_delay`` (``ACHILLES_RETRY_MAX_DELAY``), when given, caps both waits.
    """

    #: Backoff cap while the server is unreachable.
    reachableMaxDelay = DEFAULT_RETRY_MAX_DELAY
    #: Backoff cap while something on the port answers but the handshake fails.
    refusedMaxDelay = DEFAULT_REFUSED_RETRY_MAX_DELAY
    # Twisted infers int from its default (3600); the backoff caps are seconds, as floats.
    maxDelay = reachableMaxDelay  # type: ignore[assignment]
    initialDelay = 0.5
    factor = 2.0

    def __init__(self, name: str, processes: int, username: str, secret_key: str,
                 address: str, resources: Optional[Dict[str, float]] = None,
                 heartbeat: float = wire.DEFAULT_HEARTBEAT,
                 max_frame: int = wire.DEFAULT_MAX_FRAME,
                 retry_max_delay: Optional[float] = None, shm_dir: Optional[str] = None,
                 shm_min: Optional[int] = None) -> None:
        self.max_frame = max_frame
        if retry_max_delay is not None:
            self.reachableMaxDelay = self.refusedMaxDelay = self.maxDelay = retry_max_delay
            self.initialDelay = self.delay = min(self.initialDelay, retry_max_delay)
        self.name = name
        self.heartbeat = heartbeat
        self.username = username
        self.auth_key = derive_key(username, secret_key)
        #: Shared memory (achilles.core.shm): its directory (None: off), tag key, threshold.
        self.shm_dir = shm.directory(shm_dir)
        self.shm_key = shm.segment_key(self.auth_key) if self.shm_dir is not None else b""
        self.shm_min = shm.threshold(shm_min)
        shm.sweep(self.shm_dir)
        #: Names of result segments, one per map chunk run while shared memory is used.
        self.shm_name = shm.Names()
        self.address = address
        self.resources = dict(resources or {})
        self.current: Optional[NodeProtocol] = None
        self.stopping = False
        self.refusals = 0
        self._sessions = 0
        self.pool = WorkerPool(processes, self._deliver, self._deliver_output,
                               self._deliver_progress,
                               None if self.shm_dir is None else
                               (self.shm_dir, self.shm_key, self.shm_min))
        self.stages = StageHost(name, self._from_stage, self._output_from_stage)

    # Twisted types buildProtocol's result as a protocol with a generic ``factory`` property;
    # NodeProtocol's ``factory`` is this class.
    def buildProtocol(self, addr: Any) -> NodeProtocol:  # type: ignore[override]
        self._sessions += 1
        proto = NodeProtocol(self._sessions, self.clock)
        proto.factory = self
        proto.username = self.username
        proto.auth_key = self.auth_key
        proto.heartbeat = self.heartbeat
        proto.max_frame = self.max_frame
        return proto

    def _deliver_progress(self, task: Task, n: float) -> None:
        proto = self.current
        if proto is not None and proto.session == task.session and not task.cancelled:
            proto.send(wire.TASK_PROGRESS, task.job_id, task.chunk_id, n)

    def _deliver(self, task: Task, status: int, payload: bytes, elapsed: float) -> None:
        proto = self.current
        if proto is not None and proto.session == task.session and proto.state == "ready":
            proto.send_result(task, status, payload, elapsed)
        elif task.shm is not None and status == wire.OK and self.shm_dir is not None:
            shm.discard(self.shm_dir, payload)  # its reference goes nowhere: unlink it

    def _from_stage(self, key: CopyKey, seq: int, status: int, n_items: int, skipped: int,
                    exhausted: bool, errors: bytes, payload: bytes) -> None:
        reactor.callFromThread(self._deliver_stage, key, seq, status, n_items, skipped,
                               exhausted, errors, payload)

    def _deliver_stage(self, key: CopyKey, seq: int, status: int, n_items: int, skipped: int,
                       exhausted: bool, errors: bytes, payload: bytes) -> None:
        proto = self.current
        if proto is not None and proto.session == key[0]:
            proto.send_stage_out(key, seq, status, n_items, skipped, exhausted, errors, payload)

    def _output_from_stage(self, key: CopyKey, lines: List[list], dropped: int) -> None:
        reactor.callFromThread(self._deliver_stage_output, key, dropped, encode_lines(lines))

    def _deliver_stage_output(self, key: CopyKey, dropped: int, payload: bytes) -> None:
        proto = self.current
        if proto is not None and proto.session == key[0]:
            proto.send_stage_output(key, dropped, payload)

    def _deliver_output(self, task: Task, lines: List[list], dropped: int) -> None:
        proto = self.current
        if proto is not None and proto.session == task.session and not task.cancelled:
            proto.send_output(task, dropped, encode_lines(lines))

    def authenticated(self) -> None:
        """A handshake succeeded: back to the short backoff."""
        if self.refusals:
            log.info("handshake with the server at %s succeeded after %d failed attempt(s)",
                     self.address, self.refusals)
        self.refusals = 0
        self.maxDelay = self.reachableMaxDelay
        self.resetDelay()

    def handshake_failed(self, why: str) -> None:
        """Log a failed handshake loudly and keep retrying, more slowly."""
        self.refusals += 1
        self.maxDelay = self.refusedMaxDelay
        log.error("handshake with the server at %s failed (attempt %d): %s. Check that "
                  "ACHILLES_USERNAME and ACHILLES_SECRET_KEY match the server's, that TLS is "
                  "used on both sides or on neither (--tls-ca), and that what listens on %s is "
                  "an Achilles server; retrying with backoff (up to %g s)", self.address,
                  self.refusals, printable(why, 400), self.address, self.maxDelay)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.stopping:
            self.maxDelay = self.reachableMaxDelay
            log.warning("cannot reach the server at %s (%s); retrying", self.address,
                        printable(reason.getErrorMessage()))
        super().clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        if not self.stopping:
            super().clientConnectionLost(connector, reason)

    def stop(self) -> None:
        """Stop reconnecting and stop the reactor."""
        if self.stopping:
            return
        self.stopping = True
        self.stopTrying()
        if self.current is not None:
            self.current.link.loseConnection()
        reactor.callLater(0, reactor.stop)
