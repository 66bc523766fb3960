"""What :class:`achilles.Pool` and :class:`achilles.Executor` share: the cluster they run on,
and jobs whose results a background thread collects.

A drop-in object runs on a ``Cluster`` it was given, on the configured cluster (a connection of
its own), or, with ``local=True`` and nothing configured, on a :class:`~achilles.LocalCluster`
it starts and stops itself. Each call is one map job on that cluster. A call with one answer
(``apply_async``, ``map_async``, ``submit``) is a :class:`OneShot` on ``Cluster.submit_job``
(no thread of its own), settled on its owner's :class:`Settler` thread, where user callbacks
run. An iterator (``imap``, ``Executor.map``) is a :class:`ResultStream`: a :class:`JobThread`
reads the job in order into a bounded buffer that a :class:`Reader` hands out with
``next(timeout)``.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from achilles.controller.cluster import Cluster
from achilles.controller.handle import HandleEvent, JobDone, JobError, JobHandle, JobResults
from achilles.controller.job import ResultIterator
from achilles.core import defaults
from achilles.core.config import load_config
from achilles.core.errors import ConfigError

#: Chunks a stream holds for a reader that has not asked for them yet; past this the job
#: pauses (the server holds its input) until the reader catches up.
STREAM_CHUNKS = 4


def job_options(group: str, cap: Optional[int], initializer: Optional[Callable[..., Any]],
                initargs: Tuple[Any, ...], maxtasksperchild: Optional[int],
                forward_output: Optional[bool]) -> Dict[str, Any]:
    """The cluster options of a pool's or executor's jobs: one group, so they share the
    initializer state in each worker process and one cap on tasks running at once."""
    options: Dict[str, Any] = {"group": group, "max_active": cap}
    if initializer is not None:
        options.update(initializer=initializer, initargs=initargs)
    if maxtasksperchild is not None:
        options["maxtasksperchild"] = maxtasksperchild
    if forward_output is not None:
        options["forward_output"] = forward_output
    return options


class Apply:
    """``func(*args, **kwds)`` for an item ``(args, kwds)``: ``apply`` and ``submit`` as a
    one-item map job. Named after ``func`` in status, logs and error notes."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__module__ = getattr(func, "__module__", None) or "?"
        self.__qualname__ = getattr(func, "__qualname__", None) or repr(func)

    def __call__(self, item: Tuple[Tuple[Any, ...], Dict[str, Any]]) -> Any:
        args, kwds = item
        return self.func(*args, **kwds)


class Star:
    """``func(*item)``: ``starmap`` and ``Executor.map`` as a map job."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__module__ = getattr(func, "__module__", None) or "?"
        self.__qualname__ = getattr(func, "__qualname__", None) or repr(func)

    def __call__(self, item: Iterable[Any]) -> Any:
        return self.func(*item)


class Backend:
    """The cluster a drop-in object runs on, and how to let it go when done.

    In order: ``cluster`` (a connected ``Cluster``, or a started ``LocalCluster``), used as is;
    a connection of its own to the server that ``host``, ``port``, ``username`` or
    ``secret_key`` name; the cluster of the innermost ``with LocalCluster()`` / ``with
    connect()`` block; a connection of its own to the configured server (environment, then
    ``.env``); with ``local=True`` and no secret configured, a ``LocalCluster`` (one node of
    ``processes`` worker processes) it starts. What it opened, :meth:`release` closes.
    """

    def __init__(self, cluster: Any = None, local: bool = False, processes: Optional[int] = None,
                 host: Optional[str] = None, port: Optional[int] = None,
                 username: Optional[str] = None, secret_key: Optional[str] = None) -> None:
        self._owned: Any = None
        self._lock = threading.Lock()
        named = any(v is not None for v in (host, port, username, secret_key))
        if cluster is None and not named:
            cluster = defaults.current()
        if cluster is not None:
            inner = getattr(cluster, "cluster", cluster)  # a started LocalCluster holds one
            if not isinstance(inner, Cluster):
                raise TypeError(f"cluster must be an achilles Cluster or a started LocalCluster, "
                                f"not {cluster!r}")
            self.cluster = inner
            return
        config = load_config(host=host, port=port, username=username, secret_key=secret_key)
        if config.secret_key is None and local:
            from achilles.local import LocalCluster

            lc = LocalCluster(nodes=1, processes=processes)
            self.cluster = lc.start()
            self._owned = lc
            return
        if config.secret_key is None:
            raise ConfigError("no cluster is configured (ACHILLES_SECRET_KEY is not set); "
                              "configure one, pass cluster=..., or pass local=True to start "
                              "a local cluster")
        self.cluster = Cluster(config)
        self._owned = self.cluster

    def release(self) -> None:
        """Close the connection or stop the local cluster this object opened (once)."""
        with self._lock:  # a second caller returns once the first has finished
            owned, self._owned = self._owned, None
            if owned is not None:
                if hasattr(owned, "stop"):
                    owned.stop()
                else:
                    owned.close()

    def __repr__(self) -> str:
        return repr(self._owned if self._owned is not None else self.cluster)


class Settler:
    """One thread per Pool or Executor where its calls are settled and its users' callbacks
    run, one at a time and in order (the stdlib's result-handler thread), so that a slow
    callback holds up only its own pool, not the cluster's event thread."""

    def __init__(self, name: str) -> None:
        self._queue: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, work: Callable[[], None]) -> None:
        """Run ``work()`` on the thread, after what was posted before."""
        self._queue.put(work)

    def stop(self) -> None:
        """End the thread once what was posted has run."""
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            work()

    @property
    def is_current(self) -> bool:
        """Whether the caller is this thread."""
        return threading.current_thread() is self._thread


