"""The loop each worker process runs: receive a chunk, call the function per item, send results.

Messages on the pipe (parent -> worker): a pickled ``(func_bytes, callback_bytes, careful,
kind, group, init_bytes, maxtasks, forward, inline, shm)``, then the raw payload unless ``inline``
holds it (payloads up to :data:`INLINE_MAX` bytes travel inside the header: one message and
one wake-up of the worker instead of two); ``kind`` is ``map`` (payload: a
list of items) or ``graph`` (func_bytes: the graph's functions by key; payload: one task's key,
arguments and input values). Once a chunk is received, :data:`TAKEN` is written to a shared
counter; in careful mode (a re-run after the chunk killed a worker) the index of the item
being run is written there before each item, so the node can blame the exact item if the
worker dies again.
A pickled *list* of such tuples (each with its payload inline) is a batch: small chunks of one
job sent in one message; the worker runs and answers them one after another as if each had
come alone, writing :data:`UNTAKEN` back to the counter after each answer, so a worker that
dies between two of them is not blamed on the next.
Replies (worker -> parent): a pickled ``(status, elapsed, retire, inline)`` header, then the
result payload unless ``inline`` holds it (as above) — a pickled list of results, or an
:func:`achilles.core.serialization.error_record`.
The header's last element, ``shm``, is the name of the chunk's result segment when the node
shares the server's shared memory (:mod:`achilles.core.shm`; the worker got the directory,
key and threshold when it started), else None: a map chunk's payload may then be a reference
(read and checked here before anything is unpickled; a bad one is the chunk's error), and an
OK chunk's results of ``threshold`` bytes or more go to the named segment (pickled straight
into it when they look large: :func:`encode_results`) and are answered with its reference.
``retire`` says the process exits after this reply (``maxtasksperchild`` reached). With
``forward`` the chunk's output is captured (:mod:`achilles.node.capture`) and sent before the
reply as pickled ``("out", (lines, dropped))`` and, when the chunk failed, ``("tail", lines)``.

Per-group state (``group`` names a job, or several jobs of one ``achilles.Pool``): the
group's initializer (``init_bytes``: dill of ``functools.partial(initializer, *initargs)``) runs once in this
process before its first chunk of the group; with ``maxtasks`` the process runs at most that
many of the group's items (calls) and then exits, to be replaced. A chunk that would take it
past the limit is not run here: the reply is :data:`RETIRE` and the node runs the chunk on a
fresh process (one chunk larger than the limit runs whole on a fresh process).
Before the reply, a task that calls :func:`report_progress` may send ``("progress", n)``
messages, at most one per :data:`PROGRESS_INTERVAL` seconds per worker.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from achilles.core import shm, wire
from achilles.core.serialization import dumps_data, error_record, loads_code, loads_data
from achilles.node.capture import Capture
from achilles.node.malloc import keep_freed_memory
from achilles.node.pipeio import recv_buffer

CODE_CACHE = 32
#: Payloads up to this many bytes go inside their header's pickle (one pipe message).
INLINE_MAX = 64 << 10
#: Written to the progress counter as soon as a chunk is received: a worker that dies with the
#: counter still at -1 died before taking its chunk, which is then not to blame.
TAKEN = -2
#: Written back to the counter after each answer to a chunk of a batch (see below).
UNTAKEN = -1
#: Reply status (never on the wire): this process is retiring before the chunk; run it elsewhere.
RETIRE = -1
#: The kind of a progress message on the pipe (``(PROGRESS, n)``, like output messages).
PROGRESS = "progress"
#: Seconds between two progress headers from one worker: report_progress is rate-limited here.
PROGRESS_INTERVAL = 0.2
#: A graph task's outcome in a batch when it did not run (an input in the batch failed);
#: the server's ``achilles.server.graphs.NOT_RUN``.
NOT_RUN = -1


class _Reporter:
    """Sums a running task's :func:`report_progress` calls and sends the sum up the pipe at
    most once per :data:`PROGRESS_INTERVAL`: a report inside the interval waits for a timer
    thread, and a remainder not yet sent when the chunk ends is dropped (its result counts
    every item). Writes to the pipe go under :meth:`lock`: the output capture's when it
    captures this chunk (its flushes write to the same pipe), else the reporter's own."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._own = threading.Lock()
        self._lock: Any = self._own
        self.pid = os.getpid()  # a process the task forks shares the pipe: it reports nothing
        self.pending = 0.0
        self.last = -PROGRESS_INTERVAL
        self.chunk = 0  # counts chunks, so that a timer of an earlier chunk sends nothing
        self.running = False
        self.timer: Optional[threading.Timer] = None

    def lock(self) -> Any:
        """The lock every write to the pipe takes during the current chunk."""
        return self._lock

    def start(self, capture: Any) -> None:
        """A chunk starts (``capture``: the output capture, if it captures this chunk)."""
        self._lock = self._own if capture is None else capture.lock
        with self._lock:
            self.running = True

    def add(self, n: float) -> None:
        if os.getpid() != self.pid:
            return
        with self.lock():
            if not self.running:
                return
            self.pending += n
            wait = self.last + PROGRESS_INTERVAL - time.monotonic()
            if wait <= 0:
                self._send()
            elif self.timer is None:
                self.timer = threading.Timer(wait, self._flush, (self.chunk,))
                self.timer.daemon = True
                self.timer.start()

    def _flush(self, chunk: int) -> None:
        with self.lock():
            self.timer = None
            if chunk == self.chunk and self.running and self.pending:
                self._send()

    def _send(self) -> None:
        self.last = time.monotonic()
        self.conn.send_bytes(pickle.dumps((PROGRESS, self.pending), protocol=5))
        self.pending = 0.0

    def end(self) -> None:
        """The chunk ended (call with :meth:`lock` held, before sending its outcome): what is
        pending is dropped and no timer of this chunk sends any more."""
        self.running = False
        self.chunk += 1
        self.pending = 0.0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_reporter: Optional[_Reporter] = None


