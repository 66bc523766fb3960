"""The scheduler: which chunk is queued, which is on which node, and who gets what next.

Pure bookkeeping with no I/O: peers are handles with ``send(code, *fields)``. Dispatch is
credit-based and fair (round-robin over jobs with queued chunks). A node holds at most
``processes x prefetch`` chunks on its base credit, which any job's chunks share. Past that,
chunks of *fast* jobs (a chunk takes at most ``window / depth`` seconds on a worker, by the
job's running estimate; ``window`` defaults to :data:`FAST_WINDOW`) go on the node's fast
credit, ``processes x depth`` units, costing ``ceil(service / (window / depth))`` units each:
a node queues at most about ``window`` seconds of fast work per process beyond its base credit, however
short the chunks, so its workers run back to back without waiting for the server while a lost
node or the end of a job leaves little more of a tail than the base credit does. Slow jobs and
jobs whose chunks have not yet been timed use base credit only, so they keep today's depth. Input is pulled from controllers with ``WANT`` only while a job's
queue runs low, so memory stays bounded whatever the input size.

What a chunk's result means belongs to its job's kind (:mod:`achilles.server.jobs`); which node
gets a chunk belongs to the dispatch policy (:mod:`achilles.server.dispatch`). The scheduler
keeps the rest: nodes, credit, the round-robin of ready jobs, and the chunk -> node index
(``job.placed``), always in step with every node's ``inflight``; :meth:`Scheduler.check_invariants`
verifies all of it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import pickle
from typing import Any, Deque, Dict, Iterator, List, Optional, Set, Tuple

from achilles.core import shm, wire
from achilles.core.config import DEFAULT_FAST_DEPTH, DEFAULT_FAST_WINDOW
from achilles.core.errors import ProtocolError
from achilles.core.logs import printable
from achilles.core.output import TAIL_LINES, decode_lines, encode_lines
from achilles.core.serialization import error_record
from achilles.server.dispatch import (DispatchPolicy, FreeSlots, LeastLoaded, NodeState, Peer,
                                     fast_free)
from achilles.server.graphs import GraphState
from achilles.server.jobs import (Chunk, ControllerState, GraphJob, Job, JobGroup, MapJob,
                                  check_options)
from achilles.server.observer import SchedulerObserver

log = logging.getLogger("achilles.server")

INITIAL_CREDIT = wire.INITIAL_CREDIT
DEFAULT_MAX_CRASHES = wire.DEFAULT_MAX_CRASHES
#: A node advertising more worker processes than this is taken to have this many.
MAX_NODE_PROCESSES = 4096
#: No WANT asks a controller for more chunks than this at once.
MAX_WANT = 1024
#: A finished job's JOB_DONE waits this long (seconds) to share one message with others.
JOB_DONE_DELAY = 0.05
#: ... or until this many finished jobs are waiting for one node.
JOB_DONE_BATCH = 256
#: Seconds between two JOB_PROGRESS messages for one watched job (changes are coalesced).
PROGRESS_INTERVAL = 0.25
#: Fast credit units per node process (``Scheduler(depth=...)``; 0 turns fast credit off).
DEFAULT_DEPTH = DEFAULT_FAST_DEPTH
#: Seconds of estimated work a node may queue per process on fast credit (``window=...``).
FAST_WINDOW = DEFAULT_FAST_WINDOW
#: Free fast credit units a node must have before it is handed fast work (at most ``depth``).
#: A node is then given a fast job's chunks for up to that many units in one turn (so a new
#: job's chunks spread over all nodes first): one frame to it carries several, and their
#: results come back several to a frame, instead of each result freeing one unit that one new
#: chunk refills, a frame each way per chunk.
FAST_GROUP = 8
#: Result status codes a node may report.
KNOWN_STATUSES = frozenset({wire.OK, wire.ITEM_ERROR, wire.CRASHED, wire.TIMED_OUT})

__all__ = ["Chunk", "ControllerState", "GraphJob", "Job", "MapJob", "NodeState", "Peer",
           "Scheduler", "INITIAL_CREDIT", "DEFAULT_MAX_CRASHES", "MAX_NODE_PROCESSES", "MAX_WANT",
           "DEFAULT_DEPTH", "FAST_WINDOW"]


class Scheduler:
    """Tracks nodes, controllers and jobs, and moves chunks between them.

    ``clock`` is an ``IReactorTime`` (default: the global reactor, imported when first needed);
    retry delays use ``clock.callLater`` and durations ``clock.seconds()``. ``depth`` is each
    node's fast credit in units per process (0: none), ``window`` the seconds of work those
    units stand for.
    """

    def __init__(self, prefetch: int = 2, max_crashes: int = DEFAULT_MAX_CRASHES,
                 clock: Any = None, policy: Optional[DispatchPolicy] = None,
                 depth: int = DEFAULT_DEPTH, window: float = FAST_WINDOW) -> None:
        self.prefetch = prefetch
        #: Shared-memory references (ShmRelay), when this server published a probe.
        self.shm: Any = None
        self.depth = max(0, depth)
        self._unit = window / self.depth if self.depth else 0.0
        self._fast_min = max(1, min(FAST_GROUP, self.depth))
        self.max_crashes = max_crashes
        self._clock = clock
        self.policy = policy or LeastLoaded()
        self.nodes: Dict[int, NodeState] = {}
        self.controllers: Dict[int, ControllerState] = {}
        self.jobs: Dict[str, Job] = {}
        self.groups: Dict[Tuple[int, str], JobGroup] = {}  # max_active caps
        self._ready: Deque[str] = collections.deque()  # job ids with queued chunks, round-robin
        self._ready_set: Set[str] = set()
        self._free = FreeSlots()
        self._fast = FreeSlots(fast_free)
        self._processes = 0
        self._capacity = 0
        self._fast_capacity = 0
        self._next_id = 1
        self._batch_depth = 0
        self._pump_pending = False
        self._refill_pending: Dict[str, Job] = {}
        #: Told about joins, losses, job ends and failures (the dashboard's monitor).
        self.observer = SchedulerObserver()
        self._progress_dirty: Dict[str, Job] = {}  # watched jobs changed since the last JOB_PROGRESS
        self._progress_call: Any = None  # the pending flush, if any

    @property
    def clock(self) -> Any:
        """The ``IReactorTime`` used for timers and durations."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # --- batches ----------------------------------------------------------------------------
    def begin_batch(self) -> None:
        """Hold dispatch and input requests until the matching :meth:`end_batch`.

        The server wraps each read from a peer in a batch, so the messages of one read (a
        SUBMIT, its CHUNKs and END, say) are all applied before anything is dispatched or asked
        for: a job whose whole input arrived at once is never sent a WANT.
        """
        self._batch_depth += 1

    def end_batch(self) -> None:
        """Close a batch; the outermost one runs the refills and the dispatch it held."""
        self._batch_depth -= 1
        if self._batch_depth == 0 and (self._pump_pending or self._refill_pending):
            self._flush()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """``with scheduler.batch():`` brackets :meth:`begin_batch` / :meth:`end_batch`."""
        self.begin_batch()
        try:
            yield
        finally:
            self.end_batch()

    def _flush(self) -> None:
        while self._refill_pending or self._pump_pending:
            pending, self._refill_pending = self._refill_pending, {}
            for job in pending.values():
                if self.jobs.get(job.job_id) is job:
                    self._refill(job)
            if self._pump_pending:
                self._pump_pending = False
                self.pump()

    # --- cluster shape ----------------------------------------------------------------------
    @property
    def processes(self) -> int:
        """Worker processes across all nodes."""
        return self._processes

    @property
    def capacity(self) -> int:
        """Chunks the nodes can hold in flight on base credit."""
        return self._capacity

    @property
    def fast_capacity(self) -> int:
        """Fast credit units of all nodes."""
        return self._fast_capacity

    def where(self, job_id: str, chunk_id: int) -> Optional[NodeState]:
        """The node a chunk is in flight on, if any."""
        job = self.jobs.get(job_id)
        return None if job is None else job.placed.get(chunk_id)

    # --- peers ------------------------------------------------------------------------------
    def add_node(self, peer: Peer, name: str, address: str, processes: int, hostname: str = "",
                 pid: int = 0, resources: Optional[Dict[str, float]] = None) -> NodeState:
        """Register an authenticated node; it gets work at once."""
        count = max(1, int(processes))
        if count > MAX_NODE_PROCESSES:
            log.warning("node %s at %s claims %d processes; counting it as %d", name, address,
                        count, MAX_NODE_PROCESSES)
            count = MAX_NODE_PROCESSES
        node = NodeState(peer, self._new_id(), name, address, count, self.prefetch, hostname, pid,
                         dict(resources or {}), depth=self.depth)
        self.nodes[node.node_id] = node
        self._processes += node.processes
        self._capacity += node.capacity
        self._fast_capacity += node.fast_capacity
        self._free.add(node)
        self._fast.add(node)
        log.info("node %s joined from %s with %d processes", name, address, node.processes)
        self.observer.node_joined(node)
        for job in list(self.jobs.values()):
            self._refill(job)
            job.node_joined(node)
        self.pump()
        return node

    def remove_node(self, node: NodeState) -> None:
        """Forget a node; every chunk it had in flight goes back to the front of its job's queue."""
        current = self.nodes.get(node.node_id)
        if current is None or current is not node:
            return
        del self.nodes[node.node_id]
        self._free.discard(node)
        self._fast.discard(node)
        self._processes -= node.processes
        self._capacity -= node.capacity
        self._fast_capacity -= node.fast_capacity
        requeued = 0
        for chunk in sorted(node.inflight.values(), key=lambda c: c.chunk_id, reverse=True):
            job = self.jobs[chunk.job_id]  # placed entries are dropped with their job
            del job.placed[chunk.chunk_id]
            if job.group is not None:
                job.group.active -= 1
            job.unreport(chunk)
            chunk.fast = 0
            job.retried += 1
            self._progress_changed(job)
            job.requeue(chunk)
            self._mark_ready(job)
            requeued += 1
        node.inflight.clear()
        node.used.clear()
        node.held = node.fast_held = 0
        for job_id in node.jobs_shipped:
            self.jobs[job_id].shipped_to.pop(node.node_id, None)
        node.jobs_shipped.clear()
        if node.done_call is not None and node.done_call.active():
            node.done_call.cancel()
        node.done_call = None
        node.done_pending.clear()
        log.warning("node %s lost; %d chunk(s) re-queued", node.name, requeued)
        if self.shm is not None:
            self.shm.peer_lost()
        self.observer.node_lost(node, requeued)
        for job in list(self.jobs.values()):
            self._check_resources(job, force=True)
        for job in list(self.jobs.values()):
            if self.jobs.get(job.job_id) is job:
                job.node_lost(node)
        self.pump()

    def add_controller(self, peer: Peer, address: str) -> ControllerState:
        """Register an authenticated controller."""
        ctrl = ControllerState(peer, self._new_id(), address)
        self.controllers[ctrl.controller_id] = ctrl
        log.info("controller %d connected from %s", ctrl.controller_id, address)
        return ctrl

    def remove_controller(self, ctrl: ControllerState) -> None:
        """Forget a controller and cancel its jobs everywhere."""
        if self.controllers.pop(ctrl.controller_id, None) is None:
            return
        for job_id in list(ctrl.jobs):
            self.cancel(ctrl, job_id, "controller disconnected")
        if self.shm is not None:
            self.shm.peer_lost()
        log.info("controller %d disconnected", ctrl.controller_id)

    # --- jobs -------------------------------------------------------------------------------
    def submit(self, ctrl: ControllerState, job_id: str, function: str, func_bytes: bytes,
               callback_bytes: bytes, options: Dict[str, Any]) -> None:
        """Start a job; its chunks follow in CHUNK messages. Options of the wrong type or
        range refuse the job (JOB_FAILED, saying which)."""
        options = dict(options or {})
        problem = check_options(options)
        if problem is not None:
            ctrl.peer.send(wire.JOB_FAILED, job_id, f"job refused: {problem}")
            return
        if not self._claim(ctrl, job_id, "job"):
            return
        job = MapJob(job_id, ctrl, printable(function), func_bytes, callback_bytes, options,
                     self.clock.seconds())
        self._start(job)
        if "max_active" in options:
            self._join_group(job, options.get("group") or f"job:{job_id}",
                             options["max_active"])
        log.info("job %s started by controller %d: %s", job_id[:8], ctrl.controller_id, job.function)
        if not self.nodes:
            log.warning("job %s is waiting: no node is connected", job_id[:8])
        self._refill(job)

    def _claim(self, ctrl: ControllerState, job_id: str, what: str) -> bool:
        """Whether ``ctrl`` may start a job under ``job_id``.

        A job id is the capability of the controller that made it (128 random bits, never
        shown to other controllers: status shows a prefix). A controller that lost its link
        resubmits its unanswered work under the same id, possibly before the server has noticed
        the old connection is dead: then the old copy is dropped (results still in flight for
        it are discarded, so none is delivered twice) and the job starts afresh here.
        """
        old = self.jobs.get(job_id)
        if old is None:
            return True
        if old.owner is ctrl:
            ctrl.peer.send(wire.JOB_FAILED, job_id, f"{what} id {job_id[:8]} is already in use")
            return False
        log.warning("%s %s resumed by controller %d; dropping its copy from controller %d",
                    what, job_id[:8], ctrl.controller_id, old.owner.controller_id)
        old.state = "cancelled"
        self.observer.job_ended(old, "resumed on another connection")
        self._drop(old, "resumed on another connection")
        return True

    def _start(self, job: Job) -> None:
        self.jobs[job.job_id] = job
        job.owner.jobs.add(job.job_id)
        self.observer.job_started(job)

    def _join_group(self, job: Job, name: str, limit: int) -> None:
        """Count ``job`` against its controller's group ``name`` (made with cap ``limit`` by
        its first job; later jobs share that cap)."""
        key = (job.owner.controller_id, name)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = JobGroup(key, limit)
        group.jobs.add(job.job_id)
        job.group = group

    def add_chunk(self, ctrl: ControllerState, job_id: str, chunk_id: int, n_items: int,
                  payload: bytes) -> None:
        """Queue a chunk of input. A malformed or repeated chunk raises ProtocolError."""
        job = self._owned(ctrl, job_id)
        if job is None:
            return
        if not isinstance(job, MapJob):
            raise ProtocolError(f"CHUNK for {job.kind} job {job_id[:8]}, which takes no chunks")
        if not isinstance(chunk_id, int) or not isinstance(n_items, int) or n_items < 0:
            raise ProtocolError(f"CHUNK for job {job_id[:8]} has a malformed chunk id or item count")
        if job.is_live(chunk_id):
            raise ProtocolError(f"chunk {chunk_id} of job {job_id[:8]} was sent twice")
        job.add(Chunk(job_id, chunk_id, n_items, bytes(payload)))
        self._mark_ready(job)
        self.pump()

    def end(self, ctrl: ControllerState, job_id: str, n_chunks: int) -> None:
        """The controller's input is exhausted after ``n_chunks`` chunks."""
        job = self._owned(ctrl, job_id)
        if not isinstance(job, MapJob):
            return
        if not isinstance(n_chunks, int) or n_chunks < 0:
            raise ProtocolError(f"END for job {job_id[:8]} has a malformed chunk count")
        job.n_chunks = n_chunks
        job.credit = 0
        self._maybe_finish(job)

    def cancel(self, ctrl: ControllerState, job_id: str, reason: str = "cancelled") -> None:
        """Drop a job: queued chunks are discarded and nodes stop its work."""
        job = self._owned(ctrl, job_id)
        if job is None:
            return
        job.state = "cancelled"
        log.info("job %s cancelled: %s", job_id[:8], reason)
        self.observer.job_ended(job, reason)
        self._drop(job, reason)

    def _owned(self, ctrl: ControllerState, job_id: str) -> Optional[Job]:
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None or job.owner is not ctrl:
            return None
        return job

    def _forget(self, job: Job, code: int, *fields: Any) -> None:
        """Remove a job everywhere, telling each node that holds its code with ``code``."""
        job.drop()
        self.jobs.pop(job.job_id, None)
        job.owner.jobs.discard(job.job_id)
        if job.job_id in self._ready_set:
            self._ready_set.discard(job.job_id)
            self._ready.remove(job.job_id)
        for chunk_id, node in job.placed.items():
            self._unplace(node, node.inflight.pop((job.job_id, chunk_id)))
        group = job.group
        if group is not None:
            group.active -= len(job.placed)
            group.jobs.discard(job.job_id)
            if not group.jobs:
                del self.groups[group.key]
            job.group = None
        job.placed.clear()
        for node in job.shipped_to.values():
            node.jobs_shipped.discard(job.job_id)
            if code == wire.JOB_DONE:
                self._done_later(node, job.job_id)
            else:
                node.peer.send(code, job.job_id, *fields)
        job.shipped_to.clear()

    def _done_later(self, node: NodeState, job_id: str) -> None:
        """Queue a JOB_DONE for ``node``: finished jobs share one message per node."""
        node.done_pending[job_id] = None
        if len(node.done_pending) >= JOB_DONE_BATCH:
            self._send_done(node)
        elif node.done_call is None:
            node.done_call = self.clock.callLater(JOB_DONE_DELAY, self._send_done, node)

    def _send_done(self, node: NodeState) -> None:
        if node.done_call is not None:
            if node.done_call.active():
                node.done_call.cancel()
            node.done_call = None
        if node.done_pending and self.nodes.get(node.node_id) is node:
            node.peer.send(wire.JOB_DONE, list(node.done_pending))
        node.done_pending.clear()

    def settle(self, job: Job) -> None:
        """A job's state changed outside a chunk's result (a pipeline): finish it if done."""
        if self.jobs.get(job.job_id) is job:
            self._maybe_finish(job)

    def abort(self, job: Job, reason: str) -> None:
        """End a running job that failed by itself; nodes stop its work."""
        if self.jobs.get(job.job_id) is job and job.state == "running":
            job.state = "failed"
            log.info("job %s failed: %s", job.job_id[:8], reason)
            self._drop(job, reason)

    # --- pipelines --------------------------------------------------------------------------
    def submit_pipeline(self, ctrl: ControllerState, pipe_id: str, name: str, stages: List[Any],
                        options: Dict[str, Any]) -> None:
        """Start a stage pipeline (:mod:`achilles.server.pipelines`)."""
        from achilles.server.pipelines import build

        if not self._claim(ctrl, pipe_id, "pipeline"):
            return
        try:
            job = build(pipe_id, ctrl, printable(name), stages, dict(options or {}),
                        self.clock.seconds(), self)
        except (ValueError, TypeError, KeyError) as exc:
            ctrl.peer.send(wire.JOB_FAILED, pipe_id, f"malformed pipeline: {exc}")
            return
        self._start(job)
        log.info("pipeline %s started by controller %d: %d stages", pipe_id[:8],
                 ctrl.controller_id, len(job.stages))
        job.start()

    def pipeline(self, ctrl: ControllerState, pipe_id: str) -> Any:
        """``ctrl``'s running pipeline ``pipe_id``, or None."""
        job = self._owned(ctrl, pipe_id)
        return job if job is not None and job.kind == "pipeline" else None

    def _drop(self, job: Job, reason: str) -> None:
        self._forget(job, wire.CANCEL, reason)
        self.pump()

    def _maybe_finish(self, job: Job) -> None:
        if job.state == "running" and job.finished:
            if job.watched:  # the final figures, before the job's last message
                self._progress_dirty.pop(job.job_id, None)
                self._send_progress(job)
            job.state = "done"
            job.on_finish()
            self._forget(job, wire.JOB_DONE)
            log.info("job %s finished: %d items in %.3f s", job.job_id[:8], job.items_done,
                     self.clock.seconds() - job.started)
            self.observer.job_ended(job)

    # --- results ----------------------------------------------------------------------------
    def result(self, node: NodeState, job_id: str, chunk_id: int, status: int, payload: bytes,
               elapsed: float) -> None:
        """A node finished a chunk. Late or unknown results are dropped, so none counts twice.

        A malformed result raises :class:`ProtocolError` before anything changes, leaving the
        chunk in flight; dropping the node then re-queues it.
        """
        if not isinstance(job_id, str) or not isinstance(chunk_id, int):
            raise ProtocolError("RESULT with a malformed job or chunk id")
        if status not in KNOWN_STATUSES:
            raise ProtocolError(f"RESULT for chunk {chunk_id} of job {job_id[:8]} has unknown "
                                f"status {status!r}")
        if not isinstance(elapsed, (int, float)) or not isinstance(payload, (bytes, bytearray,
                                                                             memoryview)):
            raise ProtocolError(f"RESULT for chunk {chunk_id} of job {job_id[:8]} is malformed")
        job = self.jobs.get(job_id)
        if job is None or job.state != "running" or job.placed.get(chunk_id) is not node:
            if self.shm is not None:
                self.shm.drop(status, payload)
            return
        crash = self._crash_info(payload, job_id, chunk_id) if status == wire.CRASHED else None
        if crash is None and 0.0 <= elapsed < float("inf"):
            self._observe(job, float(elapsed))

        chunk = node.inflight.pop((job_id, chunk_id))
        del job.placed[chunk_id]
        if job.group is not None:
            job.group.active -= 1
        self._unplace(node, chunk)
        if chunk.reported:
            job.unreport(chunk)
        if job.watched:
            self._progress_changed(job)
        if crash is not None:
            exitcode, item = crash
            chunk.crashes += 1
            self.observer.worker_crashed(job, chunk, node, exitcode,
                                         chunk.crashes < self.max_crashes)
            if chunk.crashes < self.max_crashes:
                job.retried += 1
                log.warning("chunk %d of job %s killed a worker on node %s (%s); retrying it "
                            "(%d of %d)", chunk_id, job_id[:8], node.name, exitcode,
                            chunk.crashes, self.max_crashes)
                job.requeue(chunk)
                self._mark_ready(job)
                self.pump()
                return
            payload = pickle.dumps((exitcode, item, chunk.crashes))
        if self.shm is not None:
            status, payload = self.shm.to_controller(
                job.owner.peer if isinstance(job, MapJob) else None, node, status, payload)
        if status == wire.OK:
            node.done += chunk.n_items
        else:
            self.observer.chunk_failed(job, chunk, status, node, crash)
            job.send_tail(chunk, node)
        delay = job.on_result(chunk, status, payload, elapsed, node)
        if delay is not None:
            self._retry_later(job, chunk, delay)
        self._settle(job)
        self.pump()

    # --- task output ------------------------------------------------------------------------
    def _running_on(self, node: NodeState, job_id: str, chunk_id: int) -> Optional[Job]:
        """The job if ``chunk_id`` of it is in flight on ``node`` (else output is late: dropped)."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "running" or job.placed.get(chunk_id) is not node:
            return None
        return job

    def output(self, node: NodeState, job_id: str, chunk_id: int, dropped: int,
               payload: bytes) -> None:
        """Lines a chunk running on ``node`` wrote: relayed to its job's owner only."""
        if dropped < 0:
            raise ProtocolError(f"OUTPUT for chunk {chunk_id} of job {job_id[:8]} drops "
                                f"{dropped} lines")
        lines = decode_lines(payload)
        job = self._running_on(node, job_id, chunk_id)
        if job is not None and job.forwards_output:
            job.relay_output(chunk_id, node.name, dropped, lines, payload)

    def output_tail(self, node: NodeState, job_id: str, chunk_id: int, payload: bytes) -> None:
        """The last lines of a chunk whose failed result comes next: kept with the chunk."""
        lines = decode_lines(payload)[-TAIL_LINES:]
        job = self._running_on(node, job_id, chunk_id)
        if job is not None:
            node.inflight[(job_id, chunk_id)].tail = (lines, encode_lines(lines))
    def progress(self, node: NodeState, job_id: str, chunk_id: int, n: float) -> None:
        """A task running on ``node`` reported ``n`` more items done (TASK_PROGRESS). Reports
        for chunks no longer in flight there are dropped; a malformed one raises ProtocolError."""
        if not isinstance(n, (int, float)) or not 0 < n < float("inf"):
            raise ProtocolError(f"TASK_PROGRESS for chunk {chunk_id} of job {job_id[:8]} "
                                f"reports {n!r} items")
        job = self._running_on(node, job_id, chunk_id)
        if job is not None and job.report(node.inflight[(job_id, chunk_id)], float(n)):
            self._progress_changed(job)

    def watch(self, ctrl: ControllerState, job_id: str) -> None:
        """Send JOB_PROGRESS for one of ``ctrl``'s jobs from now on (WATCH)."""
        job = self._owned(ctrl, job_id)
        if job is not None and not job.watched:
            job.watched = True
            self._progress_changed(job)

    def _progress_changed(self, job: Job) -> None:
        """A watched job's figures moved: send them with the next flush (at most one
        JOB_PROGRESS per job every :data:`PROGRESS_INTERVAL` seconds)."""
        if not job.watched:
            return
        self._progress_dirty[job.job_id] = job
        if self._progress_call is None:
            self._progress_call = self.clock.callLater(PROGRESS_INTERVAL, self._flush_progress)

    def _flush_progress(self) -> None:
        self._progress_call = None
        dirty, self._progress_dirty = self._progress_dirty, {}
        for job_id, job in dirty.items():
            if self.jobs.get(job_id) is job and job.state == "running":
                self._send_progress(job)

    def _send_progress(self, job: Job) -> None:
        job.owner.peer.send(wire.JOB_PROGRESS, job.job_id, *job.progress())

    @staticmethod
    def _crash_info(payload: Any, job_id: str, chunk_id: int) -> Tuple[Any, Any]:
        """Decode a CRASHED payload, ``(exitcode, item)``, or raise ProtocolError."""
        try:
            info = pickle.loads(payload)
        except Exception:
            info = None
        if (not isinstance(info, tuple) or len(info) != 2
                or not all(v is None or isinstance(v, int) for v in info)):
            raise ProtocolError(f"CRASHED result for chunk {chunk_id} of job {job_id[:8]} does not "
                                "carry (exitcode, item)")
        return info[0], info[1]

    def _settle(self, job: Job) -> None:
        """After a job's queue or counters changed: ready it, finish it, or ask for input."""
        if job.recheck:
            self._check_resources(job)
        if job.queue:
            self._mark_ready(job)
        self._maybe_finish(job)
        self._refill(job)

    def _retry_later(self, job: Job, chunk: Chunk, delay: float) -> None:
        if delay <= 0:
            job.requeue(chunk)
            return
        job.retrying[chunk.chunk_id] = chunk
        job.retry_calls[chunk.chunk_id] = self.clock.callLater(delay, self._retry, job, chunk)

    def _retry(self, job: Job, chunk: Chunk) -> None:
        job.retry_calls.pop(chunk.chunk_id, None)
        live = job.job_id in self.jobs and self.jobs[job.job_id] is job
        waiting = job.retrying.pop(chunk.chunk_id, None) if live else None
        if waiting is not None:
            job.requeue(waiting)
            self._mark_ready(job)
            self.pump()

    # --- dispatch ---------------------------------------------------------------------------
    def _observe(self, job: Job, elapsed: float) -> None:
        """A chunk of ``job`` took ``elapsed`` seconds: reprice its chunks' fast credit."""
        service = job.observe(elapsed)
        if self.depth:
            cost = max(1, math.ceil(service / self._unit))
            job.fast_cost = cost if cost <= self.depth else 0

    def _mark_ready(self, job: Job) -> None:
        if job.job_id not in self._ready_set:
            self._ready_set.add(job.job_id)
            self._ready.append(job.job_id)

    def _refill(self, job: Job) -> None:
        """Ask the controller for more input when the job's queue runs low."""
        if not isinstance(job, MapJob) or not job.wants_input():
            return
        if self._batch_depth:
            self._refill_pending[job.job_id] = job
            return
        processes, capacity = self._processes, self._capacity
        if job.fast_cost:  # its chunks also fill the nodes' fast credit
            capacity += self._fast_capacity // job.fast_cost
        if job.group is not None:  # a capped job sizes its chunks for the processes it may use
            processes = min(processes, job.group.limit)
            capacity = min(capacity, job.group.limit * self.prefetch)
        target = max(2, capacity)
        want = target - len(job.queue) - job.credit
        if want > 0 and (want >= max(1, target // 2) or not job.queue):
            want = min(want, MAX_WANT)
            job.credit += want
            job.owner.peer.send(wire.WANT, job.job_id, want, processes, capacity)

    def pump(self) -> None:
        """Hand queued chunks to nodes with free credit, one job at a time in turn: a fast
        job's chunks a group at a time to a node with :data:`FAST_GROUP` units of fast credit
        free, else (and any other job's) one chunk on base credit."""
        if self._batch_depth:
            self._pump_pending = True
            return
        blocked: List[Job] = []
        while self._ready and (self._free.top > 0 or self._fast.top >= self._fast_min):
            job_id = self._ready.popleft()
            self._ready_set.discard(job_id)
            job = self.jobs[job_id]  # ready holds only live jobs
            if not job.queue:
                continue
            if job.group is not None and job.group.full:  # held until one of its chunks ends
                blocked.append(job)
                continue
            if self._fast_fits(job):
                node = self._fast.best()
                assert node is not None
                self._fast_group(job, node)
                if job.queue:
                    self._mark_ready(job)
                continue
            pick = self.policy.pick(job, self._free) if self._free.top > 0 else None
            if pick is None:  # nothing of this job fits a free node now
                blocked.append(job)
                continue
            index, node = pick
            chunk = job.take(index, self._capacity)
            if job.queue:
                self._mark_ready(job)
            self._dispatch(node, job, chunk)
        for job in blocked:
            if self.jobs.get(job.job_id) is job:
                self._mark_ready(job)

    def _fast_fits(self, job: Job) -> bool:
        """Whether ``job``'s next chunk may go on some node's fast credit now."""
        return (0 < job.fast_cost <= self._fast.top and self._fast.top >= self._fast_min
                and bool(job.queue) and not job.queue[0].resources)

    def _fast_group(self, job: Job, node: NodeState) -> None:
        """Give ``node`` a group of ``job``'s queued chunks: :data:`FAST_GROUP` units of them
        (all its free fast credit when less than two groups' worth is free), so a new job's
        chunks spread over all nodes first."""
        cost = job.fast_cost
        free = node.fast_free
        limit = free if free < 2 * self._fast_min else self._fast_min
        given = 0
        while (given < limit and job.queue and node.fast_free >= cost
               and not job.queue[0].resources and (job.group is None or not job.group.full)):
            self._dispatch(node, job, job.take(0, self._capacity), cost)
            given += cost

    def _dispatch(self, node: NodeState, job: Job, chunk: Chunk, fast: int = 0) -> None:
        """Place ``chunk`` on ``node``: on ``fast`` units of its fast credit, or (0) on one
        chunk of its base credit."""
        if job.job_id not in node.jobs_shipped:
            node.jobs_shipped.add(job.job_id)
            node.done_pending.pop(job.job_id, None)  # the same id again: keep its new code
            job.shipped_to[node.node_id] = node
            node.peer.send(wire.JOB_CODE, job.job_id, job.func_bytes, job.callback_bytes, job.options)
        if chunk.resources:
            for k, v in chunk.resources.items():
                node.used[k] = node.used.get(k, 0.0) + v
        node.inflight[(job.job_id, chunk.chunk_id)] = chunk
        job.placed[chunk.chunk_id] = node
        if job.group is not None:
            job.group.active += 1
        chunk.tail = None
        chunk.fast = fast
        if fast:
            node.fast_held += fast
            self._fast.update(node)
        else:
            node.held += 1
            self._free.update(node)
        job.on_dispatch(chunk, node)
        payload = chunk.payload
        if self.shm is not None:
            try:
                payload = self.shm.to_node(node, payload)
            except shm.ShmError as exc:  # failed as if the node had answered so, next turn
                self.clock.callLater(0, self._undeliverable, node, job.job_id, chunk.chunk_id,
                                     exc)
                self._refill(job)
                return
        node.peer.send(wire.TASK, job.job_id, chunk.chunk_id, chunk.crashes > 0, chunk.timeout,
                       payload)
        self._refill(job)

    def _undeliverable(self, node: NodeState, job_id: str, chunk_id: int,
                       exc: BaseException) -> None:
        """Chunk ``chunk_id`` placed on ``node`` could not be sent to it: it fails with
        ``exc`` (unless the node was lost meanwhile and the chunk went elsewhere)."""
        with self.batch():
            self.result(node, job_id, chunk_id, wire.ITEM_ERROR, error_record(0, exc, []), -1.0)

    def _unplace(self, node: NodeState, chunk: Chunk) -> None:
        """``chunk`` left ``node``'s inflight: give back its resources and credit."""
        if chunk.resources:
            for k, v in chunk.resources.items():
                node.used[k] = node.used.get(k, 0.0) - v
        if chunk.fast:
            node.fast_held -= chunk.fast
            chunk.fast = 0
            self._fast.update(node)
        else:
            node.held -= 1
            self._free.update(node)

    # --- graphs -----------------------------------------------------------------------------
    def submit_graph(self, ctrl: ControllerState, graph_id: str, funcs: bytes,
                     tasks: List[Tuple[Any, ...]], outputs: List[int]) -> None:
        """Start a call graph: tasks run as soon as their inputs are done."""
        if not self._claim(ctrl, graph_id, "graph"):
            return
        try:
            graph = GraphState(tasks, outputs)
        except (ValueError, TypeError) as exc:
            ctrl.peer.send(wire.JOB_FAILED, graph_id, f"malformed graph: {exc}")
            return
        job = GraphJob(graph_id, ctrl, funcs, graph, self.clock.seconds())
        self._start(job)
        log.info("graph %s started by controller %d: %d tasks", graph_id[:8],
                 ctrl.controller_id, len(graph.tasks))
        job.start()
        self._settle(job)
        self.pump()

    def _check_resources(self, job: Job, force: bool = False) -> None:
        """Fail queued chunks that ask for resources no connected node offers."""
        if not self.nodes or job.state != "running" or not (force or job.recheck):
            return
        job.unplaceable(self.nodes.values())
        if job.queue:
            self._mark_ready(job)
        self._maybe_finish(job)

    # --- status -----------------------------------------------------------------------------
    def status(self) -> Dict[str, List[Dict[str, Any]]]:
        """A JSON-serializable picture of the cluster."""
        return {
            "nodes": [
                {"name": n.name, "address": n.address, "processes": n.processes,
                 "busy": len(n.inflight), "done": n.done, "hostname": n.hostname,
                 "connected_since": n.connected_since, "resources": dict(n.resources),
                 "load": dict(n.load),
                 "shm": {"shared": bool(getattr(n.peer, "shm_ok", False)),
                         "tasks": n.shm_tasks, "results": n.shm_results}}
                for n in self.nodes.values()
            ],
            "jobs": [j.status() for j in self.jobs.values()],
        }

    # --- invariants -------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent anywhere (for tests)."""
        assert self._processes == sum(n.processes for n in self.nodes.values()), "processes total"
        assert self._capacity == sum(n.capacity for n in self.nodes.values()), "capacity total"
        assert self._fast_capacity == sum(n.fast_capacity for n in self.nodes.values()), \
            "fast capacity total"
        self._free.check(self.nodes)
        self._fast.check(self.nodes)
        placed: Dict[Tuple[str, int], NodeState] = {}
        for job_id, job in self.jobs.items():
            assert job.job_id == job_id and job.state == "running", f"job {job_id} is {job.state}"
            assert job.owner.controller_id in self.controllers, \
                f"job {job_id} belongs to a departed controller"
            assert job_id in job.owner.jobs, f"job {job_id} missing from its controller's jobs"
            assert not job.finished, f"job {job_id} is finished but still listed"
            job.check()
            reported = 0.0
            for chunk_id, node in job.placed.items():
                placed[(job_id, chunk_id)] = node
                chunk = node.inflight[(job_id, chunk_id)]
                assert 0 <= chunk.reported <= chunk.n_items, f"chunk {chunk_id} over-reported"
                reported += chunk.reported
            assert abs(job.reported - reported) < 1e-6, \
                f"job {job_id} counts {job.reported} reported items, its chunks {reported}"
            assert all(c.reported == 0 for c in job.queue), f"job {job_id}: a queued chunk has progress"
            for node_id, node in job.shipped_to.items():
                assert node_id in self.nodes and self.nodes[node_id] is node, \
                    f"job {job_id} shipped to departed node {node_id}"
                assert job_id in node.jobs_shipped, \
                    f"job {job_id} shipped to node {node_id} out of step"
            if job.queue:
                assert job_id in self._ready_set, f"job {job_id} has queued chunks but is not ready"
            if isinstance(job, MapJob) and job.n_chunks is not None:
                assert job.credit == 0
            assert all(c.fast == 0 for c in job.queue), f"job {job_id}: a queued chunk holds credit"
            assert 0 <= job.fast_cost <= self.depth, f"job {job_id} costs {job.fast_cost} units"
            if job.fast_cost:
                assert job.service is not None and \
                    job.fast_cost == max(1, math.ceil(job.service / self._unit)), \
                    f"job {job_id}: fast cost {job.fast_cost} for {job.service} s chunks"
        inflight = 0
        for node_id, node in self.nodes.items():
            assert node.node_id == node_id
            on_fast = [c for c in node.inflight.values() if c.fast]
            assert node.held == len(node.inflight) - len(on_fast), f"node {node.name} base count"
            assert node.fast_held == sum(c.fast for c in on_fast), f"node {node.name} fast count"
            assert 0 <= node.held <= node.capacity, f"node {node.name} over its base credit"
            assert 0 <= node.fast_held <= node.fast_capacity, f"node {node.name} over its fast credit"
            assert all(not c.resources and 1 <= c.fast <= self.depth for c in on_fast), \
                f"node {node.name} holds a chunk on fast credit it may not have"
            assert len(node.inflight) <= node.processes * (node.prefetch + node.depth)
            assert node.capacity == node.processes * node.prefetch
            assert node.fast_capacity == node.processes * node.depth == node.processes * self.depth
            assert 1 <= node.processes <= MAX_NODE_PROCESSES
            for key, chunk in node.inflight.items():
                assert (chunk.job_id, chunk.chunk_id) == key
                assert placed.get(key) is node, f"chunk {key} on node {node.name} not in the index"
            inflight += len(node.inflight)
            need: Dict[str, float] = collections.defaultdict(float)
            for chunk in node.inflight.values():
                for k, v in chunk.resources.items():
                    need[k] += v
            for k in set(need) | set(node.used):
                assert abs(node.used.get(k, 0.0) - need.get(k, 0.0)) < 1e-6, \
                    f"node {node.name} uses {node.used.get(k)} of {k}, in flight {need.get(k)}"
            assert node.jobs_shipped <= set(self.jobs), f"node {node.name} holds code of gone jobs"
            assert not (node.jobs_shipped & node.done_pending.keys()), \
                f"node {node.name} would be told to forget code it still needs"
            assert not node.done_pending or node.done_call is not None, \
                f"node {node.name} has JOB_DONEs waiting with no timer to send them"
            for job_id in node.jobs_shipped:
                assert self.jobs[job_id].shipped_to.get(node_id) is node
        assert inflight == len(placed), f"index has {len(placed)} chunks, nodes hold {inflight}"
        assert len(self._ready) == len(self._ready_set) and set(self._ready) == self._ready_set, \
            "ready round-robin holds a job twice"
        assert self._ready_set <= set(self.jobs), "ready round-robin holds a gone job"
        for gkey, group in self.groups.items():
            assert group.key == gkey and group.jobs, f"group {gkey} is empty or misfiled"
            assert all(self.jobs[j].group is group for j in group.jobs), f"group {gkey} out of step"
            in_flight = sum(len(self.jobs[j].placed) for j in group.jobs)
            assert group.active == in_flight, f"group {gkey} counts {group.active}, {in_flight} placed"
            assert group.active <= group.limit, f"group {gkey} runs {group.active} > {group.limit}"
        for job in self.jobs.values():
            assert job.group is None or self.groups.get(job.group.key) is job.group, \
                f"job {job.job_id} counts against a forgotten group"
        window = getattr(self.policy, "window", 64)
        for job in self.jobs.values():
            if job.group is not None and job.group.full:
                continue
            if self._free.top > 0:
                assert all(c.resources for c in itertools.islice(job.queue, window)), \
                    f"job {job.job_id} has a chunk queued while a node has free credit"
            assert not self._fast_fits(job), \
                f"fast job {job.job_id} has a chunk queued while a node has fast credit for it"
        for ctrl_id, ctrl in self.controllers.items():
            assert ctrl.controller_id == ctrl_id
            for job_id in ctrl.jobs:
                assert self.jobs.get(job_id) is not None and self.jobs[job_id].owner is ctrl

