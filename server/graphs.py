"""Call graphs on the server: release each task when its inputs are done, retry, skip.

A graph arrives whole (``GRAPH``). Tasks become :class:`~achilles.server.scheduler.Chunk` s
of a graph job as soon as every input has a value, and go through the same credit-based fair
dispatch as map chunks. Inputs' values travel inside the chunk payload; they never go back to
the controller, and the server drops each value once every consumer has been released (unless
the controller asked for it). A failed task skips everything downstream of it; other branches
go on; the graph ends when every task is done, failed or skipped.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from achilles.core import wire
from achilles.core.logs import printable

WAITING, QUEUED, RUNNING, DONE, FAILED, SKIPPED = (
    "waiting", "queued", "running", "done", "failed", "skipped")


@dataclass
class GraphTask:
    """One task of a graph, as the server sees it (arguments stay opaque bytes)."""

    task_id: int
    name: str
    deps: List[int]
    options: Dict[str, Any]
    func_key: str
    args: bytes
    dependents: List[int] = field(default_factory=list)
    remaining: int = 0
    state: str = WAITING
    value: Optional[bytes] = None
    released_dependents: int = 0
    attempts: int = 0
    node: Optional[str] = None
    started: float = 0.0
    duration: Optional[float] = None


class GraphState:
    """The tasks of one graph job and the rules that move them."""

    def __init__(self, tasks: List[Tuple[int, str, List[int], Dict[str, Any], str, bytes]],
                 outputs: List[int]) -> None:
        self.tasks: Dict[int, GraphTask] = {}
        for task_id, name, deps, options, func_key, args in tasks:
            self.tasks[int(task_id)] = GraphTask(int(task_id), printable(name, 100),
                                                 [int(d) for d in deps], dict(options or {}),
                                                 str(func_key), args)
        for t in self.tasks.values():
            for d in t.deps:
                if d not in self.tasks:
                    raise ValueError(f"task {t.task_id} depends on unknown task {d}")
                self.tasks[d].dependents.append(t.task_id)
            t.remaining = len(t.deps)
        self.outputs = set(int(o) for o in outputs)
        self.unresolved = len(self.tasks)

    def initial(self) -> List[GraphTask]:
        """Tasks with no inputs."""
        return [t for t in self.tasks.values() if t.remaining == 0]

    def payload(self, t: GraphTask) -> bytes:
        """What a worker needs to run ``t``: function key, arguments, input values."""
        values = {d: self.tasks[d].value for d in t.deps}
        for d in t.deps:
            dep = self.tasks[d]
            dep.released_dependents += 1
            if dep.released_dependents >= len(dep.dependents) and d not in self.outputs:
                dep.value = None  # every consumer has its copy
        return pickle.dumps((t.func_key, t.args, values), protocol=5)

    def finished(self, t: GraphTask, value: bytes) -> List[GraphTask]:
        """``t`` produced ``value``; return the tasks that are now ready."""
        t.state = DONE
        t.value = value
        self.unresolved -= 1
        ready = []
        for c in t.dependents:
            child = self.tasks[c]
            child.remaining -= 1
            if child.remaining == 0 and child.state == WAITING:
                ready.append(child)
        if not t.dependents and t.task_id not in self.outputs:
            t.value = None
        return ready

    def failed(self, t: GraphTask) -> List[GraphTask]:
        """``t`` failed for good: it and everything downstream will not run."""
        t.state = FAILED
        self.unresolved -= 1
        skipped = []
        stack = list(t.dependents)
        while stack:
            child = self.tasks[stack.pop()]
            if child.state in (WAITING, QUEUED):
                child.state = SKIPPED
                self.unresolved -= 1
                skipped.append(child)
                stack.extend(child.dependents)
        return skipped

    @property
    def complete(self) -> bool:
        return self.unresolved <= 0

    def report(self) -> Dict[int, Dict[str, Any]]:
        """Per task: state, node, duration (s), attempts."""
        return {t.task_id: {"state": t.state, "node": t.node, "duration": t.duration,
                            "attempts": t.attempts} for t in self.tasks.values()}


def retry_status(status: int) -> bool:
    """Whether a failure of this kind may be retried under ``retries``."""
    return status in (wire.ITEM_ERROR, wire.TIMED_OUT)
