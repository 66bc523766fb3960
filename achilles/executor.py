"""``achilles.Executor``: a ``concurrent.futures.Executor`` whose calls run on the cluster.

Its futures are real ``concurrent.futures.Future`` objects, so ``as_completed``, ``wait``,
``add_done_callback`` and ``asyncio``'s ``loop.run_in_executor`` work with them. Each
``submit`` is a one-item job on the cluster; ``map`` is one job whose input is read lazily.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Union

from achilles.dropin import (Apply, Backend, OneShot, Reader, ResultStream, Settler, Star,
                              job_options)

_names = itertools.count(1)
Job = Union[OneShot, ResultStream]


class ClusterFuture(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` of a call on the cluster.

    It stays pending until its result is back: :meth:`cancel` succeeds until then, dropping
    the call on the server if it is queued there and stopping its worker if it runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self._job: Optional[OneShot] = None

    def cancel(self) -> bool:
        """Cancel the call unless its result is already here; returns whether it is cancelled."""
        if not super().cancel():
            return False
        if self._job is not None:
            self._job.cancel("the future was cancelled")
        return True


class MapIterator:
    """What :meth:`Executor.map` returns: results in input order as they come; raises
    ``TimeoutError`` once ``timeout`` seconds have passed since the ``map`` call without the
    next result, and the failing item's exception where it failed. Dropping it (or an
    exception) cancels the rest of the job."""

    def __init__(self, stream: ResultStream, deadline: Optional[float]) -> None:
        self._stream = stream
        self._reader = Reader(stream)
        self._deadline = deadline

    def __iter__(self) -> "MapIterator":
        return self

    def __next__(self) -> Any:
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        try:
            return self._reader.next(remaining)
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancel what is left of the job."""
        if not self._stream.ended:
            self._stream.cancel("the map's results were abandoned")

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Executor(concurrent.futures.Executor):
    """``concurrent.futures.ProcessPoolExecutor`` on an Achilles cluster.

    ``max_workers`` caps how many of this executor's calls run at once across the cluster
    (default: no cap); ``initializer(*initargs)`` runs once in each worker process before its
    first call of this executor; ``max_tasks_per_child`` replaces a worker after that many.
    ``mp_context`` is accepted and ignored. The cluster is found as :class:`achilles.Pool`
    finds it (``cluster``, ``host``/``port``/``username``/``secret_key``, the innermost ``with``
    block, the configuration, or with ``local=True`` a ``LocalCluster`` of its own). What the
    calls print or log is printed here unless ``forward_output=False``.
    """

    def __init__(self, max_workers: Optional[int] = None, mp_context: Any = None,
                 initializer: Optional[Callable[..., Any]] = None, initargs: Iterable[Any] = (),
                 *, max_tasks_per_child: Optional[int] = None, local: bool = False,
                 cluster: Any = None, host: Optional[str] = None, port: Optional[int] = None,
                 username: Optional[str] = None, secret_key: Optional[str] = None,
                 forward_output: Optional[bool] = None) -> None:
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers <= 0):
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks_per_child = max_tasks_per_child
        self._forward_output = forward_output
        self._group = "executor-" + uuid.uuid4().hex
        self._lock = threading.Lock()
        self._jobs: Dict[Job, Optional[ClusterFuture]] = {}
        self._shutdown = False
        self._backend = Backend(cluster, local, max_workers, host, port, username, secret_key)
        self._settler = Settler(f"achilles-executor-{next(_names)}")  # futures settle here
        self._settler_stopped = False

    def __repr__(self) -> str:
        return (f"<achilles.Executor max_workers={self._max_workers} "
                f"{'shut down' if self._shutdown else 'running'} on {self._backend!r}>")

    def _options(self) -> Dict[str, Any]:
        """The cluster options of this executor's jobs (``max_workers`` is the cap)."""
        return job_options(self._group, self._max_workers, self._initializer, self._initargs,
                           self._max_tasks_per_child, self._forward_output)

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _add(self, job: Job, future: Optional[ClusterFuture]) -> None:
        with self._lock:
            if not self._shutdown:
                self._jobs[job] = future
                return
        job.cancel("the executor was shut down while the call started")
        raise RuntimeError("cannot schedule new futures after shutdown")

    def _ended(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job, None)
            last = self._shutdown and not self._jobs
        if last:
            self._finish()

    def _finish(self) -> None:
        """Once shut down: let go of the cluster, and end the settler thread when no call is
        left to settle."""
        self._backend.release()
        with self._lock:
            if self._settler_stopped or self._jobs:
                return
            self._settler_stopped = True
        self._settler.stop()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ClusterFuture:
        """Run ``fn(*args, **kwargs)`` on the cluster; returns its Future."""
        self._check_open()
        future = ClusterFuture()

        def settle(error: Optional[BaseException], values: Optional[list]) -> None:
            if future.set_running_or_notify_cancel():
                if error is None:
                    assert values is not None
                    future.set_result(values[0])
                else:
                    future.set_exception(error)
            self._ended(job)

        job = OneShot(self._settler, settle)
        future._job = job
        self._add(job, future)
        try:
            job.start(self._backend.cluster, Apply(fn), [(args, kwargs)], 1, self._options())
        except BaseException:
            self._ended(job)
            raise
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: Optional[float] = None, chunksize: Optional[int] = None) -> Iterator[Any]:
        """``fn(*args)`` for the iterables' items zipped, in order, as they come: the job starts
        now, the input is read lazily. ``timeout`` counts from this call; ``chunksize=None``
        picks chunk sizes itself."""
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._check_open()
        results = self._backend.cluster.imap(Star(fn), zip(*iterables), chunksize,
                                             **self._options())
        stream = ResultStream(results, f"achilles-executor-{next(_names)}", self._ended)
        self._add(stream, None)
        stream.start()
        return MapIterator(stream, deadline)

    def __del__(self) -> None:
        if not getattr(self, "_settler_stopped", True) and not self._jobs:
            self._settler.stop()  # nothing can post to it any more

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more calls. ``cancel_futures`` cancels every call whose result is not back
        (on the cluster too); ``wait`` blocks until every call has ended and the executor's
        connection (or local cluster) is closed, else that happens once they end."""
        with self._lock:
            self._shutdown = True
            jobs = dict(self._jobs)
        if cancel_futures:
            for job, future in jobs.items():
                if future is not None:
                    future.cancel()
                else:
                    job.cancel("the executor was shut down")
        if wait:
            for job in jobs:
                job.unbound()
            for job in jobs:
                job.join()
            self._finish()
        elif not jobs:
            self._finish()