class OneShot:
    """A job whose whole answer is wanted at once: started with ``Cluster.submit_job``, its
    results are gathered in input order and ``on_end(error, values)`` runs on ``settler``
    exactly once: ``(None, results)`` or ``(exception, None)``.

    :meth:`cancel` stops it from any thread (also before :meth:`start`), ending it with
    :class:`~achilles.JobCancelled` unless it had already ended.
    """

    def __init__(self, settler: Settler,
                 on_end: Callable[[Optional[BaseException], Optional[list]], None]) -> None:
        self._settler = settler
        self._on_end = on_end
        self._parts: Dict[int, list] = {}
        self._lock = threading.Lock()
        self._handle: Optional[JobHandle] = None
        self._cancelled: Optional[str] = None
        self._settled = threading.Event()

    def start(self, cluster: Cluster, func: Callable[..., Any], iterable: Iterable[Any],
              chunksize: Optional[int], options: Dict[str, Any]) -> None:
        """Submit the job (what ``submit_job`` refuses at once raises here)."""
        handle = cluster.submit_job(func, iterable, self._event, chunksize, **options)
        with self._lock:
            self._handle = handle
            reason = self._cancelled
        if reason is not None:
            handle.cancel(reason)

    def _event(self, event: HandleEvent) -> None:
        # On the cluster's event thread: keep it quick.
        if isinstance(event, JobResults):
            self._parts[event.start] = event.values
        elif isinstance(event, JobDone):
            parts = self._parts
            values = [v for start in sorted(parts) for v in parts[start]]
            self._settler.post(lambda: self._settle(None, values))
        elif isinstance(event, JobError):
            error = event.error
            self._settler.post(lambda: self._settle(error, None))

    def _settle(self, error: Optional[BaseException], values: Optional[list]) -> None:
        try:
            self._on_end(error, values)
        finally:
            self._settled.set()

    def cancel(self, reason: str) -> None:
        """Stop the job (idempotent; safe from any thread)."""
        with self._lock:
            if self._cancelled is None:
                self._cancelled = reason
            handle = self._handle
        if handle is not None:
            handle.cancel(reason)

    def unbound(self) -> None:
        """Nothing to lift: a one-shot job never waits for a reader."""

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until ``on_end`` has returned (at most ``timeout`` seconds)."""
        if not self._settler.is_current:
            self._settled.wait(timeout)


class JobThread:
    """One job's results read by a daemon thread: ``on_chunk(values)`` for each chunk of
    results (in the job's order), then ``on_end(None)`` or ``on_end(exception)``, exactly once.

    :meth:`cancel` stops the job from any thread: the server drops its queued input, the
    nodes stop its running chunks, and ``on_end`` gets :class:`~achilles.JobCancelled`
    unless the job had already ended.
    """

    def __init__(self, results: ResultIterator, on_chunk: Callable[[list], None],
                 on_end: Callable[[Optional[BaseException]], None], name: str) -> None:
        self.results = results
        self._on_chunk = on_chunk
        self._on_end = on_end
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start reading (once its owner is ready for ``on_end``)."""
        self.thread.start()

    def _run(self) -> None:
        error: Optional[BaseException] = None
        try:
            for values in self.results.chunks():
                self._on_chunk(values)
        except BaseException as exc:
            error = exc
        self._on_end(error)

    def cancel(self, reason: str) -> None:
        """Stop the job (idempotent; safe from any thread, also after it ended)."""
        self.results.cancel(reason)

    def unbound(self) -> None:
        """Nothing to lift: a job thread never waits for a reader."""

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until ``on_end`` has returned (at most ``timeout`` seconds)."""
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)


class ResultStream:
    """A job's results for a reader in another thread: :meth:`next_chunk` returns them a
    chunk at a time, in the job's order, waiting at most ``timeout`` seconds (:class:`Reader`
    hands them out one by one).

    At most :data:`STREAM_CHUNKS` chunks wait for the reader; then the job pauses until the
    reader catches up (:meth:`unbound` lifts that, for a pool being joined). ``on_end`` is called
    once when the job has ended, in the job's thread.
    """

    def __init__(self, results: ResultIterator, name: str,
                 on_end: Callable[["ResultStream"], None]) -> None:
        self._cond = threading.Condition()
        self._buffer: Deque[List[Any]] = collections.deque()
        self._error: Optional[BaseException] = None
        self._ended = False
        self._bounded = True
        self._stopped = False
        self._on_end_hook = on_end
        self.job = JobThread(results, self._put, self._end, name)

    def start(self) -> None:
        """Start reading the job."""
        self.job.start()

    def _put(self, values: list) -> None:
        with self._cond:
            while self._bounded and not self._stopped and len(self._buffer) >= STREAM_CHUNKS:
                self._cond.wait()
            if values:
                self._buffer.append(values)
                self._cond.notify_all()

    def _end(self, error: Optional[BaseException]) -> None:
        with self._cond:
            self._error = error
            self._ended = True
            self._cond.notify_all()
        self._on_end_hook(self)

    def next_chunk(self, timeout: Optional[float] = None) -> List[Any]:
        """The next chunk of results (a non-empty list); raises ``StopIteration`` at the end,
        the job's error where it failed, or ``TimeoutError`` when none came within
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._buffer:
                    self._cond.notify_all()
                    return self._buffer.popleft()
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    raise StopIteration
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no result within the timeout")
                self._cond.wait(remaining)

    def unbound(self) -> None:
        """Let the job run to its end whether or not anyone reads (results are kept)."""
        with self._cond:
            self._bounded = False
            self._cond.notify_all()

    def cancel(self, reason: str) -> None:
        """Stop the job; a reader gets what had arrived, then ``JobCancelled``."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self.job.cancel(reason)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the job has ended (at most ``timeout`` seconds)."""
        self.job.join(timeout)

    @property
    def ended(self) -> bool:
        """Whether the job has ended (its results may still be waiting to be read)."""
        return self._ended


class Reader:
    """Results of a :class:`ResultStream` one at a time: ``next(timeout)``. Once it has
    raised the job's error it is exhausted, as a generator is."""

    def __init__(self, stream: ResultStream) -> None:
        self.stream = stream
        self._chunk: List[Any] = []
        self._pos = 0
        self._failed = False

    def next(self, timeout: Optional[float] = None) -> Any:
        """The next result (see :meth:`ResultStream.next_chunk` for what it raises)."""
        if self._pos == len(self._chunk):
            if self._failed:
                raise StopIteration
            try:
                self._chunk = self.stream.next_chunk(timeout)
            except (StopIteration, TimeoutError):
                raise
            except BaseException:
                self._failed = True
                raise
            self._pos = 0
        value = self._chunk[self._pos]
        self._pos += 1
        return value
