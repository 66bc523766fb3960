"""``Cluster``: a connection to an Achilles server with the ``multiprocessing.Pool`` API."""

from __future__ import annotations

import concurrent.futures
import inspect
import itertools
import logging
import random
import queue
import threading
import secrets
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from achilles.core import defaults, wire
from achilles.core.config import Config, is_interactive, load_config
from achilles.core.errors import AchillesError, ConnectionFailed, ConnectionLost, ServerBusy
from achilles.core.handshake import derive_key
from achilles.controller import reactor_thread
from achilles.controller.chunking import ItemCosts
from achilles.controller.client import CONNECT_TIMEOUT, ControllerProtocol, connect
from achilles.controller.events import ConnectionLostEvent, Event, EventSink, Reply
from achilles.controller.handle import HandleEvent, HandleSet, JobHandle
from achilles.controller.job import JobRun, ResultIterator
from achilles.controller.options import JobOptions, check_chunksize
from achilles.controller.progress import wanted
from achilles.controller.segments import Segments

REQUEST_TIMEOUT = 30.0
KILL_TIMEOUT = 30.0
#: Seconds to wait for the reactor thread to run a registration.
#: Seconds between connection attempts while waiting for the server.
RETRY_INTERVAL = 0.25

log = logging.getLogger("achilles.controller")


def _inputs(iterable: Any) -> Iterable[Any]:
    if inspect.isgeneratorfunction(iterable):
        return iterable()
    return iterable


