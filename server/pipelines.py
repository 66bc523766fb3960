"""Stage pipelines on the server: a third job kind that streams batches between stage copies.

A pipeline is a graph of *stages* (``PIPE_START`` declares them). Each stage has one or more
*copies*, long-lived processes on nodes (:mod:`achilles.node.stages`) that share the stage's
input queue, and a *route* saying where its outputs go: a stage (an index), the controller
(``"out"``), every branch (``["all", [...]]``, broadcast) or one branch (``["any", [...]]``,
the least filled). Source batches come from the controller (``PIPE_FEED``) or from source
stages (``pull`` requests).

Flow control is credit-based at every link, so memory stays bounded everywhere:

- a copy holds at most :data:`COPY_PREFETCH` requests;
- a copy is handed work only while its stage's route has room: each stage queue holds at most
  :meth:`Stage.bound` batches, and at most :data:`OUT_WINDOW` result batches wait for the
  controller to consume them (``PIPE_FEED`` ``consumed``);
- the controller is asked for input (``WANT``) only while the first stages have room.

Exactly once: a batch stays in its copy's ``inflight`` until the copy answers, and only an
answer from the copy's current incarnation on its current node counts. A copy whose process or
node dies is started again (``setup`` runs again) on the least loaded node that offers its
resources, and the batches it held go back to the front of its stage's queue; a source copy
skips, after a restart, the items it had delivered. Every source batch (its *origin*) is
tracked until all batches derived from it have left the pipeline, so the controller learns
when an origin is complete (``last``) and can restore input order.
"""

from __future__ import annotations

import collections
import logging
import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Set, Tuple

from achilles.core import wire
from achilles.core.errors import ProtocolError, ResourceUnavailable, WorkerCrashed
from achilles.core.output import decode_lines
from achilles.core.serialization import error_record
from achilles.server.dispatch import NodeState
from achilles.server.jobs import Chunk, ControllerState, Job

if TYPE_CHECKING:
    from achilles.server.scheduler import Scheduler

log = logging.getLogger("achilles.server")

#: Requests in flight per stage copy (the next batch waits on the node while one runs).
COPY_PREFETCH = 2
#: Result batches sent to the controller and not yet consumed there.
OUT_WINDOW = 8
#: Input chunks the controller may send ahead of the first stages' room.
INPUT_CREDIT = 2
#: Origin of outputs that no source batch caused (``setup`` and ``teardown`` outputs).
EXTRA = -1
#: Kinds of PIPE_RESULT.
ITEMS, ERRORS, FAILED, DONE = 0, 1, 2, 3

Route = Any  # int | "out" | ["all"|"any", [Route, ...]]


@dataclass
class Batch:
    """Items on their way to a stage: the source batch they derive from and their path."""

    origin: int
    key: Tuple[int, ...]
    n_items: int
    payload: bytes
    crashes: int = 0


@dataclass(eq=False)
class Copy:
    """One copy of a stage: where it runs and what it holds."""

    stage: int
    index: int
    code: bytes
    incarnation: int = 0
    node: Optional[NodeState] = None
    state: str = "unplaced"  # unplaced -> starting -> ready -> ending -> ended
    inflight: Dict[int, Tuple[str, Optional[Batch]]] = field(default_factory=dict)
    next_seq: int = 0
    accepted: int = 0  # items a source copy delivered (skipped after a restart)
    exhausted: bool = False
    restarts: int = 0
    crashes: int = 0  # deaths in a row outside any batch (setup, teardown, a source)


@dataclass(eq=False)
class Stage:
    """One stage: its copies, input queue and route."""

    index: int
    name: str
    copies: List[Copy]
    resources: Dict[str, float]
    route: Route
    source: bool
    on_error: str
    queue: Deque[Batch] = field(default_factory=collections.deque)
    producers: int = 0  # upstream stages (and the controller's input) not finished yet
    finished: bool = False
    items_in: int = 0
    items_out: int = 0
    skipped: int = 0

    def bound(self) -> int:
        """Batches this stage's queue may hold before its producers wait."""
        return max(4, 2 * len(self.copies))

    def busy(self) -> int:
        """Copies working on a request now."""
        return sum(1 for c in self.copies if c.inflight)