def report_progress(n: float = 1) -> None:
    """Inside a task running on a node: ``n`` more items of the current chunk (or a fraction
    of a graph task) are done, so the caller's progress bar moves before the chunk returns.
    Elsewhere (not in a worker process) it does nothing."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 < n < float("inf"):
        raise ValueError(f"report_progress takes a positive number of items, not {n!r}")
    reporter = _reporter
    if reporter is not None:
        reporter.add(float(n))


class _CodeCache:
    """Functions already loaded, keyed by their dill bytes (a job ships the same bytes)."""

    def __init__(self) -> None:
        self._items: "collections.OrderedDict[bytes, Callable[..., Any]]" = \
            collections.OrderedDict()

    def get(self, data: bytes) -> Callable[..., Any]:
        try:
            self._items.move_to_end(data)
            return self._items[data]
        except KeyError:
            func = loads_code(data)
            self._items[data] = func
            if len(self._items) > CODE_CACHE:
                self._items.popitem(last=False)
            return func


def _call(func: Callable[[Any], Any], callback: Optional[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    if callback is None:
        return func
    return lambda item: callback(func(item))


def run_chunk(cache: _CodeCache, func_bytes: bytes, cb_bytes: bytes, payload: Any,
              progress: Any = None, results: Optional[list] = None,
              raw: bool = False) -> Tuple[int, Any]:
    """Run one chunk; returns ``(status, result payload)``. Never raises for a task's error.

    ``payload`` is the pickled list of items, or the list itself. With ``progress`` (a shared
    integer), each item's index is stored there before it runs. ``results``, if given, is
    the (empty) list the results are gathered in. With ``raw``, an OK chunk's payload is that
    list itself, not yet pickled (see :func:`encode_results`).
    """
    if results is None:
        results = []
    append = results.append
    try:
        call = _call(cache.get(func_bytes), cache.get(cb_bytes) if cb_bytes else None)
        items = payload if isinstance(payload, list) else loads_data(payload)
        if progress is None:
            for item in items:
                append(call(item))
        else:
            for index, item in enumerate(items):
                progress.value = index
                append(call(item))
    except BaseException as exc:  # a task's SystemExit or KeyboardInterrupt is its error too
        return wire.ITEM_ERROR, error_record(len(results), exc, results)
    if raw:
        return wire.OK, results
    try:
        return wire.OK, dumps_data(results)
    except BaseException:
        return wire.ITEM_ERROR, _unpicklable_result(results)


def encode_results(results: list, shm_settings: Optional[Tuple[str, bytes, int]],
                   segment: Optional[str]) -> Tuple[int, bytes, Optional[str]]:
    """An OK chunk's ``results`` for the reply: ``(status, payload, segment written)``.

    With a segment name and the node's shared memory: results that look large (the first
    one's size times their number reaches the threshold) are pickled straight into the
    segment, with no pickle in this process's memory first; others are pickled and go to the
    segment if the pickle is that large. The payload is then the segment's reference. With
    no room in shared memory, or none to use, the pickle goes through the pipe. Results that
    cannot be pickled make the chunk's error record (status ``ITEM_ERROR``)."""
    if segment is not None and shm_settings is not None and results \
            and sys.getsizeof(results[0]) * len(results) >= shm_settings[2]:
        try:
            return wire.OK, shm.dump(shm_settings[0], shm_settings[1], results, segment), segment
        except Exception:  # no room (OSError), or the C pickler refuses something: pickled
            pass  # below (dumps_data tries dill, or names it), through the pipe if need be
    try:
        data = dumps_data(results)
    except BaseException:
        return wire.ITEM_ERROR, _unpicklable_result(results), None
    if segment is not None and shm_settings is not None and len(data) >= shm_settings[2]:
        try:
            return wire.OK, shm.write(shm_settings[0], shm_settings[1], data, segment), segment
        except OSError:
            pass  # no room in shared memory: the bytes go through the pipe
    return wire.OK, data, None


