"""Job kinds: what a job does with its chunks, behind one small interface.

The :class:`~achilles.server.scheduler.Scheduler` owns nodes, credit and fairness; a
:class:`Job` owns its queue and decides what a result means. Each job kind (:class:`MapJob`,
:class:`GraphJob`, :class:`~achilles.server.pipelines.PipelineJob`) implements :meth:`Job.on_result`,
:attr:`Job.finished`, :meth:`Job.live_ids` and :meth:`Job.status`; the rest is shared.

Counters are named by unit: ``items_sent`` / ``items_done`` count items (a graph task is one
item), ``chunks_done`` / ``chunks_failed`` count chunks (tasks). ``sent``, ``done`` and
``failed`` are the figures shown in ``status()`` (items, items, chunks).
"""

from __future__ import annotations

import collections
import logging
import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Deque, Dict, Iterable, List, Optional, Set, Tuple

from achilles.core import wire
from achilles.core.errors import ProtocolError, ResourceUnavailable
from achilles.core.output import Line, encode_lines
from achilles.core.serialization import error_record
from achilles.server.dispatch import NodeState, Peer
from achilles.server.graphs import (NOT_RUN, QUEUED, RUNNING, WAITING, Batch, GraphState,
                                    GraphTask, retry_status)

log = logging.getLogger("achilles.server")


@dataclass
class Chunk:
    """A slice of a job's input, as opaque bytes from the controller."""

    job_id: str
    chunk_id: int
    n_items: int
    payload: bytes
    crashes: int = 0  # workers this chunk has killed; after the first, it re-runs carefully
    timeout: Optional[float] = None
    resources: Dict[str, float] = field(default_factory=dict)
    #: The last lines of output of its latest failed attempt, decoded and as sent (OUTPUT_TAIL).
    tail: Optional[Tuple[List[Line], bytes]] = None
    reported: float = 0.0  # items its task said were done (report_progress) while in flight
    fast: int = 0  # fast credit units it holds while in flight (0: it holds base credit)


@dataclass(eq=False)
class ControllerState:
    """A connected controller."""

    peer: Peer
    controller_id: int
    address: str
    jobs: Set[str] = field(default_factory=set)


#: Map job options the server reads or checks (others are ignored, for newer controllers).
_OPTION_TYPES: Dict[str, type] = {"init": bytes, "maxtasks": int, "max_active": int,
                                  "group": str}


