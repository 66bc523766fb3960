"""The dashboard's data model: what the cluster is doing now, and what happened lately.

A :class:`Monitor` watches one :class:`~achilles.server.scheduler.Scheduler`: the scheduler
tells it about rare events (:class:`~achilles.server.observer.SchedulerObserver`), and
:meth:`Monitor.tick`, run a couple of times a second by the dashboard, samples the counters
the scheduler keeps anyway (items done per node and per job) into throughput series. Nothing
here runs per successful chunk.

Everything it hands out is plain JSON-ready data with printable text; it never holds a
payload, a pickled value or the secret.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from achilles.core import wire
from achilles.core.logs import printable
from achilles.server.dispatch import NodeState
from achilles.server.graphs import GraphState
from achilles.server.jobs import Chunk, GraphJob, Job, MapJob
from achilles.server.observer import SchedulerObserver

#: Seconds between two samples (and at most this many state updates per second, inverted).
TICK = 0.5
#: Seconds of throughput history kept.
HISTORY = 300.0
#: Seconds over which a job's and a node's rate is measured.
RATE_WINDOW = 10.0
#: Nodes whose own throughput line is kept (the first ones seen; a departed node's line ages
#: out after HISTORY seconds and frees its place). Beyond this, nodes count in the cluster's
#: line only: per-node history would grow the server by HISTORY / TICK samples per node.
MAX_NODE_SERIES = 32
#: Graphs with at most this many tasks are shown task by task.
SMALL_GRAPH = 200
MAX_EVENTS = 200
MAX_FAILURES = 50
MAX_FINISHED = 10
#: Longest traceback kept per failure (characters, the last ones are kept).
MAX_TRACEBACK = 8000
MAX_OUTPUT_LINES = 20
#: Upper bounds (seconds) of the job duration histogram's buckets.
DURATION_BUCKETS: Tuple[float, ...] = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                                       3600.0, float("inf"))


class Rate:
    """Items per second of one counter over the last :data:`RATE_WINDOW` seconds."""

    def __init__(self) -> None:
        self.samples: Deque[Tuple[float, int]] = collections.deque()

    def add(self, now: float, count: int) -> float:
        """Record ``count`` at ``now``; return the rate over the window."""
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()
        t0, c0 = self.samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0


class Histogram:
    """Cumulative bucket counts and a sum, Prometheus style (no dependency on its client)."""

    def __init__(self, bounds: Tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    @property
    def count(self) -> int:
        """Observations so far."""
        return self.counts[-1]


class Monitor(SchedulerObserver):
    """Live state, throughput history, recent failures and an event log of one scheduler.

    ``seq`` numbers every event and failure, so a viewer asks only for what it has not seen
    (:meth:`view`). Callables in :attr:`listeners` run after every :meth:`tick`.
    """

    def __init__(self, scheduler: Any, clock: Any = None) -> None:
        self.scheduler = scheduler
        self.clock = clock if clock is not None else scheduler.clock
        scheduler.observer = self
        self.started = time.time()
        self.seq = 0
        self.events: Deque[Dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self.failures: Deque[Dict[str, Any]] = collections.deque(maxlen=MAX_FAILURES)
        self.finished: Deque[Dict[str, Any]] = collections.deque(maxlen=MAX_FINISHED)
        self.listeners: List[Callable[[], None]] = []
        # counters for /metrics (all monotonic)
        self.retired_done = 0  # items done by nodes that have left
        self.chunks_failed = 0
        self.worker_crashes = 0
        self.timeouts = 0
        self.task_errors = 0
        self.jobs_ended: Dict[str, int] = collections.Counter()
        self.handshake_failures = 0
        self.bytes_from_controllers = 0  # chunk payloads relayed to nodes
        self.bytes_from_nodes = 0  # result payloads relayed to controllers
        self.durations = Histogram()
        # throughput
        self.cluster_series: Deque[Tuple[float, float]] = collections.deque()
        self.node_series: Dict[str, Deque[Tuple[float, float]]] = {}
        self._node_last: Dict[int, Tuple[float, int]] = {}
        self._node_rate: Dict[int, Rate] = {}
        self._job_rate: Dict[str, Rate] = {}
        self._job_rates: Dict[str, float] = {}
        self._last_total: Optional[Tuple[float, int]] = None
        self.cluster_rate = 0.0
        self.last_tick = 0.0

    # --- events from the scheduler -------------------------------------------------------
    def _log(self, kind: str, text: str, **extra: Any) -> None:
        self.seq += 1
        self.events.append({"seq": self.seq, "time": time.time(), "kind": kind,
                            "text": printable(text, 300), **extra})

    def node_joined(self, node: NodeState) -> None:
        self._log("node joined", f"node {node.name} joined from {node.address} "
                  f"({node.hostname}) with {node.processes} processes")

    def node_lost(self, node: NodeState, requeued: int) -> None:
        self.retired_done += node.done
        self._node_last.pop(node.node_id, None)
        self._node_rate.pop(node.node_id, None)
        self._log("node lost", f"node {node.name} lost; {requeued} chunk(s) re-queued")

    def job_started(self, job: Job) -> None:
        self._log("job started", f"{job.kind} {job.job_id[:8]} started by {job.owner.address}: "
                  f"{job.function}", job=job.job_id[:8])

    def job_ended(self, job: Job, reason: Optional[str] = None) -> None:
        elapsed = self.clock.seconds() - job.started
        state = "done" if reason is None else "cancelled"
        self.jobs_ended[state] += 1
        if reason is None:
            self.durations.observe(elapsed)
            self._log("job finished", f"{job.kind} {job.job_id[:8]} finished: {job.items_done} "
                      f"done, {job.chunks_failed} failed in {elapsed:.2f} s", job=job.job_id[:8])
        else:
            self._log("job cancelled", f"{job.kind} {job.job_id[:8]} cancelled: {reason}",
                      job=job.job_id[:8])
        summary = self._job(job, self.clock.seconds())
        summary.update(state=state, rate=None, eta=None, elapsed=elapsed)
        self.finished.appendleft(summary)
        self._job_rate.pop(job.job_id, None)
        self._job_rates.pop(job.job_id, None)

    def chunk_failed(self, job: Job, chunk: Chunk, status: int, node: NodeState,
                     detail: Any = None) -> None:
        self.chunks_failed += 1
        # the lines that arrived from the killed worker (a task's error brings its own)
        output = [text for _, _, text in chunk.tail[0]] if chunk.tail is not None else []
        if status == wire.TIMED_OUT:
            self.timeouts += 1
            self._failure(job, chunk.chunk_id, node.name, None, "TaskTimeout",
                          f"ran past its {chunk.timeout or 0:g} s timeout; its worker was replaced",
                          "", output)
            self._log("timeout", f"a task of {job.kind} {job.job_id[:8]} timed out on "
                      f"{node.name}", job=job.job_id[:8])
        elif status == wire.CRASHED and detail is not None:
            exitcode, item = detail
            self._failure(job, chunk.chunk_id, node.name, item, "WorkerCrashed",
                          f"killed its worker process {chunk.crashes} times (last exit code "
                          f"{exitcode})", "", output)

    def worker_crashed(self, job: Job, chunk: Chunk, node: NodeState, exitcode: Any,
                       retrying: bool) -> None:
        self.worker_crashes += 1
        self._log("worker crashed", f"a worker on {node.name} died (exit code {exitcode}) running "
                  f"chunk {chunk.chunk_id} of {job.job_id[:8]}"
                  + ("; retrying it" if retrying else "; giving up"), job=job.job_id[:8])

    # --- reports from peers ----------------------------------------------------------------
    def task_error(self, node: NodeState, job_id: str, chunk_id: int, index: int,
                   type_name: str, message: str, traceback: str, output: List[Any]) -> None:
        """A node's plain-text report of a task's error (``TASK_ERROR``). Ignored unless the
        chunk is in flight on that very node."""
        job = self.scheduler.jobs.get(job_id)
        if job is None or job.placed.get(chunk_id) is not node:
            return
        self.task_errors += 1
        self._failure(job, chunk_id, node.name, index, type_name, message, traceback, output)

    def handshake_failed(self) -> None:
        """A connection was refused during the handshake."""
        self.handshake_failures += 1

    def _failure(self, job: Job, chunk_id: int, node: str, index: Optional[int], type_name: str,
                 message: str, traceback: str, output: List[Any]) -> None:
        self.seq += 1
        where = f"chunk {chunk_id}" + (f" (its item {index})" if index is not None else "")
        task = job.task_of(chunk_id, index) if isinstance(job, GraphJob) else None
        if task is not None:
            where = f"task {task.name}#{task.task_id}"
        if len(traceback) > MAX_TRACEBACK:
            traceback = "...\n" + traceback[-MAX_TRACEBACK:]
        lines = [printable(line, 300) for line in output[-MAX_OUTPUT_LINES:]]
        self.failures.append({
            "seq": self.seq, "time": time.time(), "job": job.job_id[:8], "kind": job.kind,
            "function": job.function, "node": printable(node, 100), "where": where,
            "type": printable(type_name, 200), "message": printable(message, 1000),
            "traceback": _text(traceback), "output": lines})
        self._log("task failed", f"{printable(type_name, 100)} in {where} of {job.job_id[:8]} "
                  f"on {node}: {message}", job=job.job_id[:8])

    # --- sampling ----------------------------------------------------------------------------
    def items_done(self) -> int:
        """Items completed with status OK since the server started (monotonic)."""
        return self.retired_done + sum(n.done for n in self.scheduler.nodes.values())

    def tick(self) -> None:
        """Sample throughput (cluster, nodes, jobs), then tell the listeners."""
        now = self.last_tick = self.clock.seconds()
        total = self.items_done()
        if self._last_total is not None and now > self._last_total[0]:
            self.cluster_rate = (total - self._last_total[1]) / (now - self._last_total[0])
        self._last_total = (now, total)
        self._append(self.cluster_series, now, self.cluster_rate)
        for node in self.scheduler.nodes.values():
            last = self._node_last.get(node.node_id)
            rate = 0.0
            if last is not None and now > last[0]:
                rate = (node.done - last[1]) / (now - last[0])
            self._node_last[node.node_id] = (now, node.done)
            series = self.node_series.get(node.name)
            if series is None and len(self.node_series) < MAX_NODE_SERIES:
                series = self.node_series[node.name] = collections.deque()
            if series is not None:
                self._append(series, now, rate)
            self._node_rate.setdefault(node.node_id, Rate()).add(now, node.done)
        for name in [n for n, s in self.node_series.items() if not s or s[-1][0] < now - HISTORY]:
            del self.node_series[name]
        for job in self.scheduler.jobs.values():
            self._job_rates[job.job_id] = self._job_rate.setdefault(job.job_id, Rate()).add(
                now, job.items_done)
        for listener in list(self.listeners):
            listener()

    @staticmethod
    def _append(series: Deque[Tuple[float, float]], now: float, value: float) -> None:
        series.append((now, value))
        while series and series[0][0] < now - HISTORY:
            series.popleft()

    # --- views ----------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        """The cluster now: summary, nodes, jobs (running and recently finished)."""
        now = self.clock.seconds()
        sched = self.scheduler
        nodes = [self._node(n, now) for n in sched.nodes.values()]
        jobs = [self._job(j, now) for j in sched.jobs.values()]
        return {
            "summary": {
                "nodes": len(nodes), "processes": sched.processes,
                "busy": sum(n["busy"] for n in nodes), "jobs": len(jobs),
                "rate": round(self.cluster_rate, 3), "done": self.items_done(),
                "failed": self.chunks_failed, "uptime": time.time() - self.started},
            "nodes": nodes, "jobs": jobs, "finished": list(self.finished),
            "sample": {"t": self.last_tick, "cluster": self.cluster_rate,
                       "nodes": {n: s[-1][1] for n, s in self.node_series.items()
                                 if s and s[-1][0] == self.last_tick}},
        }

    def _node(self, n: NodeState, now: float) -> Dict[str, Any]:
        rate = self._node_rate.get(n.node_id)
        last_heard = getattr(n.peer, "last_heard", 0.0)
        return {
            "name": n.name, "host": n.hostname, "address": n.address, "processes": n.processes,
            "busy": min(len(n.inflight), n.processes), "inflight": len(n.inflight), "done": n.done,
            "rate": _rate_of(rate, now), "heard": max(0.0, now - last_heard) if last_heard else None,
            "load": dict(n.load), "resources": dict(n.resources),
            "used": {k: v for k, v in n.used.items() if v}, "since": n.connected_since,
        }

    def _job(self, j: Job, now: float) -> Dict[str, Any]:
        total: Optional[int] = None
        if isinstance(j, MapJob) and j.n_chunks is not None:
            total = j.items_sent
        rate = self._job_rates.get(j.job_id)
        out: Dict[str, Any] = {
            "id": j.job_id[:8], "kind": j.kind, "owner": j.owner.address, "function": j.function,
            "state": j.state, "sent": j.items_sent, "done": j.items_done,
            "failed": j.chunks_failed, "queued": len(j.queue), "inflight": len(j.placed),
            "total": total, "rate": rate, "elapsed": now - j.started, "eta": None,
        }
        if isinstance(j, GraphJob):
            out["total"] = len(j.graph.tasks)
            out["graph"] = graph_view(j.graph)
        if out["total"] is not None and rate:
            out["eta"] = max(0, out["total"] - j.items_done) / rate
        return out

    def view(self, since: int = 0) -> Dict[str, Any]:
        """The state, plus events and failures numbered after ``since``."""
        return {"seq": self.seq, "state": self.state(),
                "events": [e for e in self.events if e["seq"] > since],
                "failures": [f for f in self.failures if f["seq"] > since]}

    def history(self) -> Dict[str, Any]:
        """Throughput series of the last :data:`HISTORY` seconds: ``[[t, items/s], ...]``."""
        return {"now": self.clock.seconds(),
                "cluster": [list(p) for p in self.cluster_series],
                "nodes": {name: [list(p) for p in s] for name, s in self.node_series.items()}}


def graph_view(graph: GraphState) -> Dict[str, Any]:
    """A graph's tasks counted by state, and for small graphs each task with its inputs."""
    counts: Dict[str, int] = collections.Counter(t.state for t in graph.tasks.values())
    view: Dict[str, Any] = {"states": dict(counts)}
    if len(graph.tasks) <= SMALL_GRAPH:
        view["tasks"] = [{"id": t.task_id, "name": t.name, "deps": list(t.deps),
                          "state": t.state, "node": t.node} for t in graph.tasks.values()]
    return view


def _rate_of(rate: Optional[Rate], now: float) -> float:
    if rate is None or len(rate.samples) < 2:
        return 0.0
    t0, c0 = rate.samples[0]
    t1, c1 = rate.samples[-1]
    return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


def _text(text: str) -> str:
    """Multi-line text with every line made printable (tracebacks keep their line breaks)."""
    return "\n".join(printable(line, 1000) for line in text.splitlines())