def _unpicklable_result(results: list) -> bytes:
    """The error record of a chunk whose results cannot be pickled: the first such result's
    error, at its index, with the results before it."""
    for index, value in enumerate(results):
        try:
            dumps_data(value)
        except BaseException as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(f"the result of item {index} of its chunk ({type(value).__name__}) "
                             "cannot be pickled to send it back")
            return error_record(index, exc, results[:index])
    try:  # each result pickles alone, but not the list (say, too deep): blame the first
        dumps_data(results)
    except BaseException as exc:
        return error_record(0, exc, [])
    return error_record(0, RuntimeError("the results could not be pickled"), [])


class _Groups:
    """Per-group state in this process: initializers run, items run."""

    def __init__(self) -> None:
        self.initialized: set = set()
        self.calls: Dict[str, int] = {}

    def prepare(self, group: str, init_bytes: bytes) -> Optional[bytes]:
        """Run the group's initializer if this process has not yet; an error record if it raised."""
        if not init_bytes or group in self.initialized:
            return None
        try:
            loads_code(init_bytes)()
        except BaseException as exc:
            if hasattr(exc, "add_note"):
                exc.add_note("raised by the initializer, in the worker process before its first "
                             "task of this job")
            return error_record(0, exc, [])
        self.initialized.add(group)
        return None

    def must_retire(self, group: str, maxtasks: int, n_items: int) -> bool:
        """Whether this process must be replaced before running ``n_items`` more of the group."""
        done = self.calls.get(group, 0)
        return bool(maxtasks) and done > 0 and done + n_items > maxtasks

    def count(self, group: str, maxtasks: int, n_items: int) -> bool:
        """Count items run; whether the process has reached the group's ``maxtasks``."""
        done = self.calls[group] = self.calls.get(group, 0) + n_items
        return bool(maxtasks) and done >= maxtasks


class _GraphCode:
    """A graph's functions, loaded one key at a time as tasks need them."""

    def __init__(self, data: bytes) -> None:
        self._raw = pickle.loads(data)
        self._loaded: dict = {}

    def get(self, key: str) -> Callable[..., Any]:
        func = self._loaded.get(key)
        if func is None:
            func = self._loaded[key] = loads_code(self._raw[key])
        return func


_graph_codes: "collections.OrderedDict[bytes, _GraphCode]" = collections.OrderedDict()


def _graph_code(funcs_bytes: bytes) -> _GraphCode:
    code = _graph_codes.get(funcs_bytes)
    if code is None:
        code = _graph_codes[funcs_bytes] = _GraphCode(funcs_bytes)
        if len(_graph_codes) > CODE_CACHE:
            _graph_codes.popitem(last=False)
    return code


