"""The scheduler: which chunk is queued, which is on which node, and who gets what next.

Pure bookkeeping with no I/O: peers are handles with ``send(code, *fields)``. Dispatch is
credit-based (a node holds at most ``processes x prefetch`` chunks) and fair (round-robin over
jobs with queued chunks). Input is pulled from controllers with ``WANT`` only while a job's
queue runs low, so memory stays bounded whatever the input size.
"""

from __future__ import annotations

import collections
import logging
import pickle
import time
from dataclasses import dataclass, field
import itertools
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set, Tuple

from achilles import wire
from achilles.errors import ResourceUnavailable
from achilles.logs import printable
from achilles.serialization import error_record
from achilles.server.graphs import GraphState, GraphTask, QUEUED, RUNNING, retry_status

log = logging.getLogger("achilles.server")

INITIAL_CREDIT = wire.INITIAL_CREDIT
DEFAULT_MAX_CRASHES = wire.DEFAULT_MAX_CRASHES


class Peer(Protocol):
    """What the scheduler needs of a connection."""

    def send(self, code: int, *fields: Any) -> None: ...


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


@dataclass
class NodeState:
    """A connected node."""

    peer: Peer
    node_id: int
    name: str
    address: str
    processes: int
    prefetch: int
    hostname: str = ""
    pid: int = 0
    resources: Dict[str, float] = field(default_factory=dict)
    connected_since: float = field(default_factory=time.time)
    inflight: Dict[Tuple[str, int], Chunk] = field(default_factory=dict)
    jobs_shipped: Set[str] = field(default_factory=set)
    used: Dict[str, float] = field(default_factory=dict)
    done: int = 0

    def fits(self, need: Dict[str, float]) -> bool:
        """Whether this node has ``need`` free now."""
        return all(self.resources.get(k, 0.0) - self.used.get(k, 0.0) >= v for k, v in need.items())

    def offers(self, need: Dict[str, float]) -> bool:
        """Whether this node could ever run a task needing ``need``."""
        return all(self.resources.get(k, 0.0) >= v for k, v in need.items())

    @property
    def capacity(self) -> int:
        return self.processes * self.prefetch

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)


@dataclass
class ControllerState:
    """A connected controller."""

    peer: Peer
    controller_id: int
    address: str
    jobs: Set[str] = field(default_factory=set)


@dataclass
class Job:
    """One map/imap call of one controller."""

    job_id: str
    owner: ControllerState
    function: str
    func_bytes: bytes
    callback_bytes: bytes
    options: Dict[str, Any]
    queue: Deque[Chunk] = field(default_factory=collections.deque)
    credit: int = INITIAL_CREDIT  # chunks the controller may still send unasked
    n_chunks: Optional[int] = None
    chunks_done: int = 0
    sent: int = 0
    done: int = 0
    failed: int = 0
    started: float = field(default_factory=time.time)
    state: str = "running"
    graph: Optional[GraphState] = None


