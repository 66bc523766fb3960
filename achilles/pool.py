"""``achilles.Pool``: the API and semantics of ``multiprocessing.pool.Pool``, on the cluster.

Every call is one map job on the cluster. Results are settled on one thread of the pool, in
this process, where ``callback`` and ``error_callback`` run (one at a time, as on the
stdlib's result-handler thread). ``Cluster.map``'s node-side ``callback`` is a different
thing and keeps its meaning there.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Union

from achilles.core.errors import JobCancelled
from achilles.dropin import (Apply, Backend, OneShot, Reader, ResultStream, Settler, Star,
                              job_options)

log = logging.getLogger("achilles.pool")

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
#: Seconds ``terminate()`` waits for its jobs to see the cancellation.
TERMINATE_WAIT = 2.0

_names = itertools.count(1)
Job = Union[OneShot, ResultStream]


class ApplyResult:
    """What ``apply_async`` returns: ``get``, ``wait``, ``ready``, ``successful``."""

    def __init__(self, pool: "Pool", callback: Optional[Callable[[Any], Any]],
                 error_callback: Optional[Callable[[BaseException], Any]]) -> None:
        self._pool = pool
        self._callback = callback
        self._error_callback = error_callback
        self._event = threading.Event()
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        """Whether the call has completed."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call completed without raising; ``ValueError`` if it is not ready."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait until the result is ready or ``timeout`` seconds have passed."""
        self._event.wait(timeout)

    def get(self, timeout: Optional[float] = None) -> Any:
        """The result; raises the call's exception, or ``multiprocessing.TimeoutError`` if it
        is not ready within ``timeout`` seconds."""
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, success: bool, value: Any) -> None:
        self._success, self._value = success, value
        self._pool._callback(self._callback if success else self._error_callback, value)
        self._event.set()

    def _end(self, error: Optional[BaseException], values: Optional[list]) -> None:
        if error is None:
            assert values is not None
            self._set(True, self._value_of(values))
        else:
            self._set(False, error)

    def _value_of(self, values: list) -> Any:
        return values[0]


#: The stdlib's name for the same class.
AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """What ``map_async`` and ``starmap_async`` return; ``get()`` is the list of results."""

    def _value_of(self, values: list) -> Any:
        return values


class IMapIterator:
    """What ``imap`` returns: results in input order; ``next(timeout)`` as in the stdlib.

    Dropping it before the end cancels the rest of its job."""

    def __init__(self, stream: ResultStream) -> None:
        self._stream = stream
        self._reader = Reader(stream)

    def __iter__(self) -> "IMapIterator":
        return self

    def next(self, timeout: Optional[float] = None) -> Any:
        """The next result, waiting at most ``timeout`` seconds (else
        ``multiprocessing.TimeoutError``); ``StopIteration`` at the end."""
        try:
            return self._reader.next(timeout)
        except TimeoutError:
            raise multiprocessing.TimeoutError from None

    __next__ = next

    def __del__(self) -> None:
        try:
            if not self._stream.ended:
                self._stream.cancel("the imap iterator was dropped before its end")
        except Exception:
            pass


class IMapUnorderedIterator(IMapIterator):
    """What ``imap_unordered`` returns: results in completion order."""


class Pool:
    """``multiprocessing.pool.Pool`` on an Achilles cluster.

    ``processes`` caps how many of this pool's tasks run at once across the cluster (default:
    no cap). ``initializer(*initargs)`` runs once in each worker process before its first task
    of this pool; ``maxtasksperchild`` replaces a worker after that many tasks. ``context`` is
    accepted and ignored (the processes are the nodes').

    The cluster: ``cluster`` (a ``Cluster`` or a started ``LocalCluster``), else the configured
    one (``host``, ``port``, ``username``, ``secret_key`` > environment > ``.env``) over a
    connection of the pool's own, else, with ``local=True``, a ``LocalCluster`` of
    ``processes`` worker processes that the pool starts and stops.

    As a context manager it terminates on exit, as the stdlib's does. What the tasks print
    or log is printed here (see README "Task output") unless ``forward_output=False``
    (default: the cluster's setting).
    """

    def __init__(self, processes: Optional[int] = None,
                 initializer: Optional[Callable[..., Any]] = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: Optional[int] = None, context: Any = None, *,
                 local: bool = False, cluster: Any = None, host: Optional[str] = None,
                 port: Optional[int] = None, username: Optional[str] = None,
                 secret_key: Optional[str] = None,
                 forward_output: Optional[bool] = None) -> None:
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int)
                                             or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        self._processes = processes
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._maxtasksperchild = maxtasksperchild
        self._forward_output = forward_output
        self._group = "pool-" + uuid.uuid4().hex
        self._lock = threading.Lock()
        self._jobs: Set[Job] = set()
        self._backend = Backend(cluster, local, processes, host, port, username, secret_key)
        self._settler = Settler(f"achilles-pool-{next(_names)}")  # callbacks run here
        self._settler_stopped = False
        self._state = RUN

    def __repr__(self) -> str:
        return (f"<achilles.Pool state={self._state} processes={self._processes} "
                f"on {self._backend!r}>")

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    # --- jobs -------------------------------------------------------------------------------
    def _options(self) -> Dict[str, Any]:
        """The cluster options of this pool's jobs (``processes`` is the cap)."""
        return job_options(self._group, self._processes, self._initializer, self._initargs,
                           self._maxtasksperchild, self._forward_output)

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _start(self, func: Callable[..., Any], iterable: Iterable[Any],
               chunksize: Optional[int], result: ApplyResult, progress: Any = None) -> None:
        self._check_running()

        def settle(error: Optional[BaseException], values: Optional[list]) -> None:
            result._end(error, values)
            self._ended(job)

        job = OneShot(self._settler, settle)
        self._add(job)
        try:
            job.start(self._backend.cluster, func, iterable, chunksize,
                      {**self._options(), "progress": progress})
        except BaseException:
            self._ended(job)
            raise

    def _stream(self, func: Callable[..., Any], iterable: Iterable[Any],
                chunksize: Optional[int], ordered: bool, progress: Any = None) -> ResultStream:
        self._check_running()
        cluster = self._backend.cluster
        make = cluster.imap if ordered else cluster.imap_unordered
        results = make(func, iterable, chunksize, progress=progress, **self._options())
        stream = ResultStream(results, f"achilles-pool-{next(_names)}", self._ended)
        self._add(stream)
        stream.start()
        return stream

    def _add(self, job: Job) -> None:
        with self._lock:
            if self._state == RUN:
                self._jobs.add(job)
                return
        job.cancel("the pool was closed while the call started")
        raise ValueError("Pool not running")

    def _ended(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)
            last = self._state != RUN and not self._jobs
        if last:
            self._finish()

    def _finish(self) -> None:
        """Once the pool is closed or terminated: let go of the cluster, and end the settler
        thread when no job is left to settle."""
        self._backend.release()
        with self._lock:
            if self._settler_stopped or self._jobs:
                return
            self._settler_stopped = True
        self._settler.stop()

    def _callback(self, callback: Optional[Callable[[Any], Any]], value: Any) -> None:
        """Run a result's callback (on the settler thread, so one at a time); a failing
        callback is logged. After ``terminate()`` the cancelled calls' callbacks do not run."""
        if callback is None:
            return
        if self._state == TERMINATE and isinstance(value, JobCancelled):
            return
        try:
            callback(value)
        except Exception:
            log.exception("a Pool callback raised")

    # --- the stdlib API ---------------------------------------------------------------------
    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] = {}) -> Any:
        """``func(*args, **kwds)`` on the cluster; blocks until it returns."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] = {},
                    callback: Optional[Callable[[Any], Any]] = None,
                    error_callback: Optional[Callable[[BaseException], Any]] = None) -> ApplyResult:
        """Start ``func(*args, **kwds)``; returns an :class:`ApplyResult`. ``callback(value)``
        or ``error_callback(exception)`` runs in this process when it completes."""
        result = ApplyResult(self, callback, error_callback)
        self._start(Apply(func), [(tuple(args), dict(kwds))], 1, result, progress=False)
        return result

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any],
            chunksize: Optional[int] = None, *, progress: Any = None) -> List[Any]:
        """``[func(x) for x in iterable]`` on the cluster, in input order. ``progress=True``
        (or a tqdm bar, or a callable ``(done, total)``) shows the items done; so do the
        other map-like methods."""
        return self.map_async(func, iterable, chunksize, progress=progress).get()

    def map_async(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                  chunksize: Optional[int] = None,
                  callback: Optional[Callable[[Any], Any]] = None,
                  error_callback: Optional[Callable[[BaseException], Any]] = None, *,
                  progress: Any = None) -> MapResult:
        """Start a ``map``; returns a :class:`MapResult` whose ``get()`` is the list."""
        result = MapResult(self, callback, error_callback)
        self._start(func, iterable, chunksize, result, progress)
        return result

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: Optional[int] = None, *, progress: Any = None) -> List[Any]:
        """``[func(*args) for args in iterable]`` on the cluster, in input order."""
        return self.starmap_async(func, iterable, chunksize, progress=progress).get()

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: Optional[int] = None,
                      callback: Optional[Callable[[Any], Any]] = None,
                      error_callback: Optional[Callable[[BaseException], Any]] = None, *,
                      progress: Any = None) -> MapResult:
        """Start a ``starmap``; returns a :class:`MapResult`."""
        result = MapResult(self, callback, error_callback)
        self._start(Star(func), iterable, chunksize, result, progress)
        return result

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any],
             chunksize: Optional[int] = None, *, progress: Any = None) -> IMapIterator:
        """Results of ``func`` over ``iterable`` in input order, as they come. The input is
        read lazily; a reader that falls behind pauses the job (until ``join()``)."""
        return IMapIterator(self._stream(func, iterable, chunksize, True, progress))

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: Optional[int] = None, *,
                       progress: Any = None) -> IMapUnorderedIterator:
        """Like :meth:`imap`, in completion order."""
        return IMapUnorderedIterator(self._stream(func, iterable, chunksize, False, progress))

    def close(self) -> None:
        """Accept no more work; what was submitted runs to its end."""
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE
            done = not self._jobs
        if done:
            self._finish()

    def terminate(self) -> None:
        """Stop at once: every job is cancelled on the cluster (queued work dropped, running
        work stopped) and its pending results raise :class:`~achilles.JobCancelled`."""
        with self._lock:
            self._state = TERMINATE
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel("the pool was terminated")
        deadline = time.monotonic() + TERMINATE_WAIT
        for job in jobs:
            job.join(max(0.0, deadline - time.monotonic()))
        self._finish()

    def join(self) -> None:
        """Wait for every job to end; call :meth:`close` or :meth:`terminate` first."""
        with self._lock:
            if self._state == RUN:
                raise ValueError("Pool is still running")
            jobs = list(self._jobs)
        for job in jobs:
            job.unbound()
        for job in jobs:
            job.join()
        self._finish()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running achilles pool {self!r}", ResourceWarning, source=self)
            self._settler.stop()  # nothing can post to it any more