def run_graph_task(funcs_bytes: bytes, payload: "bytes | bytearray",
                   capture: Optional[Capture] = None) -> Tuple[int, bytes, bool]:
    """Run one call-graph task, or a batch of them (:func:`run_graph_batch`); returns
    ``(status, pickled value or error record, whether a task failed)`` (a batch: OK and
    its outcomes)."""
    from achilles.core.taskrefs import resolve

    try:
        code = _graph_code(funcs_bytes)
        work = pickle.loads(payload)
        if type(work) is tuple and len(work) == 2:
            outcomes: list = []
            if capture is not None:
                capture.track(outcomes)
            result = run_graph_batch(code, work[0], work[1], outcomes, capture)
            return wire.OK, result, any(o[1] != wire.OK for o in outcomes)
        key, shipped, inputs = work
        args, kwargs = resolve(shipped, {task_id: loads_data(v) for task_id, v in inputs.items()})
        result = code.get(key)(*args, **kwargs)
    except BaseException as exc:
        return wire.ITEM_ERROR, error_record(0, exc, []), True
    try:
        return wire.OK, dumps_data(result), False
    except BaseException as exc:
        return wire.ITEM_ERROR, error_record(0, exc, []), True


#: Values a batch hands to several consumers without copying them (they cannot be changed).
_IMMUTABLE = frozenset({int, float, complex, str, bytes, bool, type(None)})


def run_graph_batch(code: _GraphCode, tasks: list, keep: list, outcomes: list,
                    capture: Optional[Capture] = None) -> bytes:
    """Run a batch of graph tasks in order; the pickled list of one outcome per task,
    ``(task id, status, seconds, value)``: the pickled value for tasks in ``keep`` (else
    None), an error record for a failure, ``NOT_RUN`` for a task an input of which failed.

    Each task is ``(id, function key, shipped arguments, {input id: pickled value} for
    inputs from outside the batch, [ids of inputs in the batch])``. Values stay objects inside
    the batch; an input used by several of its consumers reaches each as its own copy (as
    across the network), unless it is immutable. ``outcomes`` is filled as tasks end (the
    output capture takes its length as the running task's index).
    """
    from achilles.core.taskrefs import resolve

    values: Dict[int, Any] = {}
    uses: Dict[int, int] = collections.Counter(d for task in tasks for d in task[4])
    wanted = set(keep)
    append = outcomes.append
    clock = time.perf_counter
    for task_id, key, shipped, inputs, inner in tasks:
        if any(d not in values for d in inner):
            append((task_id, NOT_RUN, 0.0, None))
            continue
        start = clock()
        try:
            found = {d: loads_data(v) for d, v in inputs.items()}
            for d in inner:
                found[d] = _take(values, uses, d)
            args, kwargs = resolve(shipped, found)
            result = code.get(key)(*args, **kwargs)
            value = dumps_data(result) if task_id in wanted else None
        except BaseException as exc:
            if capture is not None:
                capture.keep_lines_of(len(outcomes))
            append((task_id, wire.ITEM_ERROR, clock() - start, error_record(0, exc, [])))
            continue
        if uses.get(task_id):
            values[task_id] = result
        append((task_id, wire.OK, clock() - start, value))
    return pickle.dumps(outcomes, protocol=5)


def _take(values: Dict[int, Any], uses: Dict[int, int], task_id: int) -> Any:
    """A batch's value of ``task_id`` for one more consumer: the object itself for the last
    (or for an immutable value), a copy for the others."""
    value = values[task_id]
    uses[task_id] -= 1
    if not uses[task_id]:
        del values[task_id]
        return value
    if type(value) in _IMMUTABLE:
        return value
    try:
        return pickle.loads(dumps_data(value))
    except BaseException:
        return value