class Scheduler:
    """Tracks nodes, controllers and jobs, and moves chunks between them."""

    def __init__(self, prefetch: int = 2, max_crashes: int = DEFAULT_MAX_CRASHES,
                 call_later: Optional[Callable[[float, Callable[[], None]], Any]] = None) -> None:
        self.prefetch = prefetch
        self.max_crashes = max_crashes
        self._call_later = call_later
        self.nodes: Dict[int, NodeState] = {}
        self.controllers: Dict[int, ControllerState] = {}
        self.jobs: Dict[str, Job] = {}
        self._ready: Deque[str] = collections.deque()  # job ids with queued chunks, round-robin
        self._next_id = 1

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # --- cluster shape ----------------------------------------------------------------------
    @property
    def processes(self) -> int:
        """Worker processes across all nodes."""
        return sum(n.processes for n in self.nodes.values())

    @property
    def capacity(self) -> int:
        """Chunks the nodes can hold in flight."""
        return sum(n.capacity for n in self.nodes.values())

    def _target_queue(self) -> int:
        return max(2, self.capacity)

    # --- peers ------------------------------------------------------------------------------
    def add_node(self, peer: Peer, name: str, address: str, processes: int, hostname: str = "",
                 pid: int = 0, resources: Optional[Dict[str, float]] = None) -> NodeState:
        """Register an authenticated node; it gets work at once."""
        node = NodeState(peer, self._new_id(), name, address, max(1, int(processes)),
                         self.prefetch, hostname, pid, dict(resources or {}))
        self.nodes[node.node_id] = node
        log.info("node %s joined from %s with %d processes", name, address, node.processes)
        for job in list(self.jobs.values()):
            self._refill(job)
        self.pump()
        return node

    def remove_node(self, node: NodeState) -> None:
        """Forget a node; every chunk it had in flight goes back to the front of its job's queue."""
        if self.nodes.pop(node.node_id, None) is None:
            return
        requeued = 0
        for chunk in sorted(node.inflight.values(), key=lambda c: c.chunk_id, reverse=True):
            job = self.jobs.get(chunk.job_id)
            if job is not None and job.state == "running":
                job.queue.appendleft(chunk)
                self._mark_ready(job)
                requeued += 1
        node.inflight.clear()
        log.warning("node %s lost; %d chunk(s) re-queued", node.name, requeued)
        for job in list(self.jobs.values()):
            if job.graph is not None:
                self._check_resources(job)
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
        log.info("controller %d disconnected", ctrl.controller_id)

    # --- jobs -------------------------------------------------------------------------------
    def submit(self, ctrl: ControllerState, job_id: str, function: str, func_bytes: bytes,
               callback_bytes: bytes, options: Dict[str, Any]) -> None:
        """Start a job; its chunks follow in CHUNK messages."""
        if job_id in self.jobs:
            ctrl.peer.send(wire.JOB_FAILED, job_id, f"job id {job_id} is already in use")
            return
        job = Job(job_id, ctrl, printable(function), func_bytes, callback_bytes, dict(options or {}))
        self.jobs[job_id] = job
        ctrl.jobs.add(job_id)
        log.info("job %s started by controller %d: %s", job_id[:8], ctrl.controller_id, job.function)
        if not self.nodes:
            log.warning("job %s is waiting: no node is connected", job_id[:8])
        self._refill(job)

    def add_chunk(self, ctrl: ControllerState, job_id: str, chunk_id: int, n_items: int,
                  payload: bytes) -> None:
        """Queue a chunk of input."""
        job = self._owned(ctrl, job_id)
        if job is None:
            return
        job.credit = max(0, job.credit - 1)
        job.sent += n_items
        job.queue.append(Chunk(job_id, chunk_id, n_items, bytes(payload)))
        self._mark_ready(job)
        self.pump()

    def end(self, ctrl: ControllerState, job_id: str, n_chunks: int) -> None:
        """The controller's input is exhausted after ``n_chunks`` chunks."""
        job = self._owned(ctrl, job_id)
        if job is None:
            return
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
        self._drop(job, reason)

    def _owned(self, ctrl: ControllerState, job_id: str) -> Optional[Job]:
        job = self.jobs.get(job_id)
        if job is None or job.owner is not ctrl:
            return None
        return job

    def _drop(self, job: Job, reason: str) -> None:
        job.queue.clear()
        self.jobs.pop(job.job_id, None)
        job.owner.jobs.discard(job.job_id)
        for node in self.nodes.values():
            stale = [key for key in node.inflight if key[0] == job.job_id]
            for key in stale:
                self._free(node, node.inflight.pop(key))
            if job.job_id in node.jobs_shipped:
                node.jobs_shipped.discard(job.job_id)
                node.peer.send(wire.CANCEL, job.job_id, reason)
        self.pump()

    def _maybe_finish(self, job: Job) -> None:
        if job.n_chunks is not None and job.chunks_done >= job.n_chunks and job.state == "running":
            job.state = "done"
            self.jobs.pop(job.job_id, None)
            job.owner.jobs.discard(job.job_id)
            for node in self.nodes.values():
                if job.job_id in node.jobs_shipped:
                    node.jobs_shipped.discard(job.job_id)
                    node.peer.send(wire.JOB_DONE, job.job_id)
            log.info("job %s finished: %d items in %.3f s", job.job_id[:8], job.done,
                     time.time() - job.started)

    # --- results ----------------------------------------------------------------------------
    def result(self, node: NodeState, job_id: str, chunk_id: int, status: int, payload: bytes,
               elapsed: float) -> None:
        """A node finished a chunk. Late or unknown results are dropped, so none counts twice."""
        chunk = node.inflight.pop((job_id, chunk_id), None)
        if chunk is None:
            return
        self._free(node, chunk)
        job = self.jobs.get(job_id)
        if job is not None and job.state == "running" and status == wire.CRASHED:
            exitcode, item = pickle.loads(payload)
            chunk.crashes += 1
            if chunk.crashes < self.max_crashes:
                log.warning("chunk %d of job %s killed a worker on node %s (%s); retrying it "
                            "(%d of %d)", chunk_id, job_id[:8], node.name, exitcode,
                            chunk.crashes, self.max_crashes)
                job.queue.appendleft(chunk)
                self._mark_ready(job)
                self.pump()
                return
            payload = pickle.dumps((exitcode, item, chunk.crashes))
        if job is not None and job.state == "running" and job.graph is not None:
            self._graph_result(node, job, chunk, status, payload, elapsed)
        elif job is not None and job.state == "running":
            job.chunks_done += 1
            if status == wire.OK:
                job.done += chunk.n_items
                node.done += chunk.n_items
            else:
                job.failed += 1
            job.owner.peer.send(wire.RESULT, job_id, chunk_id, status, elapsed, node.name, payload)
            self._maybe_finish(job)
            if job.state == "running":
                self._refill(job)
        self.pump()

    # --- dispatch ---------------------------------------------------------------------------
    def _mark_ready(self, job: Job) -> None:
        if job.job_id not in self._ready:
            self._ready.append(job.job_id)

    def _refill(self, job: Job) -> None:
        """Ask the controller for more input when the job's queue runs low."""
        if job.state != "running" or job.n_chunks is not None:
            return
        target = self._target_queue()
        want = target - len(job.queue) - job.credit
        if want > 0 and (want >= max(1, target // 2) or not job.queue):
            job.credit += want
            job.owner.peer.send(wire.WANT, job.job_id, want, self.processes, self.capacity)

    def pump(self) -> None:
        """Hand queued chunks to nodes with free credit, one job at a time in turn."""
        blocked: List[str] = []
        while self._ready:
            free = [n for n in self.nodes.values() if n.free > 0]
            if not free:
                break
            job_id = self._ready.popleft()
            job = self.jobs.get(job_id)
            if job is None or not job.queue:
                continue
            pick = self._pick(job, free)
            if pick is None:  # nothing of this job fits a free node now
                blocked.append(job_id)
                continue
            index, node = pick
            chunk = job.queue[index]
            del job.queue[index]
            if job.queue:
                self._ready.append(job_id)
            self._dispatch(node, job, chunk)
        self._ready.extend(j for j in blocked if j not in self._ready)

    @staticmethod
    def _pick(job: Job, free: List[NodeState]) -> Optional[Tuple[int, NodeState]]:
        for index, chunk in enumerate(itertools.islice(job.queue, 64)):
            fits = [n for n in free if n.fits(chunk.resources)] if chunk.resources else free
            if fits:
                return index, max(fits, key=lambda n: n.free)
        return None

    def _dispatch(self, node: NodeState, job: Job, chunk: Chunk) -> None:
        if job.job_id not in node.jobs_shipped:
            node.jobs_shipped.add(job.job_id)
            node.peer.send(wire.JOB_CODE, job.job_id, job.func_bytes, job.callback_bytes, job.options)
        for k, v in chunk.resources.items():
            node.used[k] = node.used.get(k, 0.0) + v
        node.inflight[(job.job_id, chunk.chunk_id)] = chunk
        if job.graph is not None:
            t = job.graph.tasks[chunk.chunk_id]
            t.state = RUNNING
            t.node = node.name
        node.peer.send(wire.TASK, job.job_id, chunk.chunk_id, chunk.crashes > 0, chunk.timeout,
                       chunk.payload)
        self._refill(job)

    @staticmethod
    def _free(node: NodeState, chunk: Chunk) -> None:
        for k, v in chunk.resources.items():
            node.used[k] = node.used.get(k, 0.0) - v

    # --- graphs -----------------------------------------------------------------------------
    def submit_graph(self, ctrl: ControllerState, graph_id: str, funcs: bytes,
                     tasks: List[Tuple[Any, ...]], outputs: List[int]) -> None:
        """Start a call graph: tasks run as soon as their inputs are done."""
        if graph_id in self.jobs:
            ctrl.peer.send(wire.JOB_FAILED, graph_id, f"graph id {graph_id} is already in use")
            return
        try:
            graph = GraphState(tasks, outputs)
        except (ValueError, TypeError) as exc:
            ctrl.peer.send(wire.JOB_FAILED, graph_id, f"malformed graph: {exc}")
            return
        job = Job(graph_id, ctrl, f"graph of {len(graph.tasks)} tasks", funcs, b"",
                  {"kind": "graph"}, n_chunks=len(graph.tasks), graph=graph)
        self.jobs[graph_id] = job
        ctrl.jobs.add(graph_id)
        log.info("graph %s started by controller %d: %d tasks", graph_id[:8],
                 ctrl.controller_id, len(graph.tasks))
        for t in graph.initial():
            self._release(job, t)
        self._graph_maybe_done(job)
        self.pump()

    def _release(self, job: Job, t: GraphTask) -> None:
        assert job.graph is not None
        opts = t.options
        need = {str(k): float(v) for k, v in (opts.get("resources") or {}).items()}
        t.state = QUEUED
        chunk = Chunk(job.job_id, t.task_id, 1, job.graph.payload(t), timeout=opts.get("timeout"),
                      resources=need)
        job.sent += 1
        job.queue.append(chunk)
        self._mark_ready(job)
        if need:
            self._check_resources(job)

    def _check_resources(self, job: Job) -> None:
        """Fail queued tasks that ask for resources no connected node offers."""
        if not self.nodes or job.graph is None or job.state != "running":
            return
        for chunk in list(job.queue):
            if chunk.resources and not any(n.offers(chunk.resources) for n in self.nodes.values()):
                job.queue.remove(chunk)
                offered = sorted({f"{k}={v:g}" for n in self.nodes.values()
                                  for k, v in n.resources.items()})
                want = ", ".join(f"{k}={v:g}" for k, v in chunk.resources.items())
                exc = ResourceUnavailable(
                    f"no connected node offers {want} (nodes offer: {', '.join(offered) or 'nothing'}); "
                    "start a node with --resources")
                self._graph_fail(job, job.graph.tasks[chunk.chunk_id], wire.ITEM_ERROR,
                                 error_record(0, exc, []), "", 0.0)

    def _graph_result(self, node: NodeState, job: Job, chunk: Chunk, status: int, payload: bytes,
                      elapsed: float) -> None:
        graph = job.graph
        assert graph is not None
        t = graph.tasks[chunk.chunk_id]
        t.attempts += 1
        t.duration = elapsed
        if status == wire.OK:
            job.done += 1
            node.done += 1
            if t.task_id in graph.outputs:
                job.owner.peer.send(wire.TASK_DONE, job.job_id, t.task_id, status, node.name,
                                    elapsed, payload)
            for ready in graph.finished(t, bytes(payload)):
                self._release(job, ready)
        elif retry_status(status) and t.attempts <= int(t.options.get("retries") or 0):
            delay = float(t.options.get("retry_delay") or 0.0)
            log.info("task %s#%d of graph %s failed (attempt %d); retrying in %g s", t.name,
                     t.task_id, job.job_id[:8], t.attempts, delay)
            t.state = QUEUED
            self._later(delay, lambda: self._requeue(job, chunk))
            return
        else:
            self._graph_fail(job, t, status, payload, node.name, elapsed)
        self._graph_maybe_done(job)

    def _graph_fail(self, job: Job, t: GraphTask, status: int, payload: bytes, node: str,
                    elapsed: float) -> None:
        assert job.graph is not None
        job.failed += 1
        skipped = job.graph.failed(t)
        if skipped:
            dropped = {s.task_id for s in skipped}
            for chunk in [c for c in job.queue if c.chunk_id in dropped]:
                job.queue.remove(chunk)
        job.owner.peer.send(wire.TASK_DONE, job.job_id, t.task_id, status, node, elapsed, payload)
        self._graph_maybe_done(job)

    def _graph_maybe_done(self, job: Job) -> None:
        if job.graph is None or not job.graph.complete or job.state != "running":
            return
        job.owner.peer.send(wire.GRAPH_DONE, job.job_id, job.graph.report())
        job.chunks_done = job.n_chunks or 0
        self._maybe_finish(job)

    def _requeue(self, job: Job, chunk: Chunk) -> None:
        if self.jobs.get(job.job_id) is job and job.state == "running":
            job.queue.appendleft(chunk)
            self._mark_ready(job)
            self.pump()

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        if delay <= 0:
            fn()
            return
        call_later = self._call_later
        if call_later is None:
            from twisted.internet import reactor

            call_later = reactor.callLater
        call_later(delay, fn)

    # --- status -----------------------------------------------------------------------------
    def status(self) -> Dict[str, List[Dict[str, Any]]]:
        """A JSON-serializable picture of the cluster."""
        return {
            "nodes": [
                {"name": n.name, "address": n.address, "processes": n.processes,
                 "busy": len(n.inflight), "done": n.done, "hostname": n.hostname,
                 "connected_since": n.connected_since, "resources": dict(n.resources)}
                for n in self.nodes.values()
            ],
            "jobs": [
                {"id": j.job_id, "owner": j.owner.address, "function": j.function,
                 "sent": j.sent, "done": j.done, "failed": j.failed, "queued": len(j.queue)}
                for j in self.jobs.values()
            ],
        }
