"""One map/imap call as seen by the caller's thread: feed input on credit, gather results.

The caller's thread does the work that scales with the data (reading the input iterable,
pickling chunks, unpickling results), so the reactor thread only moves bytes. Input is read
only while the server asks for it (``WANT``) and the caller's window has room, so a slow
consumer or an endless generator holds a bounded amount in memory.
"""

from __future__ import annotations

import collections
import itertools
import pickle
import queue
import uuid
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

from achilles import wire
from achilles.errors import ConnectionLost, JobCancelled, WorkerCrashed
from achilles.serialization import dumps_code, dumps_data, function_name, load_error, loads_data
from achilles.controller.chunking import ChunkSizer

INITIAL_CREDIT = 2  # must match achilles.server.scheduler.INITIAL_CREDIT
MIN_WINDOW = 8


class JobRun:
    """Submits a job on creation; :meth:`chunks` yields result lists (ordered or as completed)."""

    def __init__(self, link: Any, func: Callable[..., Any], iterable: Iterable[Any],
                 chunksize: Optional[int], callback: Optional[Callable[..., Any]], ordered: bool,
                 options: Optional[Dict[str, Any]] = None) -> None:
        self.link = link  # has .register(job_id) -> queue, .unregister(job_id), .send(messages)
        self.ordered = ordered
        self.function = function_name(func)
        total: Optional[int]
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        self.sizer = ChunkSizer(chunksize, total)
        self.job_id = uuid.uuid4().hex
        self.events: "queue.Queue[tuple]" = link.register(self.job_id)
        self._input = iter(iterable)
        self.credit = INITIAL_CREDIT
        self.window = MIN_WINDOW
        self.exhausted = False
        self.finished = False
        self.n_chunks = 0
        self.items_sent = 0
        self.items_done = 0
        self.outstanding: Dict[int, Tuple[int, int]] = {}  # chunk id -> (first item, n items)
        self.buffered: Dict[int, list] = {}
        self.ready: Deque[list] = collections.deque()
        self.next_chunk = 0
        self.error: Optional[Tuple[int, BaseException, list]] = None  # (chunk id, exc, partial)
        self.link.send([wire.encode_message(wire.SUBMIT, (
            self.job_id, self.function, dumps_code(func), dumps_code(callback), options or {}))])
        self._fill()

    # --- input ------------------------------------------------------------------------------
    def _fill(self) -> None:
        messages = []
        while (self.credit > 0 and not self.exhausted and self.error is None
               and len(self.outstanding) + len(self.buffered) + len(self.ready) < self.window):
            size = self.sizer.size()
            items = list(itertools.islice(self._input, size))
            if items:
                cid = self.n_chunks
                self.n_chunks += 1
                self.outstanding[cid] = (self.items_sent, len(items))
                self.items_sent += len(items)
                messages.append(wire.encode_message(
                    wire.CHUNK, (self.job_id, cid, len(items), dumps_data(items))))
                self.credit -= 1
            if len(items) < size:
                self.exhausted = True
                messages.append(wire.encode_message(wire.END, (self.job_id, self.n_chunks)))
        if messages:
            self.link.send(messages)

    # --- results ----------------------------------------------------------------------------
    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "want":
            _, n, processes, capacity = event
            self.credit += n
            self.sizer.processes = processes
            self.window = max(MIN_WINDOW, 2 * capacity + INITIAL_CREDIT)
        elif kind == "result":
            _, cid, status, payload, elapsed, node = event
            spec = self.outstanding.pop(cid, None)
            if spec is None:
                return
            first, n = spec
            if status == wire.OK:
                values = loads_data(payload)
                self.items_done += n
                self.sizer.observe(n, elapsed)
                if self.ordered:
                    self.buffered[cid] = values
                else:
                    self.ready.append(values)
                return
            if status == wire.ITEM_ERROR:
                index, exc, partial = load_error(payload)
                if hasattr(exc, "add_note"):
                    exc.add_note(f"raised by {self.function} on item {first + index} "
                                 f"(node {node}, job {self.job_id[:8]})")
            else:
                exitcode = pickle.loads(payload) if payload else None
                exc, partial = WorkerCrashed(
                    f"a worker process died (exit code {exitcode}) running items {first}.."
                    f"{first + n - 1} of {self.function} on node {node}", item=first), []
            if self.error is None or (self.ordered and cid < self.error[0]):
                self.error = (cid, exc, partial)
        elif kind == "failed":
            raise JobCancelled(f"job {self.job_id[:8]} failed on the server: {event[1]}")
        elif kind == "lost":
            raise ConnectionLost(
                f"lost the connection to the server ({event[1]}) with {self.items_done} of "
                f"{self.items_sent} items done", done=self.items_done)

    def chunks(self) -> Iterator[list]:
        """Yield lists of results; raise the first task error once everything before it is out."""
        try:
            while True:
                if self.ordered:
                    while self.next_chunk in self.buffered:
                        yield self.buffered.pop(self.next_chunk)
                        self.next_chunk += 1
                else:
                    while self.ready:
                        yield self.ready.popleft()
                if self.error is not None and (not self.ordered or self.next_chunk == self.error[0]):
                    _, exc, partial = self.error
                    if partial:
                        yield partial
                    raise exc
                if self.exhausted and not self.outstanding and not self.buffered and not self.ready:
                    self.finished = True
                    return
                self._fill()
                self._handle(self.events.get())
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the job on the server if it has not finished; stop listening for it."""
        if not self.finished:
            self.finished = True
            self.link.send([wire.encode_message(wire.CANCEL, (self.job_id, "cancelled by the caller"))])
        self.link.unregister(self.job_id)


class ResultIterator:
    """What ``imap`` and ``imap_unordered`` return: results one at a time; ``close()`` cancels."""

    def __init__(self, run: JobRun) -> None:
        self._run = run
        self._items = (value for chunk in run.chunks() for value in chunk)

    def __iter__(self) -> "ResultIterator":
        return self

    def __next__(self) -> Any:
        return next(self._items)

    def close(self) -> None:
        """Stop early: the rest of the job is cancelled."""
        self._items.close()
        self._run.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
