"""Running call graphs from the controller: send the graph once, collect the outputs.

Only the outputs asked for come back; intermediate values stay on the server side. A failed
task raises its own exception (remote traceback attached) with a note naming the task and its
position in the graph, once the graph has settled (everything downstream is skipped, other
branches finish), so no failure hangs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import pickle
import threading
import uuid
from typing import Any, Callable, Dict, List, Optional

from achilles.controller.events import (ConnectionLostEvent, Event, EventQueue, GraphDone,
                                        JobFailed, JobLink, JobProgress, Output, OutputTail,
                                        TaskDone)
from achilles.controller.failures import failure_exception
from achilles.controller.output import OutputPrinter
from achilles.controller.progress import Progress
from achilles.core import wire
from achilles.core.errors import ConnectionLost, JobCancelled
from achilles.core.serialization import loads_data
from achilles.core.taskgraph import GraphSpec, TaskCall, build


class GraphRun:
    """One submitted graph; :meth:`wait` returns the outputs' values in order.

    ``progress`` (a spec from :func:`achilles.controller.progress.wanted`, or None) draws the
    tasks settled (done, failed or skipped) of all tasks; ``"tasks"``: one bar per task name."""

    def __init__(self, link: JobLink, roots: List[TaskCall],
                 options: Optional[Dict[str, Any]] = None, progress: Any = None) -> None:
        if not roots or not all(isinstance(r, TaskCall) for r in roots):
            raise TypeError("compute() takes lazy task calls (the result of calling a @task)")
        self.link = link
        self.roots = roots
        self.spec: GraphSpec = build(roots)
        self.graph_id = uuid.uuid4().hex
        self.events: EventQueue = EventQueue()
        self.values: Dict[int, Any] = {}
        self.errors: Dict[int, BaseException] = {}
        self.first_error: Optional[BaseException] = None
        self.output = OutputPrinter()
        tasks = self.spec.tasks
        if options:  # job options (``output``) travel with every task of the graph
            tasks = [(t[0], t[1], t[2], {**t[3], **options}, *t[4:]) for t in tasks]
        self._message = wire.encode_message(wire.GRAPH, (
            self.graph_id, pickle.dumps(self.spec.funcs, protocol=5), tasks,
            self.spec.outputs))
        self._opening = [self._message]
        if progress is not None:
            self._opening.append(wire.encode_message(wire.WATCH, (self.graph_id,)))
        self._conn = link.register(self.graph_id, self.events)
        self.progress: Optional[Progress] = None
        if progress is not None:
            names: Dict[str, int] = collections.Counter(t[1] for t in self.spec.tasks)
            desc = "graph " + ", ".join(dict.fromkeys(r.name for r in roots))
            self.progress = Progress(progress, len(self.spec.tasks), desc, "task", names)
        self.link.send(list(self._opening))

    def _error(self, task_id: int, status: int, payload: bytes, node: str) -> BaseException:
        call = self.spec.calls[task_id]
        exc, _, _ = failure_exception(status, payload, f"task {call.name}#{task_id}")
        if hasattr(exc, "add_note"):
            exc.add_note(f"in task {self.spec.positions.get(task_id, call.name)}"
                         + (f" on node {node}" if node else ""))
        self.output.attach(exc, task_id, self._label(task_id))
        return exc

    def _label(self, task_id: int) -> Callable[[Optional[int]], str]:
        """Names a line of a task's output by the task."""
        call = self.spec.calls.get(task_id)
        text = f"task {call.name if call is not None else '?'}#{task_id}"
        return lambda _: text

    def wait(self) -> List[Any]:
        """Block until the graph settles; return the outputs or raise the first failure."""
        try:
            while True:
                match event := self.events.get():
                    case TaskDone(task_id=task_id, status=status, payload=payload, node=node):
                        if status == wire.OK:
                            self.values[task_id] = loads_data(payload)
                        else:
                            exc = self._error(task_id, status, payload, node)
                            self.errors[task_id] = exc
                            if self.first_error is None:
                                self.first_error = exc
                    case Output(chunk_id=task_id):
                        self.output.show(event, self._label(task_id))
                    case OutputTail():
                        self.output.keep_tail(event)
                    case JobProgress(done=done, failed=failed, skipped=skipped, retried=retried,
                                     by_name=by_name) if self.progress:
                        self.progress.update(done + failed + skipped, failed, skipped, retried,
                                             by_name)
                    case GraphDone(report=report):
                        self._record(report)
                        break
                    case JobFailed(message=message):
                        raise JobCancelled(
                            f"graph {self.graph_id[:8]} failed on the server: {message}")
                    case ConnectionLostEvent(reason=reason, conn_id=conn_id) if conn_id == self._conn:
                        self._resume(reason)
        finally:
            self.link.unregister(self.graph_id)
            if self.progress is not None:
                self.progress.close()
        if self.first_error is not None and any(o not in self.values for o in self.spec.outputs):
            raise self.first_error
        return [self.values[o] for o in self.spec.outputs]

    def _resume(self, reason: str) -> None:
        try:
            self._conn = self.link.reconnect(self.graph_id, self.events)
        except ConnectionLost as exc:
            raise ConnectionLost(f"lost the connection to the server ({reason}) while running "
                                 f"a graph; {exc}") from None
        self.link.send(list(self._opening))

    def _record(self, report: Dict[int, Dict[str, Any]]) -> None:
        for task_id, info in report.items():
            call = self.spec.calls.get(task_id)
            if call is not None:
                call.info = dict(info)
        if self.progress is not None:
            # The final figures, from the report (the last JOB_PROGRESS came before it).
            by_state = collections.Counter(info.get("state") for info in report.values())
            retried = sum(max(0, int(info.get("attempts") or 0) - 1) for info in report.values())
            figures = self.progress.figures
            self.progress.update(len(report), by_state["failed"], by_state["skipped"],
                                 max(retried, figures["retried"]))


def submit_graph(link: JobLink, roots: List[TaskCall], options: Optional[Dict[str, Any]] = None,
                 progress: Any = None) -> "concurrent.futures.Future[List[Any]]":
    """Run a graph in the background; the Future holds the outputs' values (a list)."""
    future: "concurrent.futures.Future[List[Any]]" = concurrent.futures.Future()
    run = GraphRun(link, roots, options, progress)
    future.set_running_or_notify_cancel()

    def settle() -> None:
        try:
            future.set_result(run.wait())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=settle, name=f"achilles-graph-{run.graph_id[:8]}", daemon=True).start()
    return future


def single(future: "concurrent.futures.Future[List[Any]]") -> "concurrent.futures.Future[Any]":
    """A Future of the first element of another Future's list."""
    out: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
    out.set_running_or_notify_cancel()

    def copy(f: "concurrent.futures.Future[List[Any]]") -> None:
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(f.result()[0])

    future.add_done_callback(copy)
    return out