def check_options(options: Dict[str, Any]) -> Optional[str]:
    """Why a map job's options are unusable, or None when they are fine."""
    for key, kind in _OPTION_TYPES.items():
        if key not in options:
            continue
        value = options[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"option {key!r} must be {kind.__name__}, not {type(value).__name__}"
        if isinstance(value, int) and value < 1:
            return f"option {key!r} must be at least 1, not {value}"
    return None


@dataclass(eq=False)
class JobGroup:
    """Jobs of one controller that share a ``max_active`` cap (an ``achilles.Pool``'s jobs,
    or one job with a cap): at most ``limit`` of their chunks are in flight at once."""

    key: Tuple[int, str]  # (controller id, group name or "job:" + job id)
    limit: int
    active: int = 0  # chunks of the group's jobs in flight on nodes
    jobs: Set[str] = field(default_factory=set)

    @property
    def full(self) -> bool:
        """Whether no more of the group's chunks may be dispatched now."""
        return self.active >= self.limit


class Job(ABC):
    """One job of one controller: its queue of chunks and what their results mean.

    Where a chunk of a running job is, is known exactly: in :attr:`queue`, in flight on one
    node (:attr:`placed`, kept by the scheduler), or waiting for a retry timer
    (:attr:`retrying`).
    """

    kind: ClassVar[str]

    def __init__(self, job_id: str, owner: ControllerState, function: str, func_bytes: bytes,
                 callback_bytes: bytes, options: Dict[str, Any], started: float) -> None:
        self.job_id = job_id
        self.owner = owner
        self.function = function
        self.func_bytes = func_bytes
        self.callback_bytes = callback_bytes
        self.options = options
        self.started = started  # clock seconds, for durations
        self.state = "running"
        self.queue: Deque[Chunk] = collections.deque()
        self.placed: Dict[int, NodeState] = {}  # chunk id -> node it is in flight on
        self.retrying: Dict[int, Chunk] = {}  # chunk id -> chunk waiting for its retry timer
        self.retry_calls: Dict[int, Any] = {}  # chunk id -> IDelayedCall
        self.shipped_to: Dict[int, NodeState] = {}  # node id -> node holding this job's code
        self.items_sent = 0
        self.items_done = 0
        self.chunks_done = 0
        self.chunks_failed = 0
        self.recheck = False  # a chunk needing resources was queued since the last check
        self.group: Optional[JobGroup] = None  # the max_active cap this job counts against
        self.watched = False  # the controller asked for JOB_PROGRESS (WATCH)
        self.reported = 0.0  # sum of the in-flight chunks' ``reported``
        self.retried = 0  # chunks run again: after a crash, a lost node or a task's retry
        #: Seconds a chunk of this job takes on a worker: a running estimate that follows a
        #: slower chunk at once and a faster one gradually (None until a chunk has finished).
        self.service: Optional[float] = None
        #: Fast credit units one of its chunks costs now (0: its chunks take base credit only).
        self.fast_cost = 0

    # figures shown in status() and used by older callers
    @property
    def sent(self) -> int:
        """Items received (map) or released (graph)."""
        return self.items_sent

    @property
    def done(self) -> int:
        """Items completed with status OK."""
        return self.items_done

    @property
    def failed(self) -> int:
        """Chunks (graph: tasks) that failed for good."""
        return self.chunks_failed

    def wants_input(self) -> bool:
        """Whether the controller should be asked (WANT) for more chunks."""
        return False

    @property
    def forwards_output(self) -> bool:
        """Whether the controller asked for its tasks' output (option ``output``)."""
        return self.options.get("output", True) is not False

    def take(self, index: int, capacity: int = 1) -> Chunk:
        """Remove and return the queued chunk at ``index`` (the policy's choice) to dispatch
        it now; ``capacity``: the chunks all nodes can hold in flight."""
        if index == 0:
            return self.queue.popleft()
        chunk = self.queue[index]
        del self.queue[index]
        return chunk

    def relay_output(self, chunk_id: int, node: str, dropped: int, lines: List[Line],
                     payload: bytes) -> None:
        """Pass lines a chunk wrote (``payload``, decoded as ``lines``) to the controller."""
        self.owner.peer.send(wire.OUTPUT, self.job_id, chunk_id, node, dropped, payload)

    def send_tail(self, chunk: Chunk, node: NodeState) -> None:
        """``chunk`` failed on ``node`` and its result goes next: send its last lines of
        output first (when the controller asked for output), so the controller can attach
        them to the failure."""
        if self.forwards_output:
            tail = encode_lines([]) if chunk.tail is None else chunk.tail[1]
            self.owner.peer.send(wire.OUTPUT_TAIL, self.job_id, chunk.chunk_id, node.name, tail)

    def requeue(self, chunk: Chunk) -> None:
        """Put a chunk back at the front of the queue (its node was lost, or it crashed)."""
        self.queue.appendleft(chunk)

    def on_dispatch(self, chunk: Chunk, node: NodeState) -> None:
        """``chunk`` was handed to ``node``."""

    def observe(self, elapsed: float) -> float:
        """A chunk took ``elapsed`` seconds on its worker: update and return :attr:`service`."""
        if self.service is None or elapsed >= self.service:
            self.service = elapsed
        else:
            self.service += (elapsed - self.service) * 0.125
        return self.service

    def report(self, chunk: Chunk, n: float) -> bool:
        """An in-flight chunk's task reported ``n`` more items done (capped at the chunk's
        size); whether the job's progress moved."""
        add = min(n, chunk.n_items - chunk.reported)
        if add <= 0:
            return False
        chunk.reported += add
        self.reported += add
        return True

    def unreport(self, chunk: Chunk) -> None:
        """``chunk`` left its node (answered, or its node was lost): forget what it reported."""
        if chunk.reported:
            self.reported = max(0.0, self.reported - chunk.reported)
            chunk.reported = 0.0

    def progress(self) -> Tuple[float, int, int, int, Dict[str, List[int]]]:
        """The fields of JOB_PROGRESS after the job id: items done (with what running chunks
        reported), failed and skipped chunks or tasks, re-runs, per-name counts (graphs)."""
        return self.items_done + self.reported, self.chunks_failed, 0, self.retried, {}

    @abstractmethod
    def on_result(self, chunk: Chunk, status: int, payload: bytes, elapsed: float,
                  node: NodeState) -> Optional[float]:
        """Account for a chunk's final result (crash retries are the scheduler's). Return a
        delay in seconds to run the chunk again after it, or None when the chunk is settled."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """Whether every chunk of the job is settled and no more can come."""

    def on_finish(self) -> None:
        """The job is finished; tell the controller what it needs to know."""

    @abstractmethod
    def live_ids(self) -> Set[int]:
        """Ids of chunks not yet settled (queued, in flight or waiting for a retry)."""

    def unplaceable(self, nodes: Iterable[NodeState]) -> None:
        """Fail queued chunks that need resources no node in ``nodes`` offers."""

    def node_joined(self, node: NodeState) -> None:
        """A node joined (jobs that place work themselves, like pipelines, use it)."""

    def node_lost(self, node: NodeState) -> None:
        """A node left; the scheduler has already re-queued this job's chunks that it held."""

    def drop(self) -> None:
        """Forget queued and retrying chunks and cancel retry timers."""
        self.queue.clear()
        self.retrying.clear()
        for call in self.retry_calls.values():
            if call.active():
                call.cancel()
        self.retry_calls.clear()

    def status(self) -> Dict[str, Any]:
        """A JSON-serializable summary."""
        # Only a prefix: the full id is what lets its controller resume the job, so no other
        # controller may learn it.
        return {"id": self.job_id[:8], "owner": self.owner.address, "function": self.function,
                "kind": self.kind, "sent": self.items_sent, "done": self.items_done,
                "failed": self.chunks_failed, "chunks_done": self.chunks_done,
                "queued": len(self.queue), "running": len(self.placed),
                "max_active": None if self.group is None else self.group.limit}

    def check(self) -> None:
        """Raise AssertionError unless every live chunk is in exactly one place."""
        queued = [c.chunk_id for c in self.queue]
        assert len(queued) == len(set(queued)), f"job {self.job_id}: a chunk is queued twice"
        assert all(c.job_id == self.job_id for c in self.queue)
        places = [set(queued), set(self.placed), set(self.retrying)]
        for i, a in enumerate(places):
            for b in places[i + 1:]:
                assert not a & b, f"job {self.job_id}: chunks {sorted(a & b)} are in two places"
        assert set().union(*places) == self.live_ids(), \
            f"job {self.job_id}: located {sorted(set().union(*places))}, live {sorted(self.live_ids())}"
        assert set(self.retry_calls) <= set(self.retrying)


class MapJob(Job):
    """One map/imap call: chunks come from the controller as it is asked (WANT)."""

    kind = "map"

    def __init__(self, *args: Any, credit: int = wire.INITIAL_CREDIT, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.credit = credit  # chunks the controller may still send unasked
        self.n_chunks: Optional[int] = None
        self._live: Set[int] = set()
        self.chunks_received = 0

    def wants_input(self) -> bool:
        return self.state == "running" and self.n_chunks is None

    def add(self, chunk: Chunk) -> None:
        """Queue a chunk from the controller (its id must not be live already)."""
        self.credit = max(0, self.credit - 1)
        self.items_sent += chunk.n_items
        self.chunks_received += 1
        self._live.add(chunk.chunk_id)
        self.queue.append(chunk)

    def is_live(self, chunk_id: int) -> bool:
        """Whether a chunk with this id is queued, in flight or retrying."""
        return chunk_id in self._live

    def on_result(self, chunk: Chunk, status: int, payload: bytes, elapsed: float,
                  node: NodeState) -> Optional[float]:
        self._live.discard(chunk.chunk_id)
        self.chunks_done += 1
        if status == wire.OK:
            self.items_done += chunk.n_items
        else:
            self.chunks_failed += 1
        self.owner.peer.send(wire.RESULT, self.job_id, chunk.chunk_id, status, elapsed, node.name,
                             payload)
        return None

    @property
    def finished(self) -> bool:
        return self.n_chunks is not None and self.chunks_done >= self.n_chunks

    def live_ids(self) -> Set[int]:
        return set(self._live)

    def check(self) -> None:
        super().check()
        assert self.chunks_received == len(self._live) + self.chunks_done, \
            f"job {self.job_id}: {self.chunks_received} chunks received, " \
            f"{len(self._live)} live + {self.chunks_done} done"


class GraphJob(Job):
    """A call graph: each task is a one-item chunk, queued once its inputs are done."""

    kind = "graph"

    def __init__(self, job_id: str, owner: ControllerState, funcs: bytes, graph: GraphState,
                 started: float) -> None:
        # One graph, one caller: its tasks all carry the caller's output choice.
        output = all(t.options.get("output", True) is not False for t in graph.tasks.values())
        super().__init__(job_id, owner, f"graph of {len(graph.tasks)} tasks", funcs, b"",
                         {"kind": "graph", "output": output}, started)
        self.graph = graph
        self.skipped = 0
        self.by_name: Dict[str, List[int]] = {}  # task name -> [done, failed or skipped, total]
        for t in graph.tasks.values():
            self.by_name.setdefault(t.name, [0, 0, 0])[2] += 1

    def progress(self) -> Tuple[float, int, int, int, Dict[str, List[int]]]:
        return (self.items_done + self.reported, self.chunks_failed, self.skipped, self.retried,
                {name: list(counts) for name, counts in self.by_name.items()})

    def start(self) -> None:
        """Queue the tasks that have no inputs."""
        for t in self.graph.initial():
            self._release(t)

    def _release(self, t: GraphTask) -> None:
        t.state = QUEUED
        self.items_sent += 1
        # The payload is made when the chunk is taken (it may go in a batch instead).
        if t.plain:
            self.queue.append(Chunk(self.job_id, t.task_id, 1, b""))
            return
        opts = t.options
        need = {str(k): float(v) for k, v in (opts.get("resources") or {}).items()}
        self.queue.append(Chunk(self.job_id, t.task_id, 1, b"", timeout=opts.get("timeout"),
                                resources=need))
        if need:
            self.recheck = True

    def take(self, index: int, capacity: int = 1) -> Chunk:
        chunk = super().take(index)
        graph = self.graph
        t = graph.tasks[chunk.chunk_id]
        if index == 0 and self.queue and not chunk.crashes:
            share = -(-(len(self.queue) + 1) // max(1, capacity))
            batch = graph.batch(t, (graph.tasks[c.chunk_id] for c in self.queue), share)
            if batch is not None:
                for _ in range(batch.ready - 1):
                    self.queue.popleft()
                self.items_sent += len(batch.tasks) - batch.ready
                return Chunk(self.job_id, batch.batch_id, len(batch.tasks),
                             graph.batch_payload(batch))
        chunk.payload = graph.payload(t)
        return chunk

    def requeue(self, chunk: Chunk) -> None:
        batch = self.graph.batches.get(chunk.chunk_id)
        if batch is None:
            super().requeue(chunk)
        else:
            self._dissolve(batch, chunk.crashes, front=True)

    def _dissolve(self, batch: Batch, crashes: int, front: bool = False) -> None:
        """A batch came back without (all) its results: its unsettled tasks run again one
        to a chunk (``crashes``: the batch's count, which each of them inherits)."""
        ready = self.graph.dissolve(batch)
        self.items_sent -= sum(1 for t in batch.tasks if t.state == WAITING)
        chunks = [Chunk(self.job_id, t.task_id, 1, b"", crashes=crashes) for t in ready]
        for t in ready:
            t.state = QUEUED
        if front:
            self.queue.extendleft(reversed(chunks))
        else:
            self.queue.extend(chunks)

    def on_dispatch(self, chunk: Chunk, node: NodeState) -> None:
        batch = self.graph.batches.get(chunk.chunk_id)
        if batch is not None:
            for t in batch.tasks:
                t.node = node.name
            return
        t = self.graph.tasks[chunk.chunk_id]
        t.state = RUNNING
        t.node = node.name

    def send_tail(self, chunk: Chunk, node: NodeState) -> None:
        # A batch's id names no task: its failed tasks get their own tails as it is settled,
        # and a batch that failed as a whole is dissolved (its tasks run again).
        if chunk.chunk_id not in self.graph.batches:
            super().send_tail(chunk, node)

    def on_result(self, chunk: Chunk, status: int, payload: bytes, elapsed: float,
                  node: NodeState) -> Optional[float]:
        batch = self.graph.batches.get(chunk.chunk_id)
        if batch is not None:
            self._batch_result(batch, status, payload, node,
                               chunk.tail[0] if chunk.tail is not None else [])
            return None
        t = self.graph.tasks[chunk.chunk_id]
        t.attempts += 1
        t.duration = elapsed
        t.batched = False
        if status == wire.OK:
            self.graph.timed(t, elapsed)
            self._done(t, bytes(payload), node.name, elapsed)
            return None
        if retry_status(status) and t.attempts <= int(t.options.get("retries") or 0):
            delay = float(t.options.get("retry_delay") or 0.0)
            log.info("task %s#%d of graph %s failed (attempt %d); retrying in %g s", t.name,
                     t.task_id, self.job_id[:8], t.attempts, delay)
            t.state = QUEUED
            self.retried += 1
            return delay
        self._fail(t, status, payload, node.name, elapsed)
        return None

    def _done(self, t: GraphTask, value: Optional[bytes], node: str, elapsed: float) -> None:
        self.items_done += 1
        self.chunks_done += 1
        self.by_name[t.name][0] += 1
        if t.task_id in self.graph.outputs:
            self.owner.peer.send(wire.TASK_DONE, self.job_id, t.task_id, wire.OK, node, elapsed,
                                 value or b"")
        for ready in self.graph.finished(t, value):
            self._release(ready)

    def _batch_result(self, batch: Batch, status: int, payload: bytes, node: NodeState,
                      tail: List[Line]) -> None:
        """Settle each task of a batch from its outcome. A batch without a well-formed
        outcome for each of its tasks, in order, is dissolved (its tasks run again). ``tail``:
        the batch's last lines of output when a task of it failed (each line names its task
        by its index in the batch)."""
        outcomes = _outcomes(payload, batch) if status == wire.OK else None
        if outcomes is None:
            if status == wire.OK:
                log.error("node %s sent a malformed result for a batch of graph %s; its tasks "
                          "run again one by one", node.name, self.job_id[:8])
            self.retried += 1
            self._dissolve(batch, 0)
            return
        del self.graph.batches[batch.batch_id]
        for index, (t, (_, st, secs, value)) in enumerate(zip(batch.tasks, outcomes)):
            if t.batch != batch.batch_id or st == NOT_RUN:
                continue  # skipped after an input in the batch failed
            t.attempts += 1
            t.duration = secs
            t.batched = True
            if st == wire.OK:
                self.graph.timed(t, secs)
                self._done(t, value, node.name, secs)
                continue
            if self.forwards_output:  # its own last lines go before its failure
                own = [[None, line[1], line[2]] for line in tail if line[0] == index]
                self.owner.peer.send(wire.OUTPUT_TAIL, self.job_id, t.task_id, node.name,
                                     encode_lines(own))
            self._fail(t, st, value or b"", node.name, secs)
        for t in batch.tasks:
            if t.batch == batch.batch_id:  # said not to run, though its inputs did not fail
                exc = ProtocolError(f"node {node.name} did not run task {t.name}#{t.task_id}")
                self._fail(t, wire.ITEM_ERROR, error_record(0, exc, []), node.name, 0.0)

    def task_of(self, chunk_id: int, index: Optional[int]) -> Optional[GraphTask]:
        """The task a chunk id (and, in a batch, an index) stands for, if it is known."""
        batch = self.graph.batches.get(chunk_id)
        if batch is None:
            return self.graph.tasks.get(chunk_id)
        if index is not None and 0 <= index < len(batch.tasks):
            return batch.tasks[index]
        return None

    def relay_output(self, chunk_id: int, node: str, dropped: int, lines: List[Line],
                     payload: bytes) -> None:
        batch = self.graph.batches.get(chunk_id)
        if batch is None:
            super().relay_output(chunk_id, node, dropped, lines, payload)
            return
        # A batch's lines carry the index of the task that wrote them: relay them as its own.
        by_task: Dict[int, List[Line]] = {}
        for line in lines:
            t = self.task_of(chunk_id, line[0])
            if t is not None:
                by_task.setdefault(t.task_id, []).append((None, line[1], line[2]))
        for task_id, own in by_task.items():
            self.owner.peer.send(wire.OUTPUT, self.job_id, task_id, node, dropped,
                                 encode_lines(own))
            dropped = 0
        if dropped:
            self.owner.peer.send(wire.OUTPUT, self.job_id, batch.tasks[0].task_id, node, dropped,
                                 encode_lines([]))

    def _fail(self, t: GraphTask, status: int, payload: bytes, node: str, elapsed: float) -> None:
        self.chunks_done += 1
        self.chunks_failed += 1
        skipped = self.graph.failed(t)
        self.by_name[t.name][1] += 1
        self.skipped += len(skipped)
        for s in skipped:
            self.by_name[s.name][1] += 1
        if skipped:
            dropped = {s.task_id for s in skipped}
            self.queue = collections.deque(c for c in self.queue if c.chunk_id not in dropped)
            for task_id in dropped:
                self.retrying.pop(task_id, None)
        self.owner.peer.send(wire.TASK_DONE, self.job_id, t.task_id, status, node, elapsed, payload)

    def unplaceable(self, nodes: Iterable[NodeState]) -> None:
        nodes = list(nodes)
        self.recheck = False
        for chunk in [c for c in self.queue if c.resources]:
            if any(n.offers(chunk.resources) for n in nodes):
                continue
            if chunk not in self.queue:  # skipped by an earlier failure in this loop
                continue
            self.queue.remove(chunk)
            offered = sorted({f"{k}={v:g}" for n in nodes for k, v in n.resources.items()})
            want = ", ".join(f"{k}={v:g}" for k, v in chunk.resources.items())
            exc = ResourceUnavailable(
                f"no connected node offers {want} (nodes offer: {', '.join(offered) or 'nothing'}); "
                "start a node with --resources")
            self._fail(self.graph.tasks[chunk.chunk_id], wire.ITEM_ERROR, error_record(0, exc, []),
                       "", 0.0)

    @property
    def finished(self) -> bool:
        return self.graph.complete

    def on_finish(self) -> None:
        self.owner.peer.send(wire.GRAPH_DONE, self.job_id, self.graph.report())

    def live_ids(self) -> Set[int]:
        ids = {t.task_id for t in self.graph.tasks.values()
               if t.state in (QUEUED, RUNNING) and not t.batch}
        ids.update(self.graph.batches)
        return ids

    def check(self) -> None:
        super().check()
        batches = self.graph.batches
        assert set(batches) <= set(self.placed), \
            f"graph {self.job_id}: batches {sorted(set(batches) - set(self.placed))} not in flight"
        for chunk_id in self.placed:
            batch = batches.get(chunk_id)
            tasks = batch.tasks if batch is not None else [self.graph.tasks[chunk_id]]
            for t in tasks:
                assert t.state == RUNNING and t.batch == (batch.batch_id if batch else 0), \
                    f"graph {self.job_id}: task {t.task_id} in flight but {t.state} " \
                    f"(batch {t.batch})"
        in_batches = sum(len(b.tasks) for b in batches.values())
        assert in_batches == sum(1 for t in self.graph.tasks.values() if t.batch), \
            f"graph {self.job_id}: tasks marked as batched that no batch holds"
        settled = sum(1 for t in self.graph.tasks.values() if t.state in ("done", "failed"))
        assert settled == self.chunks_done, f"graph {self.job_id}: {settled} settled tasks, " \
            f"{self.chunks_done} counted"



def _outcomes(payload: Any, batch: Batch) -> Optional[List[Tuple[int, int, float, Any]]]:
    """A batch's outcomes (see :func:`achilles.node.worker.run_graph_batch`): per task, in
    the batch's order, ``(task id, status, seconds, value or error record)``; None unless
    each is well formed (a value for every task to keep that ran, an error record for every
    failure)."""
    try:
        outcomes = pickle.loads(payload)
    except Exception:
        return None
    if type(outcomes) is not list or len(outcomes) != len(batch.tasks):
        return None
    keep, ok, error = batch.keep, wire.OK, wire.ITEM_ERROR
    for t, entry in zip(batch.tasks, outcomes):
        if type(entry) is not tuple or len(entry) != 4 or entry[0] != t.task_id \
                or type(entry[2]) not in (float, int):
            return None
        status, value = entry[1], entry[3]
        if status == ok:
            if (type(value) is bytes) is not (t.task_id in keep) or \
                    (value is not None and type(value) is not bytes):
                return None
        elif not (status == NOT_RUN or (status == error and type(value) is bytes)):
            return None
    return outcomes
