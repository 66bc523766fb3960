"""What the reactor thread tells a caller's thread about its job, graph or request.

:class:`~achilles.controller.client.ControllerProtocol` puts one of these frozen records on
the :class:`EventSink` registered for a job (``queue.Queue`` is one); the run consuming them
(:class:`~achilles.controller.job.JobRun`, :class:`~achilles.controller.graph.GraphRun`,
``Cluster``'s requests) matches on the type. :class:`JobLink` is what a run needs from the
connection; :class:`ObservedLink` wraps one to watch every event (progress bars).
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Protocol, Union

log = logging.getLogger("achilles.controller")


@dataclass(frozen=True)
class Want:
    """The server grants ``n`` more chunks; the cluster has ``processes`` worker processes and
    room for ``capacity`` chunks in flight."""

    n: int
    processes: int
    capacity: int


@dataclass(frozen=True)
class ChunkResult:
    """A map chunk finished: ``status`` is ``wire.OK`` or a failure status; ``payload`` is the
    pickled results (or the failure record); ``elapsed`` seconds on ``node``."""

    chunk_id: int
    status: int
    payload: bytes
    elapsed: float
    node: str


@dataclass(frozen=True)
class TaskDone:
    """A graph task finished (same meaning of ``status`` and ``payload`` as :class:`ChunkResult`)."""

    task_id: int
    status: int
    payload: bytes
    node: str
    elapsed: float


@dataclass(frozen=True)
class Output:
    """Lines a running chunk or graph task (``chunk_id``) wrote on ``node``, as the encoded
    payload (:mod:`achilles.core.output`), and how many more the node's rate limit dropped."""

    chunk_id: int
    node: str
    dropped: int
    payload: bytes


@dataclass(frozen=True)
class OutputTail:
    """The last lines of ``chunk_id``'s output; its failed result comes next."""

    chunk_id: int
    node: str
    payload: bytes


@dataclass(frozen=True)
class GraphDone:
    """A graph settled; ``report`` maps task id to ``{state, node, duration, attempts}``."""

    report: Dict[int, Dict[str, Any]]


@dataclass(frozen=True)
class PipeResult:
    """Pipeline outputs of source batch ``origin`` (-1: outputs no source batch caused) along
    branch path ``key``; ``last`` when the origin is complete. ``kind``: 0 outputs, 1 collected
    errors, 2 the pipeline failed (payload: error record), 3 it is done (payload: stats)."""

    origin: int
    key: tuple
    last: bool
    kind: int
    payload: bytes


@dataclass(frozen=True)
class JobProgress:
    """A watched job's figures (JOB_PROGRESS): items ``done`` (with the parts running chunks
    reported), ``failed`` and ``skipped`` chunks or tasks, ``retried`` re-runs, and for graphs
    ``by_name``: ``{task name: [done, failed or skipped, total]}``."""

    done: float
    failed: int
    skipped: int
    retried: int
    by_name: Dict[str, List[int]]


@dataclass(frozen=True)
class JobFailed:
    """The server gave up on the job or graph, saying why."""

    message: str


@dataclass(frozen=True)
class Cancelled:
    """The caller cancelled the job from another thread (``JobRun.cancel``), saying why."""

    reason: str


@dataclass(frozen=True)
class ConnectionLostEvent:
    """The connection ``conn_id`` (what ``JobLink.register`` returned) closed for ``reason``."""

    reason: str
    conn_id: int


@dataclass(frozen=True)
class PipeOutput:
    """Lines copy ``copy`` of stage ``stage`` wrote on ``node`` (encoded as an
    :class:`Output`'s), and how many more the node's rate limit dropped."""

    stage: int
    copy: int
    node: str
    dropped: int
    payload: bytes


@dataclass(frozen=True)
class Reply:
    """The answer to a request (STATUS, KILL)."""

    value: Any


#: Every event a job, graph or request can receive.
Event = Union[Want, ChunkResult, TaskDone, GraphDone, PipeResult, JobProgress, JobFailed,
              Cancelled, ConnectionLostEvent, Reply, Output, OutputTail, PipeOutput]


class EventSink(Protocol):
    """Where a job's events go; called on the reactor thread, so ``put`` must not block."""

    def put(self, event: Event) -> None:
        """Accept one event."""


class EventQueue(queue.SimpleQueue[Event]):
    """An unbounded FIFO of one job's events (``put`` / ``get``): a ``queue.SimpleQueue``,
    made and used for a fraction of ``queue.Queue``'s cost, which counts once per call of a
    one-item map. The events one read from the server brought for a job are put in one go
    by the reactor thread (:func:`deliver`), which holds the GIL meanwhile, so a reader woken
    by the first almost always finds the rest queued behind it."""


def deliver(sink: EventSink, events: List[Event]) -> None:
    """Hand ``events`` to ``sink`` in order."""
    for event in events:
        sink.put(event)


class JobLink(Protocol):
    """What a job or graph run needs from its connection (``Cluster`` is one)."""

    def register(self, job_id: str, sink: EventSink) -> int:
        """Route ``job_id``'s events to ``sink``; return the connection's id (its
        :class:`ConnectionLostEvent` carries it)."""

    def unregister(self, job_id: str) -> None:
        """Stop routing ``job_id``'s events (safe from any thread, never blocks)."""

    def send(self, messages: List[List[bytes]]) -> None:
        """Write encoded messages to the server, in order."""

    def reconnect(self, job_id: str, sink: EventSink) -> int:
        """After a :class:`ConnectionLostEvent`: connect again (waiting for the server up to
        the reconnect timeout, else ``ConnectionLost``) and :meth:`register` again."""


class _TeeSink:
    def __init__(self, job_id: str, sink: EventSink, observer: Callable[[str, Event], None]) -> None:
        self.job_id = job_id
        self.sink = sink
        self.observer = observer

    def put(self, event: Event) -> None:
        try:
            self.observer(self.job_id, event)
        except Exception:
            log.exception("an event observer failed on %s for job %s", type(event).__name__,
                          self.job_id[:8])
        self.sink.put(event)


class ObservedLink:
    """A :class:`JobLink` that also hands every event to ``observer(job_id, event)`` before the
    run sees it, e.g. to count :class:`ChunkResult`\\ s for a progress bar.

    ``observer`` runs on the reactor thread: it must be quick and must not block or call back
    into the cluster. An exception it raises is logged; the event still reaches the run.
    """

    def __init__(self, link: JobLink, observer: Callable[[str, Event], None]) -> None:
        self.link = link
        self.observer = observer

    def register(self, job_id: str, sink: EventSink) -> int:
        """Register with the wrapped link, observing the events."""
        return self.link.register(job_id, _TeeSink(job_id, sink, self.observer))

    def unregister(self, job_id: str) -> None:
        """Unregister from the wrapped link."""
        self.link.unregister(job_id)

    def send(self, messages: List[List[bytes]]) -> None:
        """Send through the wrapped link."""
        self.link.send(messages)

    def reconnect(self, job_id: str, sink: EventSink) -> int:
        """Reconnect through the wrapped link, still observing the events."""
        return self.link.reconnect(job_id, _TeeSink(job_id, sink, self.observer))