class PipelineJob(Job):
    """One stage pipeline of one controller."""

    kind = "pipeline"

    def __init__(self, job_id: str, owner: ControllerState, name: str, stages: List[Stage],
                 options: Dict[str, Any], started: float, sched: "Scheduler") -> None:
        super().__init__(job_id, owner, name, b"", b"", dict(options), started)
        self.sched = sched
        self.stages = stages
        self.entry: Route = options.get("entry")
        self.batch = int(options.get("batch") or 16)
        self.input_done = self.entry is None
        self.input_credit = 0
        self.pending: Dict[int, int] = collections.defaultdict(int)
        self.next_origin = 0  # for batches pulled from source stages
        self.unacked = 0
        self.complete = False
        for stage in stages:
            for target in _leaves(stage.route):
                if target != "out":
                    self.stages[target].producers += 1
        for target in _leaves(self.entry):
            if target != "out":
                self.stages[target].producers += 1

    # --- the Job interface ------------------------------------------------------------------
    def on_result(self, chunk: Chunk, status: int, payload: bytes, elapsed: float,
                  node: NodeState) -> Optional[float]:
        return None  # a pipeline sends no chunks through the scheduler's queues

    @property
    def finished(self) -> bool:
        return self.complete

    def on_finish(self) -> None:
        stats = {"stages": [self._stage_status(s) for s in self.stages]}
        self.owner.peer.send(wire.PIPE_RESULT, self.job_id, EXTRA, [], True, DONE,
                             pickle.dumps(stats, protocol=5))

    def live_ids(self) -> Set[int]:
        return set()

    def node_joined(self, node: NodeState) -> None:
        self.place_all()
        self.pump()

    def node_lost(self, node: NodeState) -> None:
        for stage in self.stages:
            for copy in stage.copies:
                if copy.node is node and copy.state != "ended":
                    self._copy_lost(copy, None, f"node {node.name} was lost")
        if self.state == "running":
            self.place_all()
            self.pump()

    def status(self) -> Dict[str, Any]:
        out = super().status()
        out.update(stages=[self._stage_status(s) for s in self.stages])
        return out

    def _stage_status(self, s: Stage) -> Dict[str, Any]:
        return {"name": s.name, "copies": len(s.copies), "busy": s.busy(), "queued": len(s.queue),
                "bound": s.bound(), "items_in": s.items_in, "items_out": s.items_out,
                "skipped": s.skipped, "restarts": sum(c.restarts for c in s.copies),
                "nodes": sorted({c.node.name for c in s.copies
                                  if c.node is not None and c.state != "ended"}),
                "finished": s.finished}

    # --- start and placement ----------------------------------------------------------------
    def start(self) -> None:
        """Place every copy (where nodes are connected) and ask for input."""
        self.place_all()
        self.pump()

    def place_all(self) -> None:
        """Start every unplaced copy on a node; fail if no connected node offers a stage's
        resources."""
        nodes = list(self.sched.nodes.values())
        if not nodes or self.state != "running":
            return
        for stage in self.stages:
            if stage.resources and not any(n.offers(stage.resources) for n in nodes):
                offered = sorted({f"{k}={v:g}" for n in nodes for k, v in n.resources.items()})
                want = ", ".join(f"{k}={v:g}" for k, v in stage.resources.items())
                self.fail(error_record(0, ResourceUnavailable(
                    f"stage {stage.name} needs {want}, which no connected node offers (nodes "
                    f"offer: {', '.join(offered) or 'nothing'}); start a node with --resources"),
                    []))
                return
        need: Dict[str, float] = collections.defaultdict(float)
        for stage in self.stages:
            for k, v in stage.resources.items():
                need[k] += v
        for k, v in need.items():
            total = sum(n.resources.get(k, 0.0) for n in nodes)
            if v > total:
                names = ", ".join(s.name for s in self.stages if k in s.resources)
                self.fail(error_record(0, ResourceUnavailable(
                    f"stages {names} need {k}={v:g} at once (one copy each), but the connected "
                    f"nodes offer {k}={total:g} in all; start nodes with more --resources"), []))
                return
        for stage in self.stages:
            for copy in stage.copies:
                if copy.state == "unplaced":
                    self._place(stage, copy, nodes)

    def _place(self, stage: Stage, copy: Copy, nodes: List[NodeState],
               avoid: Optional[NodeState] = None) -> None:
        used = self._reserved()
        fits = [n for n in nodes if all(
            n.resources.get(k, 0.0) - n.used.get(k, 0.0) - used.get(n.node_id, {}).get(k, 0.0) >= v
            for k, v in stage.resources.items())]
        if not fits:
            return  # waits for resources held by other pipelines or tasks

        def load(n: NodeState) -> Tuple[int, int, int, float]:
            mine = sum(1 for c in stage.copies if c.node is n)
            total = sum(1 for s in self.stages for c in s.copies if c.node is n)
            return (n is avoid, mine, total, -n.processes)

        node = min(fits, key=load)
        copy.node = node
        copy.state = "starting"
        if self.job_id not in node.jobs_shipped:
            node.jobs_shipped.add(self.job_id)
            self.shipped_to[node.node_id] = node
        spec = {"code": copy.code, "name": stage.name, "copy": copy.index,
                "on_error": stage.on_error, "skip": copy.accepted, "source": stage.source,
                "batch": self.batch, "forward": self.forwards_output}
        self._send(copy, "start", None, pickle.dumps(spec, protocol=5))

    def _reserved(self) -> Dict[int, Dict[str, float]]:
        """Resources held by placed copies of every pipeline, by node id."""
        out: Dict[int, Dict[str, float]] = collections.defaultdict(dict)
        for job in self.sched.jobs.values():
            if isinstance(job, PipelineJob) and job.state == "running":
                for s in job.stages:
                    for c in s.copies:
                        if c.node is not None and c.state != "ended" and s.resources:
                            held = out[c.node.node_id]
                            for k, v in s.resources.items():
                                held[k] = held.get(k, 0.0) + v
        return out

    def _send(self, copy: Copy, op: str, batch: Optional[Batch], payload: bytes) -> None:
        assert copy.node is not None
        seq = copy.next_seq
        copy.next_seq += 1
        copy.inflight[seq] = (op, batch)
        copy.node.peer.send(wire.PIPE_WORK, self.job_id, copy.stage, copy.index,
                            copy.incarnation, seq, op, payload)

    # --- flow -------------------------------------------------------------------------------
    def room(self, route: Route) -> bool:
        """Whether outputs sent along ``route`` have somewhere to wait."""
        if route == "out":
            return self.unacked < OUT_WINDOW
        if isinstance(route, int):
            return len(self.stages[route].queue) < self.stages[route].bound()
        mode, branches = route
        if mode == "all":
            return all(self.room(b) for b in branches)
        return any(self.room(b) for b in branches)

    def fill(self, route: Route) -> float:
        """How full ``route`` is, 0 to 1 (for picking the emptiest branch)."""
        if route == "out":
            return self.unacked / OUT_WINDOW
        if isinstance(route, int):
            return len(self.stages[route].queue) / self.stages[route].bound()
        return min(self.fill(b) for b in route[1])

    def pump(self) -> None:
        """Hand work to every copy that has room, ask for input, finish stages and the job."""
        if self.state != "running":
            return
        progress = True
        while progress and self.state == "running":
            progress = False
            for stage in self.stages:
                for copy in stage.copies:
                    if copy.state != "ready" or len(copy.inflight) >= COPY_PREFETCH:
                        continue
                    if stage.source:
                        if copy.exhausted:
                            if not copy.inflight:
                                copy.state = "ending"
                                self._send(copy, "end", None, b"")
                            continue
                        if not copy.inflight and self.room(stage.route):
                            self._send(copy, "pull", None, b"")
                        continue
                    while (stage.queue and len(copy.inflight) < COPY_PREFETCH
                           and self.room(stage.route)):
                        batch = stage.queue.popleft()
                        self._send(copy, "items", batch, batch.payload)
                    if (not stage.queue and stage.producers == 0 and not copy.inflight):
                        copy.state = "ending"
                        self._send(copy, "end", None, b"")
                if (not stage.finished and stage.producers == 0 and not stage.queue
                        and all(c.state == "ended" for c in stage.copies)):
                    stage.finished = True
                    for target in _leaves(stage.route):
                        if target != "out":
                            self.stages[target].producers -= 1
                    progress = True
        self._refill()
        if (not self.complete and self.input_done and all(s.finished for s in self.stages)
                and not any(self.pending.values())):
            self.complete = True
            self.sched.settle(self)

    def _refill(self) -> None:
        if self.input_done or self.entry is None or self.state != "running":
            return
        if self.input_credit < INPUT_CREDIT and self.room(self.entry):
            want = INPUT_CREDIT - self.input_credit
            self.input_credit += want
            self.owner.peer.send(wire.WANT, self.job_id, want, self.sched.processes,
                                 self.sched.capacity)

    def feed(self, batch_id: int, n_items: int, consumed: int, end: bool, payload: bytes) -> None:
        """A PIPE_FEED from the controller."""
        if consumed < 0 or n_items < 0 or batch_id < 0:
            raise ProtocolError(f"PIPE_FEED for pipeline {self.job_id[:8]} is malformed")
        self.unacked = max(0, self.unacked - consumed)
        if n_items:
            if self.input_done:
                raise ProtocolError(f"input for pipeline {self.job_id[:8]} after its end")
            self.input_credit = max(0, self.input_credit - 1)
            self.items_sent += n_items
            self._emit(self.entry, batch_id, (), n_items, bytes(payload), count_old=False)
        if end and not self.input_done:
            self.input_done = True
            for target in _leaves(self.entry):
                if target != "out":
                    self.stages[target].producers -= 1
        self.pump()

    def _emit(self, route: Route, origin: int, key: Tuple[int, ...], n_items: int,
              payload: bytes, count_old: bool = True, errors: bytes = b"") -> None:
        """Send one batch of outputs along ``route``; ``count_old``: it replaces a batch of
        the same origin that is now done."""
        outs: List[Tuple[Tuple[int, ...], bytes]] = []
        created = self._route(route, origin, key, n_items, payload, outs) if n_items else 0
        self.pending[origin] += created - (1 if count_old else 0)
        left = self.pending[origin]
        if left <= 0:
            del self.pending[origin]
        if errors:
            self._deliver(origin, key, False, ERRORS, errors)
        for i, (k, p) in enumerate(outs):
            self._deliver(origin, k, left <= 0 and i == len(outs) - 1, ITEMS, p)
        if not outs and left <= 0 and origin != EXTRA:
            self._deliver(origin, key, True, ITEMS, b"")

    def _route(self, route: Route, origin: int, key: Tuple[int, ...], n_items: int,
               payload: bytes, outs: List[Tuple[Tuple[int, ...], bytes]]) -> int:
        if route == "out":
            outs.append((key, payload))
            self.items_done += n_items
            return 0
        if isinstance(route, int):
            stage = self.stages[route]
            stage.queue.append(Batch(origin, key, n_items, payload))
            stage.items_in += n_items
            return 1
        mode, branches = route
        if mode == "all":
            return sum(self._route(b, origin, key + (i,), n_items, payload, outs)
                       for i, b in enumerate(branches))
        best = min(branches, key=self.fill)
        return self._route(best, origin, key, n_items, payload, outs)

    def _deliver(self, origin: int, key: Tuple[int, ...], last: bool, kind: int,
                 payload: bytes) -> None:
        self.unacked += 1
        self.owner.peer.send(wire.PIPE_RESULT, self.job_id, origin, list(key), last, kind, payload)

    def output(self, node: NodeState, stage_i: int, copy_i: int, dropped: int,
               payload: bytes) -> None:
        """A PIPE_OUTPUT from ``node``: lines a copy placed there wrote, relayed to the owner
        (unless it turned output off); ProtocolError if malformed."""
        if dropped < 0:
            raise ProtocolError(f"PIPE_OUTPUT for pipeline {self.job_id[:8]} drops {dropped} "
                                "lines")
        decode_lines(payload)
        if (self.state != "running" or not self.forwards_output
                or not 0 <= stage_i < len(self.stages)
                or not 0 <= copy_i < len(self.stages[stage_i].copies)
                or self.stages[stage_i].copies[copy_i].node is not node):
            return
        self.owner.peer.send(wire.PIPE_OUTPUT, self.job_id, stage_i, copy_i, node.name, dropped,
                             payload)

    # --- answers from copies ----------------------------------------------------------------
    def answer(self, node: NodeState, stage_i: int, copy_i: int, incarnation: int, seq: int,
               status: int, n_items: int, skipped: int, exhausted: bool, errors: bytes,
               payload: bytes) -> None:
        """A PIPE_OUT from ``node``. Answers from an old incarnation or another node are
        dropped, so every request counts once."""
        if self.state != "running" or not 0 <= stage_i < len(self.stages):
            return
        stage = self.stages[stage_i]
        if not 0 <= copy_i < len(stage.copies):
            return
        copy = stage.copies[copy_i]
        if copy.node is not node or copy.incarnation != incarnation:
            return
        if status == wire.CRASHED:
            self._copy_lost(copy, seq, f"its process on node {node.name} died")
            if self.state == "running":
                self.place_all()
                self.pump()
            return
        request = copy.inflight.pop(seq, None)
        if request is None:
            return
        op, batch = request
        if status != wire.OK:
            self.fail(bytes(payload))
            return
        copy.crashes = 0
        stage.skipped += skipped
        stage.items_out += n_items
        if op == "start":
            copy.state = "ready"
            self._emit(stage.route, EXTRA, (), n_items, bytes(payload), count_old=False,
                       errors=errors)
        elif op == "items":
            assert batch is not None
            self._emit(stage.route, batch.origin, batch.key, n_items, bytes(payload),
                       errors=errors)
        elif op == "pull":
            copy.accepted += n_items
            copy.exhausted = exhausted
            if n_items:
                self.items_sent += n_items
                origin = self.next_origin
                self.next_origin += 1
                self._emit(stage.route, origin, (), n_items, bytes(payload), count_old=False)
        elif op == "end":
            copy.state = "ended"
            self._emit(stage.route, EXTRA, (), n_items, bytes(payload), count_old=False,
                       errors=errors)
            if stage.resources:
                self._wake()
        self.pump()

    def _wake(self) -> None:
        """Resources were freed: place the copies of every pipeline that waits for some."""
        for job in list(self.sched.jobs.values()):
            if isinstance(job, PipelineJob) and job.state == "running" and any(
                    c.state == "unplaced" for s in job.stages for c in s.copies):
                job.place_all()
                job.pump()

    def drop(self) -> None:
        super().drop()
        if any(s.resources for s in self.stages):
            self._wake()

    def _copy_lost(self, copy: Copy, seq: Optional[int], why: str) -> None:
        """The copy's process or node is gone: re-queue what it held, start it again."""
        stage = self.stages[copy.stage]
        held = sorted(copy.inflight.items(), reverse=True)
        copy.inflight.clear()
        blamed = dict(held).get(seq) if seq is not None else None
        if blamed is not None and blamed[1] is None:
            copy.crashes += 1
            if copy.crashes >= self.sched.max_crashes:
                self.fail(error_record(0, WorkerCrashed(
                    f"stage {stage.name} copy {copy.index} died {copy.crashes} times in a row "
                    f"outside do() (last: {why}, during {blamed[0]})"), []))
                return
        for s, (op, batch) in held:
            if batch is None:
                continue
            if s == seq:
                batch.crashes += 1
                if batch.crashes >= self.sched.max_crashes:
                    self.fail(error_record(0, WorkerCrashed(
                        f"a batch of {batch.n_items} items killed stage {stage.name} copy "
                        f"{copy.index} {batch.crashes} times (last: {why})"), []))
                    return
            stage.queue.appendleft(batch)
        log.warning("pipeline %s: stage %s copy %d lost (%s); %d batch(es) re-queued, "
                    "starting it again", self.job_id[:8], stage.name, copy.index, why,
                    sum(1 for _, (op, b) in held if b is not None))
        copy.incarnation += 1
        copy.restarts += 1
        copy.node = None
        copy.state = "unplaced"

    def fail(self, record: bytes) -> None:
        """The pipeline failed: tell the controller (``record`` is an error record) and stop
        every copy."""
        if self.state != "running":
            return
        self.owner.peer.send(wire.PIPE_RESULT, self.job_id, EXTRA, [], True, FAILED, record)
        self.sched.abort(self, "a stage failed")


