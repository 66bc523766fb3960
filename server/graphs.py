"""Call graphs on the server: release each task when its inputs are done, retry, skip.

A graph arrives whole (``GRAPH``). Tasks become :class:`~achilles.server.scheduler.Chunk` s
of a graph job as soon as every input has a value, and go through the same credit-based fair
dispatch as map chunks. Inputs' values travel inside the chunk payload; they never go back to
the controller, and the server drops each value once every consumer has settled (unless the
controller asked for it). A failed task skips everything downstream of it; other branches go
on; the graph ends when every task is done, failed or skipped.

Fast tasks travel in batches (:class:`Batch`): once a task function's typical run time (the
median of its last runs) is under :data:`FAST_TASK`, ready tasks of such functions (without timeout, retries or resources)
are handed out many to a chunk, and each batch also takes the tasks downstream of it whose
inputs are all in the batch or done (their intermediate values stay in the worker). A batch
holds enough work to cover :data:`BATCH_SECONDS` at most, and no more than its share of the
ready tasks over the cluster's credit, so batching never leaves a worker idle that a smaller
batch would have fed. A batch that comes back without its results (lost node, crashed worker,
a result too large) is dissolved: its tasks run again one to a chunk.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Optional, Set, Tuple

from achilles.core import wire
from achilles.core.logs import printable

WAITING, QUEUED, RUNNING, DONE, FAILED, SKIPPED = (
    "waiting", "queued", "running", "done", "failed", "skipped")

#: A task function whose typical run time (the median of its last :data:`SAMPLES` runs) is
#: below this many seconds is batched.
FAST_TASK = 0.002
#: Runs per task function that its typical run time is taken from (a median: the first runs on
#: each worker, which load its code, or a run the host preempted, do not sway it).
SAMPLES = 15
#: A batch holds at most this many seconds of its tasks' measured run time ...
BATCH_SECONDS = 0.01
#: ... and at most this many tasks.
MAX_BATCH = 512
#: A task's outcome in a batch's result that says it did not run (an input in the batch failed).
NOT_RUN = -1


class GraphTask:
    """One task of a graph, as the server sees it (arguments stay opaque)."""

    __slots__ = ("task_id", "name", "deps", "options", "func_key", "args", "plain",
                 "dependents", "remaining", "state", "value", "consumed", "batch", "careful",
                 "batched", "attempts", "node", "started", "duration")

    def __init__(self, task_id: int, name: str, deps: List[int], options: Dict[str, Any],
                 func_key: str, args: Any, plain: bool = False) -> None:
        self.task_id = task_id
        self.name = name
        self.deps = deps
        self.options = options
        self.func_key = func_key
        self.args = args
        self.plain = plain  # no timeout, retries or resources: it may be batched
        self.dependents: List[int] = []
        self.remaining = 0
        self.state = WAITING
        self.value: Optional[bytes] = None
        self.consumed = 0  # dependents settled (done, failed or skipped): the value goes at all
        self.batch = 0  # the id of the batch it runs in (0: none)
        self.careful = False  # it was in a batch that came back without results: never batched
        self.batched = False  # its last run was in a batch
        self.attempts = 0
        self.node: Optional[str] = None
        self.started = 0.0
        self.duration: Optional[float] = None


@dataclass
class Batch:
    """Tasks sent in one chunk, inputs before consumers; ``keep``: the tasks whose values
    must come back (an output, or a consumer outside the batch)."""

    batch_id: int
    tasks: List[GraphTask]
    keep: Set[int]
    ready: int  # how many of ``tasks`` (the first ones) were queued when it was made


class GraphState:
    """The tasks of one graph job and the rules that move them."""

    def __init__(self, tasks: List[Tuple[int, str, List[int], Dict[str, Any], str, bytes]],
                 outputs: List[int]) -> None:
        self.tasks: Dict[int, GraphTask] = {}
        names: Dict[str, str] = {}
        # Tasks of one function share one options dict on the wire: copied and judged once.
        shared: Dict[int, Tuple[Dict[str, Any], bool]] = {}
        for task_id, name, deps, options, func_key, args in tasks:
            known = shared.get(id(options))
            if known is None:
                opts = dict(options or {})
                known = shared[id(options)] = (opts, opts.get("timeout") is None
                                               and not opts.get("retries")
                                               and not opts.get("resources"))
                if options is not None:
                    shared[id(options)] = known
            label = names.get(name)
            if label is None:
                label = names[name] = printable(name, 100)
            self.tasks[int(task_id)] = GraphTask(int(task_id), label, [int(d) for d in deps],
                                                 known[0], str(func_key), args, known[1])
        for t in self.tasks.values():
            for d in t.deps:
                if d not in self.tasks:
                    raise ValueError(f"task {t.task_id} depends on unknown task {d}")
                self.tasks[d].dependents.append(t.task_id)
            t.remaining = len(t.deps)
        self.outputs = set(int(o) for o in outputs)
        self.unresolved = len(self.tasks)
        self.costs: Dict[str, Deque[float]] = {}  # function key -> its last run times
        self.fast: Dict[str, float] = {}  # function key -> median run time, while fast
        self._stale: Set[str] = set()  # functions timed since their median was taken
        self.batches: Dict[int, Batch] = {}  # live batches by (negative) id
        self._next_batch = 0

    def initial(self) -> List[GraphTask]:
        """Tasks with no inputs."""
        return [t for t in self.tasks.values() if t.remaining == 0]

    def payload(self, t: GraphTask) -> bytes:
        """What a worker needs to run ``t``: function key, arguments, input values."""
        tasks = self.tasks
        return pickle.dumps((t.func_key, t.args, {d: tasks[d].value for d in t.deps}),
                            protocol=5)

    def _consume(self, t: GraphTask) -> None:
        """``t`` settled: drop each input's value once all of that input's consumers have."""
        for d in t.deps:
            dep = self.tasks[d]
            dep.consumed += 1
            if dep.consumed >= len(dep.dependents) and d not in self.outputs:
                dep.value = None

    def finished(self, t: GraphTask, value: Optional[bytes]) -> List[GraphTask]:
        """``t`` produced ``value``; return the tasks that are now ready."""
        t.state = DONE
        t.value = value if t.dependents or t.task_id in self.outputs else None
        t.batch = 0
        self.unresolved -= 1
        self._consume(t)
        ready = []
        tasks = self.tasks
        for c in t.dependents:
            child = tasks[c]
            child.remaining -= 1
            if child.remaining == 0 and child.state == WAITING:
                ready.append(child)
        return ready

    def failed(self, t: GraphTask) -> List[GraphTask]:
        """``t`` failed for good: it and everything downstream will not run (also what runs
        in ``t``'s own batch after it, which the worker did not run)."""
        batch = t.batch
        t.state = FAILED
        t.batch = 0
        self.unresolved -= 1
        self._consume(t)
        skipped = []
        stack = list(t.dependents)
        while stack:
            child = self.tasks[stack.pop()]
            if child.state in (WAITING, QUEUED) or (batch and child.batch == batch
                                                    and child.state == RUNNING):
                child.state = SKIPPED
                child.batch = 0
                self.unresolved -= 1
                self._consume(child)
                skipped.append(child)
                stack.extend(child.dependents)
        return skipped

    # --- batches ----------------------------------------------------------------------------
    def timed(self, t: GraphTask, seconds: float) -> None:
        """Record that a run of ``t``'s function took ``seconds``."""
        samples = self.costs.get(t.func_key)
        if samples is None:
            samples = self.costs[t.func_key] = collections.deque(maxlen=SAMPLES)
        samples.append(float(seconds))
        self._stale.add(t.func_key)

    def cost(self, t: GraphTask) -> Optional[float]:
        """The typical run time of ``t``'s function when ``t`` may be batched (its function
        is fast, and it has no timeout, retries or resources), else None."""
        if not t.plain or t.careful:
            return None
        key = t.func_key
        if key in self._stale:
            self._stale.discard(key)
            ordered = sorted(self.costs[key])
            median = ordered[len(ordered) // 2]
            if median < FAST_TASK:
                self.fast[key] = median
            else:
                self.fast.pop(key, None)
        return self.fast.get(key)

    def batch(self, first: GraphTask, more: Iterable[GraphTask], share: int) -> Optional[Batch]:
        """A batch of ``first`` (queued, ready), then of the ready tasks of ``more`` while they
        can be batched (at most ``share`` ready tasks in all), then of the tasks downstream of
        them whose inputs are all in the batch or done; None when ``first`` is not batched.
        The caller takes the ready tasks the batch holds (``first`` and the next
        ``batch.ready - 1`` of ``more``) off its queue. Its tasks are RUNNING from here on."""
        cost = self.cost(first)
        if cost is None or share < 2:
            return None
        budget = BATCH_SECONDS - cost
        tasks = [first]
        members = {first.task_id}
        for t in more:
            if len(tasks) >= min(share, MAX_BATCH):
                break
            c = self.cost(t)
            if c is None or c > budget:
                break
            budget -= c
            tasks.append(t)
            members.add(t.task_id)
        ready = len(tasks)
        # Downstream tasks whose inputs are all in the batch or done run in it too.
        index = 0
        while index < len(tasks) and len(tasks) < MAX_BATCH:
            for c in tasks[index].dependents:
                child = self.tasks[c]
                if child.state != WAITING or c in members:
                    continue
                cc = self.cost(child)
                if cc is None or cc > budget:
                    continue
                if all(d in members or self.tasks[d].state == DONE for d in child.deps):
                    budget -= cc
                    tasks.append(child)
                    members.add(c)
                    if len(tasks) >= MAX_BATCH:
                        break
            index += 1
        if len(tasks) < 2:
            return None
        self._next_batch -= 1
        batch = Batch(self._next_batch, tasks, {
            t.task_id for t in tasks if t.task_id in self.outputs
            or any(c not in members for c in t.dependents)}, ready)
        for t in tasks:
            t.batch = batch.batch_id
            t.state = RUNNING
        self.batches[batch.batch_id] = batch
        return batch

    def batch_payload(self, batch: Batch) -> bytes:
        """What a worker needs to run a batch (see
        :func:`achilles.node.worker.run_graph_batch`): per task, in order, its id, function
        key, arguments, the values of its inputs from outside the batch and the ids of those
        inside it; then the ids whose values must come back."""
        tasks = self.tasks
        members = {t.task_id for t in batch.tasks}
        return pickle.dumps((
            [(t.task_id, t.func_key, t.args,
              {d: tasks[d].value for d in t.deps if d not in members},
              [d for d in t.deps if d in members]) for t in batch.tasks],
            sorted(batch.keep)), protocol=5)

    def dissolve(self, batch: Batch) -> List[GraphTask]:
        """Take back a batch that returned no results: its tasks whose inputs are done are
        ready again (returned, to be queued one to a chunk), the others wait; none of them is
        batched again."""
        self.batches.pop(batch.batch_id, None)
        ready = []
        for t in batch.tasks:
            if t.batch != batch.batch_id:
                continue  # settled by a partial result
            t.batch = 0
            t.careful = True
            if t.remaining == 0:
                ready.append(t)
            else:
                t.state = WAITING
        return ready

    @property
    def complete(self) -> bool:
        return self.unresolved <= 0

    def report(self) -> Dict[int, Dict[str, Any]]:
        """Per task: state, node, duration (s), attempts, whether its last run was in a batch."""
        return {t.task_id: {"state": t.state, "node": t.node, "duration": t.duration,
                            "attempts": t.attempts, "batched": t.batched}
                for t in self.tasks.values()}


def retry_status(status: int) -> bool:
    """Whether a failure of this kind may be retried under ``retries``."""
    return status in (wire.ITEM_ERROR, wire.TIMED_OUT)