class Cluster:
    """A live connection to the server; reused across calls; thread-safe; a context manager."""

    def __init__(self, config: Config, timeout: float = CONNECT_TIMEOUT,
                 forward_output: Optional[bool] = None) -> None:
        self.config = config
        self.timeout = timeout
        #: Whether calls print their tasks' output here unless they say otherwise
        #: (``forward_output=``; default: ``config.forward_output``, ACHILLES_FORWARD_OUTPUT).
        self.forward_output = config.forward_output if forward_output is None else forward_output
        self._key = derive_key(config.username, config.require_secret())
        self._tls = config.client_tls()
        #: This process's end of the shared-memory path (None: ``ACHILLES_SHM_DIR=off``).
        self.segments: Optional[Segments] = Segments.create(self._key, config.shm_dir,
                                                            config.shm_min)
        #: What each function's items cost in this Cluster's earlier jobs (chunk sizing).
        self.item_costs = ItemCosts()
        #: Worker processes in the cluster as the server's last ``WANT`` said (0: none yet):
        #: a new job's first chunks are sized with it until its own first ``WANT``.
        self.processes_seen = 0
        self._lock = threading.Lock()
        self._proto: Optional[ControllerProtocol] = None
        self._reached = False  # connected at least once: an unreachable server is waited for
        self._requests = itertools.count(1)
        self._scope = secrets.token_hex(8)  # makes this Cluster's job groups its own
        self._handles = HandleSet()
        self._protocol()

    def __repr__(self) -> str:
        return f"<achilles.Cluster {self.config.host}:{self.config.port} user={self.config.username!r}>"

    # --- connection -------------------------------------------------------------------------
    def _protocol(self) -> ControllerProtocol:
        """The live connection, connecting if needed.

        One policy for new and running calls: once this cluster has reached the server, an
        unreachable server is waited for (retrying) up to ``reconnect_timeout``, as during a
        server restart; a server never reached fails at once with ConnectionFailed.
        """
        deadline: Optional[float] = None
        error: ConnectionFailed
        while True:
            with self._lock:
                proto = self._proto
                if proto is not None and proto.state == "ready":
                    return proto
                try:
                    proto = reactor_thread.call(
                        connect, self.config.host, self.config.port, self.config.username,
                        self._key, self.timeout, self.config.heartbeat, self._tls,
                        self.config.max_frame, self.segments, timeout=self.timeout + 5)
                except ServerBusy as exc:
                    error = exc
                    busy = True
                except ConnectionFailed as exc:
                    if not self._reached:
                        raise
                    error = exc
                    busy = False
                else:
                    self._proto = proto
                    self._reached = True
                    return proto
            now = time.monotonic()
            if busy and not self._reached:
                # a burst of connections from here is over the server's pre-auth cap: the
                # server is there, so keep trying (jittered) for the connect timeout
                if deadline is None:
                    deadline = now + self.timeout
                if now >= deadline:
                    raise ConnectionFailed(f"{error} (still so after {self.timeout:g} s)") from None
                time.sleep(min(random.uniform(0.02, RETRY_INTERVAL), deadline - now))
                continue
            if deadline is None:
                deadline = now + self.config.reconnect_timeout
                log.warning("lost the server at %s:%s; retrying for up to %g s "
                            "(ACHILLES_RECONNECT_TIMEOUT)", self.config.host, self.config.port,
                            self.config.reconnect_timeout)
            if now >= deadline:
                raise ConnectionFailed(
                    f"the server stayed unreachable for {self.config.reconnect_timeout:g} s "
                    f"(ACHILLES_RECONNECT_TIMEOUT): {error}") from None
            time.sleep(min(RETRY_INTERVAL, deadline - now))

    def reconnect(self, job_id: str, sink: EventSink) -> int:
        """After a lost connection: connect again (retrying until the configured
        ``reconnect_timeout``, else ConnectionLost) and route ``job_id``'s events to ``sink``."""
        try:
            return self.register(job_id, sink)
        except ConnectionFailed as exc:
            raise ConnectionLost(str(exc)) from None

    def register(self, job_id: str, sink: EventSink) -> int:
        """Route a job's events to ``sink`` on the live connection; returns the connection's id
        (its :class:`ConnectionLostEvent` carries it).

        The routing entry is added on the reactor thread without waiting for it, and without
        a wake-up of its own: calls posted to the reactor run in order, so it is in place
        before anything this caller sends next (whose post wakes the reactor), and so before
        any answer to it."""
        proto = self._protocol()
        reactor_thread.post(proto.add_job, job_id, sink, wake=False)
        return id(proto)

    def unregister(self, job_id: str) -> None:
        """Stop routing a job's events (never blocks; safe from any thread). The entry goes
        with the reactor thread's next wake-up: until then, events for the job are dropped
        into a queue nobody reads."""
        proto = self._proto
        if proto is not None:
            reactor_thread.post(proto.remove_job, job_id, wake=False)

    def shared_memory(self) -> Optional[Segments]:
        """The shared-memory end when the live connection proved it shares the server's
        (large map payloads may then go as segments), else None."""
        proto = self._proto
        if proto is not None and proto.shm_ok and proto.state == "ready":
            return self.segments
        return None

    def frame_limit(self) -> int:
        """The largest message the live connection may send (``ACHILLES_MAX_FRAME``, or the
        server's if lower)."""
        proto = self._proto
        return self.config.max_frame if proto is None else proto.send_limit

    def send(self, messages: List[List[bytes]]) -> None:
        """Queue encoded messages for the reactor thread to write. A message over the frame
        limit (``ACHILLES_MAX_FRAME``, or the server's if lower) raises
        :class:`~achilles.FrameTooLarge` here, in the caller's thread."""
        proto = self._proto
        if proto is not None:
            for message in messages:
                proto.check_size(message)
            reactor_thread.post(proto.send_many, messages)

    def _request(self, code: int, timeout: float) -> Any:
        proto = self._protocol()
        request_id = next(self._requests)
        replies: "queue.Queue[Event]" = queue.Queue()
        reactor_thread.post(proto.start_request, request_id, replies,
                            wire.encode_message(code, (request_id,)))
        try:
            event = replies.get(timeout=timeout)
        except queue.Empty:
            reactor_thread.post(proto.forget_request, request_id)
            raise AchillesError(f"the server did not answer within {timeout:g} s") from None
        match event:
            case Reply(value=value):
                return value
            case ConnectionLostEvent(reason=reason):
                raise ConnectionLost(f"lost the connection to the server ({reason})")
        raise AchillesError(f"unexpected answer to a request: {event!r}")

    # --- the Pool API -----------------------------------------------------------------------
    def job_options(self, forward_output: Optional[bool] = None) -> Dict[str, Any]:
        """The output option a job is submitted with: ``{"output": False}`` when its tasks'
        output is not to be forwarded (``forward_output``, else this cluster's default)."""
        forward = self.forward_output if forward_output is None else forward_output
        return {} if forward else {"output": False}

    def _progress(self, spec: Any) -> Any:
        return wanted(spec, self.config.progress)

    def _run(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: Any,
             callback: Optional[Callable[[Any], Any]], ordered: bool, balance: bool,
             options: JobOptions, forward_output: Optional[bool], progress: Any) -> JobRun:
        chunksize = check_chunksize(chunksize)
        if not callable(func):
            raise TypeError(f"func must be callable, not {type(func).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, not {type(callback).__name__}")
        encoded = {**options.encode(self._scope), **self.job_options(forward_output)}
        return JobRun(self, func, _inputs(iterable), chunksize, callback, ordered, encoded,
                      balance, options.cap_chunksize(chunksize),
                      progress=self._progress(progress))

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any],
            chunksize: Optional[int] = None, callback: Optional[Callable[[Any], Any]] = None, *,
            initializer: Optional[Callable[..., Any]] = None, initargs: Tuple[Any, ...] = (),
            maxtasksperchild: Optional[int] = None, max_active: Optional[int] = None,
            group: Optional[str] = None, forward_output: Optional[bool] = None,
            progress: Any = None) -> List[Any]:
        """``[func(x) for x in iterable]`` across the cluster, in input order.

        ``iterable`` may be any iterable (read lazily) or a generator function (called here).
        ``callback``, if given, runs on the node on each result before it is sent back.
        The first failing item raises its own exception type here (remote traceback as
        ``__cause__``, its last lines of output as a note and ``task_output``) and the rest of
        the job is cancelled. What tasks print or log is printed here with a ``(node item N)``
        prefix unless ``forward_output=False`` (default: :attr:`forward_output`).

        ``initializer(*initargs)`` runs once in each worker process before its first item of
        this job (or of ``group``); ``maxtasksperchild`` replaces a worker process once it has
        run that many of the job's (group's) items; ``max_active`` caps how many of the job's
        (group's) chunks run at once across the cluster, the server holding the rest.
        ``group`` (any string) makes several jobs of this ``Cluster`` share the initializer
        state in each worker and one ``max_active`` cap (set by the group's first job):
        ``achilles.Pool`` gives all its jobs one group. ``progress``: True for a tqdm bar of
        items done as nodes finish them, a tqdm bar to drive, or a callable ``(done, total)``;
        None follows ``ACHILLES_PROGRESS``.
        """
        opts = JobOptions.check(initializer, initargs, maxtasksperchild, max_active, group)
        out: List[Any] = []
        for values in self._run(func, iterable, chunksize, callback, True, True, opts,
                                forward_output, progress).chunks():
            out.extend(values)
        return out

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any],
             chunksize: Optional[int] = None, callback: Optional[Callable[[Any], Any]] = None, *,
             initializer: Optional[Callable[..., Any]] = None, initargs: Tuple[Any, ...] = (),
             maxtasksperchild: Optional[int] = None, max_active: Optional[int] = None,
             group: Optional[str] = None, forward_output: Optional[bool] = None,
             progress: Any = None) -> ResultIterator:
        """Like :meth:`map` but yields each result, in input order, as soon as it is ready.

        Work starts at once; input is read only as the cluster asks for it, so a slow reader
        pauses the job instead of buffering it. ``close()`` (or dropping the iterator) cancels.
        ``callback`` runs on the node on each result; the other options are :meth:`map`'s.
        Task output is printed while the iterator is being read.
        """
        opts = JobOptions.check(initializer, initargs, maxtasksperchild, max_active, group)
        return ResultIterator(self._run(func, iterable, chunksize, callback, True, False, opts,
                                        forward_output, progress))

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: Optional[int] = None,
                       callback: Optional[Callable[[Any], Any]] = None, *,
                       initializer: Optional[Callable[..., Any]] = None,
                       initargs: Tuple[Any, ...] = (), maxtasksperchild: Optional[int] = None,
                       max_active: Optional[int] = None, group: Optional[str] = None,
                       forward_output: Optional[bool] = None,
                       progress: Any = None) -> ResultIterator:
        """Like :meth:`imap` but yields results in completion order.

        ``callback`` runs on the node on each result; the other options are :meth:`map`'s.
        """
        opts = JobOptions.check(initializer, initargs, maxtasksperchild, max_active, group)
        return ResultIterator(self._run(func, iterable, chunksize, callback, False, False, opts,
                                        forward_output, progress))

    def submit_job(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                   on_event: Callable[[HandleEvent], Any], chunksize: Optional[int] = None,
                   callback: Optional[Callable[[Any], Any]] = None, *,
                   initializer: Optional[Callable[..., Any]] = None,
                   initargs: Tuple[Any, ...] = (), maxtasksperchild: Optional[int] = None,
                   max_active: Optional[int] = None, group: Optional[str] = None,
                   forward_output: Optional[bool] = None, progress: Any = None) -> JobHandle:
        """Start ``map(func, iterable)`` and return at once; no thread waits for it.

        ``on_event`` gets, on this cluster's event thread (one for all its handles, callbacks
        one at a time, so keep them quick), a ``JobResults(start, values)`` per finished chunk
        in completion order, then exactly one ``JobDone(items)`` or ``JobError(error, index)``
        (the first failure; the rest of the job is cancelled). The input is read lazily on the
        event thread. Bad options and an unpicklable function raise here; an input iterator
        that raises or an unpicklable item end the job with ``JobError`` after the results
        before it. ``handle.cancel(reason)`` stops it from any thread. The options are
        :meth:`map`'s; forwarded task output and a ``progress`` bar are drawn on the event thread.
        """
        opts = JobOptions.check(initializer, initargs, maxtasksperchild, max_active, group)
        size = check_chunksize(chunksize)
        if not callable(func):
            raise TypeError(f"func must be callable, not {type(func).__name__}")
        if not callable(on_event):
            raise TypeError(f"on_event must be callable, not {type(on_event).__name__}")
        options = {**opts.encode(self._scope), **self.job_options(forward_output)}
        inputs = _inputs(iterable)
        spec = self._progress(progress)

        def make_run(sink: EventSink) -> JobRun:
            return JobRun(self, func, inputs, size, callback, False, options, True,
                          opts.cap_chunksize(size), sink=sink, progress=spec)

        return self._handles.start(on_event, make_run)

    # --- call graphs --------------------------------------------------------------------------
    def compute(self, *calls: Any, forward_output: Optional[bool] = None,
                progress: Any = None) -> List[Any]:
        """Run the graphs under these lazy task calls (shared parts run once) and return their
        values in order. A failing task raises its own exception with the remote traceback,
        its position in the graph and its last lines of output. Task output is printed here
        with a ``(node task name#id)`` prefix unless ``forward_output=False``. ``progress`` as
        for :meth:`map`, counting tasks settled; ``"tasks"`` draws one bar per ``@task`` name."""
        from achilles.controller.graph import GraphRun

        return GraphRun(self, list(calls), self.job_options(forward_output),
                        self._progress(progress)).wait()

    def submit_graph(self, call: Any, forward_output: Optional[bool] = None,
                     progress: Any = None) -> "concurrent.futures.Future[Any]":
        """Start a graph in the background; returns a ``concurrent.futures.Future`` of its
        value (so ``add_done_callback``, ``as_completed`` and ``wait`` work)."""
        from achilles.controller.graph import single, submit_graph

        return single(submit_graph(self, [call], self.job_options(forward_output),
                                   self._progress(progress)))

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Any]":
        """Run ``fn(*args, **kwargs)`` once on the cluster; returns a Future of its value.
        ``fn`` may be a ``@task`` (its options apply) or any function."""
        from achilles.core.taskgraph import TaskFunction, TaskOptions

        wrapped = fn if isinstance(fn, TaskFunction) else TaskFunction(fn, TaskOptions())
        return self.submit_graph(wrapped(*args, **kwargs))

    # --- cluster management -----------------------------------------------------------------
    def status(self) -> Dict[str, List[Dict[str, Any]]]:
        """``{"nodes": [...], "jobs": [...]}``: per node name, address, processes, busy, done;
        per job id, owner, function, sent, done, failed. JSON-serializable."""
        return self._request(wire.STATUS, REQUEST_TIMEOUT)

    def kill(self, command_verified: bool = False) -> int:
        """Stop every node and the server; returns the number of nodes stopped once all are gone.

        Asks for confirmation on a terminal unless ``command_verified=True``; without a
        terminal and without it, refuses.
        """
        if not command_verified:
            if not is_interactive():
                raise AchillesError("refusing to stop the cluster without confirmation: call "
                                    "kill(command_verified=True) from a script")
            answer = input(f"Stop every node and the server at {self.config.host}:"
                           f"{self.config.port}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise AchillesError("cluster kill aborted")
        proto = self._protocol()
        stopped = self._request(wire.KILL, KILL_TIMEOUT)
        reactor_thread.call(lambda: proto.closed, timeout=KILL_TIMEOUT)
        with self._lock:
            self._reached = False  # stopped on purpose: a later call fails fast, not waits
        return int(stopped)

    def close(self) -> None:
        """Close the connection (jobs still running for this controller are cancelled; job
        handles end with ``JobError(JobCancelled)``)."""
        self._handles.close("the cluster was closed")
        with self._lock:
            proto, self._proto = self._proto, None
        if proto is not None and proto.state != "closed":
            def drop() -> Any:
                proto.link.loseConnection()
                return proto.closed
            try:
                reactor_thread.call(drop, timeout=10)
            except TimeoutError:
                pass

    def __enter__(self) -> "Cluster":
        """Inside the ``with`` block this cluster is the default of the module-level calls
        (``achilles.map``, ``g.result()``...; :mod:`achilles.core.defaults`)."""
        defaults.push(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        defaults.remove(self)
        self.close()


def connect_cluster(host: Optional[str] = None, port: Optional[int] = None,
                    username: Optional[str] = None, secret_key: Optional[str] = None) -> Cluster:
    """Connect to a server; arguments override the environment and ``.env``."""
    return Cluster(load_config(host=host, port=port, username=username, secret_key=secret_key))