def worker_main(conn: Any, progress: Any,
                shm_settings: Optional[Tuple[str, bytes, int]] = None) -> None:
    """Serve chunks from ``conn`` until the parent closes it; ``progress`` is a shared int;
    ``shm_settings``: the node's shared-memory ``(directory, key, threshold)``, or None."""
    global _reporter
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    cache = _CodeCache()
    groups = _Groups()
    capture: Optional[Capture] = None

    def send(kind: str, data: Any) -> None:
        conn.send_bytes(pickle.dumps((kind, data), protocol=5))

    reporter = _reporter = _Reporter(conn)
    segment_buffer = shm.ReadBuffer()  # argument segments are read into it (then unpickled)

    def serve(entry: tuple, payload: Any) -> None:
        """Run one chunk and send its answer."""
        nonlocal capture
        func_bytes, cb_bytes, careful, kind, group, init_bytes, maxtasks, forward, _, segment \
            = entry
        progress.value = TAKEN
        results: Optional[list] = None
        if forward:
            if capture is None:
                capture = Capture(send)
            results = [] if kind != "graph" else None
            capture.start(results)
        reporter.start(capture if forward else None)
        start = time.perf_counter()
        retire = False
        failed = False
        refused: Optional[BaseException] = None
        if kind == "map" and shm.is_ref(payload):
            try:
                if shm_settings is None:
                    raise shm.ShmError("a shared-memory reference reached a node that does not "
                                       "share memory with the server")
                payload = shm.read(shm_settings[0], shm_settings[1], payload, segment_buffer)
            except shm.ShmError as exc:
                refused = exc
        result: Any  # bytes, or an OK map chunk's results list until encode_results
        if refused is not None:
            status, result = wire.ITEM_ERROR, error_record(0, refused, [])
        elif kind == "graph":
            status, result, failed = run_graph_task(func_bytes, payload,
                                                    capture if forward else None)
        elif not (group and (init_bytes or maxtasks)):
            status, result = run_chunk(cache, func_bytes, cb_bytes, payload,
                                       progress if careful else None, results, raw=True)
        else:
            status, result, retire = _run_in_group(cache, groups, func_bytes, cb_bytes, payload,
                                                   progress if careful else None, group,
                                                   init_bytes, maxtasks, results)
        written = None
        if status == wire.OK and kind != "graph":  # the results list, not yet pickled
            status, result, written = encode_results(result, shm_settings, segment)
        elapsed = time.perf_counter() - start
        try:
            small = len(result) <= INLINE_MAX
            header = pickle.dumps((status, elapsed, retire, result if small else None),
                                  protocol=5)
            with reporter.lock():
                reporter.end()
                if capture is not None and capture.active:
                    capture.finish(failed or status not in (wire.OK, RETIRE))
                conn.send_bytes(header)
                if not small:
                    conn.send_bytes(result)
        except (EOFError, OSError):
            if written is not None and shm_settings is not None:
                shm.discard(shm_settings[0], written)
            os._exit(0)
        if retire:
            os._exit(0)

    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
            if type(message) is list:  # a batch: small chunks of one job, answered one by one
                for entry in message:
                    serve(entry, entry[8])
                    progress.value = UNTAKEN
                continue
            payload = recv_buffer(conn) if message[8] is None else message[8]
        except (EOFError, OSError):
            os._exit(0)
        serve(message, payload)


def _run_in_group(cache: _CodeCache, groups: _Groups, func_bytes: bytes, cb_bytes: bytes,
                  payload: "bytes | bytearray", progress: Any, group: str, init_bytes: bytes,
                  maxtasks: int, results: Optional[list] = None) -> Tuple[int, Any, bool]:
    """Run a chunk of a group with an initializer or a task limit: ``(status, payload,
    retire)``, an OK payload being the results list (as :func:`run_chunk` with ``raw``);
    status :data:`RETIRE` when the chunk must run on a fresh process."""
    try:
        items = loads_data(payload)
    except BaseException as exc:
        return wire.ITEM_ERROR, error_record(0, exc, []), False
    if groups.must_retire(group, maxtasks, len(items)):
        return RETIRE, b"", True
    failed = groups.prepare(group, init_bytes)
    if failed is not None:
        return wire.ITEM_ERROR, failed, False
    status, result = run_chunk(cache, func_bytes, cb_bytes, items, progress, results, raw=True)
    return status, result, groups.count(group, maxtasks, len(items))
