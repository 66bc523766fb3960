"""``Cluster.submit_job``: a map job whose results come as callbacks, with no thread per job.

Each :class:`~achilles.controller.cluster.Cluster` has one event thread (started on first
use) that drives every job handle of that cluster: it takes the connection's events for the
jobs, reads and pickles their input as the server asks for it, unpickles results and calls
each handle's ``on_event`` with a :class:`JobResults` per finished chunk, then exactly one
terminal :class:`JobDone` or :class:`JobError`. Callbacks of one cluster run one at a time on
that thread, so they must be quick (hand work elsewhere); one that raises is logged.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

from achilles.core.errors import JobCancelled
from achilles.controller.events import Event
from achilles.controller.job import JobRun

log = logging.getLogger("achilles.controller")


@dataclass(frozen=True)
class JobResults:
    """Results of input items ``start`` .. ``start + len(values) - 1`` (chunks arrive in
    completion order)."""

    start: int
    values: list


@dataclass(frozen=True)
class JobDone:
    """Terminal: every result was delivered; ``items`` were run."""

    items: int


@dataclass(frozen=True)
class JobError:
    """Terminal: the job stopped with ``error`` (the task's own exception, ``RemoteError``,
    the input iterator's exception or a pickling error, ``JobCancelled`` after
    :meth:`JobHandle.cancel`, ``ConnectionLost``...). ``index`` is the input index of the
    failing item when known. Results of items before it may have been delivered already."""

    error: BaseException
    index: Optional[int] = None


#: What ``on_event`` receives.
HandleEvent = Union[JobResults, JobDone, JobError]

_KICK = object()  # "look at the job": after construction, results may already be due


class _Sink:
    """The connection's sink for one handle: forwards events to the cluster's event thread."""

    def __init__(self, handle: "JobHandle") -> None:
        self.handle = handle

    def put(self, event: Event) -> None:
        self.handle._thread.post(self.handle, event)


class EventThread:
    """One thread per cluster that runs every handle's work and callbacks, in arrival order."""

    def __init__(self, name: str = "achilles-jobs") -> None:
        self._queue: "queue.Queue[Optional[Tuple[JobHandle, Any]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, handle: "JobHandle", item: Any) -> None:
        """Queue ``item`` (an event, or a terminal event to deliver) for ``handle``."""
        self._queue.put((handle, item))

    def stop(self) -> None:
        """Let the thread end once what is queued has run."""
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            handle, item = entry
            try:
                handle._step(item)
            except Exception:  # a bug here must not stop every other handle
                log.exception("job handle %s failed to take an event", handle.job_id[:8])


class JobHandle:
    """A running job started by :meth:`Cluster.submit_job
    <achilles.controller.cluster.Cluster.submit_job>`; results go to its ``on_event``."""

    def __init__(self, thread: EventThread, on_event: Callable[[HandleEvent], Any],
                 forget: Callable[["JobHandle"], None], make_run: Callable[[Any], JobRun]) -> None:
        self._thread = thread
        self._on_event = on_event
        self._forget = forget
        self._lock = threading.RLock()
        self._ended = False
        with self._lock:  # the event thread waits here until the job is set up
            self._run = make_run(_Sink(self))
            self.job_id = self._run.job_id
            thread.post(self, _KICK)

    @property
    def done(self) -> bool:
        """Whether the terminal event has been decided (it may still be on its way)."""
        return self._ended

    def cancel(self, reason: str = "cancelled by the caller") -> bool:
        """From any thread: stop the job (the server drops its queued chunks, nodes stop its
        running ones) and deliver ``JobError(JobCancelled(reason))`` as its terminal event.
        False if the job had already ended."""
        return self._end(JobError(JobCancelled(reason)), reason)

    def _end(self, event: Union[JobDone, JobError], reason: str = "cancelled") -> bool:
        with self._lock:
            if self._ended:
                return False
            self._ended = True
            try:
                self._run.close(reason)
            finally:
                self._forget(self)
                self._thread.post(self, event)
        return True

    def _emit(self, event: HandleEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("the on_event callback of job %s raised on %s", self.job_id[:8],
                          type(event).__name__)

    def _step(self, item: Any) -> None:
        """On the event thread: deliver a terminal event, or apply a connection event and
        deliver what it made ready."""
        if isinstance(item, (JobDone, JobError)):
            self._emit(item)
            return
        with self._lock:
            if self._ended:
                return
            run = self._run
            try:
                if item is not _KICK:
                    run.apply(item)
                while run.ready:
                    first, values = run.ready.popleft()
                    self._emit(JobResults(first, values))
                    if self._ended:  # the callback cancelled the job
                        return
                if run.error is None and not run.answered():
                    run.top_up()
            except BaseException as exc:  # JobCancelled (server), ConnectionLost, unpickling
                self._end(JobError(exc), "the job's reader failed")
                return
            if run.error is not None:
                _, failure, partial = run.error
                if partial:
                    self._emit(JobResults(run.error_first, partial))
                    if self._ended:
                        return
                self._end(JobError(failure, run.error_index), "an item failed")
            elif run.answered():
                run.finished = True
                if run.input_error is not None:
                    self._end(JobError(run.input_error, run.items_sent), "the input failed")
                else:
                    self._end(JobDone(run.items_done))


class HandleSet:
    """A cluster's live handles and its event thread (made on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: Optional[EventThread] = None
        self._live: Dict[int, JobHandle] = {}

    def start(self, on_event: Callable[[HandleEvent], Any],
              make_run: Callable[[Any], JobRun]) -> JobHandle:
        """A new handle whose JobRun is ``make_run(sink)``."""
        with self._lock:
            if self._thread is None:
                self._thread = EventThread()
            thread = self._thread
        handle = JobHandle(thread, on_event, self._forget, make_run)
        with self._lock:
            if not handle.done:
                self._live[id(handle)] = handle
        return handle

    def _forget(self, handle: JobHandle) -> None:
        with self._lock:
            self._live.pop(id(handle), None)

    def close(self, reason: str) -> None:
        """End every live handle with ``JobCancelled(reason)`` and stop the event thread once
        their terminal events are delivered."""
        with self._lock:
            live = list(self._live.values())
            thread, self._thread = self._thread, None
        for handle in live:
            handle.cancel(reason)
        if thread is not None:
            thread.stop()