def _leaves(route: Route) -> List[Any]:
    """Every stage index (or ``"out"``) a route can reach directly."""
    if route is None:
        return []
    if route == "out" or isinstance(route, int):
        return [route]
    return [leaf for branch in route[1] for leaf in _leaves(branch)]


def check_route(route: Any, n_stages: int, depth: int = 0) -> None:
    """Raise ValueError unless ``route`` is well formed."""
    if depth > 64:
        raise ValueError("route nested too deeply")
    if route == "out":
        return
    if isinstance(route, int) and not isinstance(route, bool):
        if not 0 <= route < n_stages:
            raise ValueError(f"route to unknown stage {route}")
        return
    if (isinstance(route, (list, tuple)) and len(route) == 2 and route[0] in ("all", "any")
            and isinstance(route[1], (list, tuple)) and route[1]):
        for branch in route[1]:
            check_route(branch, n_stages, depth + 1)
        return
    raise ValueError(f"malformed route {route!r}")


def build(job_id: str, owner: ControllerState, name: str, specs: List[Any],
          options: Dict[str, Any], started: float, sched: "Scheduler") -> PipelineJob:
    """A :class:`PipelineJob` from PIPE_START's fields; ValueError/TypeError if malformed."""
    if not specs:
        raise ValueError("a pipeline needs at least one stage")
    stages: List[Stage] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise TypeError(f"stage {i} is not a dict")
        codes = spec["codes"]
        if not isinstance(codes, (list, tuple)) or not codes or not all(
                isinstance(c, bytes) for c in codes):
            raise TypeError(f"stage {i} has no code")
        resources = {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
        check_route(spec["route"], len(specs))
        on_error = str(spec.get("on_error") or "fail")
        if on_error not in ("fail", "skip", "collect"):
            raise ValueError(f"stage {i}: on_error must be fail, skip or collect")
        stages.append(Stage(i, str(spec.get("name") or f"stage{i}")[:100],
                            [Copy(i, j, c) for j, c in enumerate(codes)], resources,
                            spec["route"], bool(spec.get("source")), on_error))
    entry = options.get("entry")
    if entry is not None:
        check_route(entry, len(specs))
    reachable = set(_leaves(entry)) | {s.index for s in stages if s.source}
    for s in stages:
        reachable |= set(_leaves(s.route))
    if any(s.index not in reachable for s in stages):
        raise ValueError("a stage has neither input nor source")
    if any(s.index in set(_leaves(s.route)) for s in stages):
        raise ValueError("a stage routes to itself")
    return PipelineJob(job_id, owner, name, stages, options, started, sched)
