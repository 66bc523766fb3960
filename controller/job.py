"""One map/imap call as seen by the caller's thread: feed input on credit, gather results.

The caller's thread does the work that scales with the data (reading the input iterable,
pickling chunks, unpickling results), so the reactor thread only moves bytes. Input is read
only while the server asks for it (``WANT``) and the caller's window has room, so a slow
consumer or an endless generator holds a bounded amount in memory.
"""

from __future__ import annotations

import collections
import itertools
import sys
import uuid
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

from achilles.core import shm, wire
from achilles.core.errors import ConnectionLost, JobCancelled
from achilles.core.codecache import dumps_code_cached
from achilles.core.serialization import dumps_data, function_name, loads_data
from achilles.controller.chunking import ChunkSizer, ItemCosts
from achilles.controller.events import (
    Cancelled, ChunkResult, ConnectionLostEvent, Event, EventQueue, EventSink, JobFailed, JobLink,
    JobProgress, Output, OutputTail, Want,
)
from achilles.controller.failures import failure_exception
from achilles.controller.output import OutputPrinter
from achilles.controller.progress import Progress

INITIAL_CREDIT = wire.INITIAL_CREDIT
MIN_WINDOW = 8


def _cost_key(func: Callable[..., Any], callback: Optional[Callable[..., Any]]) -> Tuple:
    """Which earlier jobs' item cost fits this one: same function and callback, by name and
    code (code objects compare by content, so two lambdas differ)."""
    def which(f: Any) -> Any:
        return None if f is None else (function_name(f), getattr(f, "__code__", None))
    return which(func), which(callback)


def _label(chunk_id: int, first: int) -> Callable[[Optional[int]], str]:
    """Names a line of a chunk's output by its item's place in the input (``first`` is the
    chunk's first item)."""
    return lambda index: f"chunk {chunk_id}" if index is None else f"item {first + index}"


class JobRun:
    """Submits a job on creation; :meth:`chunks` yields result lists (ordered or as completed).

    An empty input never reaches the server. An input iterable that raises, or an item that
    cannot be pickled, ends the input there: the results of every item before it come first,
    then that exception (:attr:`input_error`) is raised.

    ``progress`` (a spec from :func:`achilles.controller.progress.wanted`, or None) asks the
    server for the job's progress (WATCH) and draws it.
    """

    def __init__(self, link: JobLink, func: Callable[..., Any], iterable: Iterable[Any],
                 chunksize: Optional[int], callback: Optional[Callable[..., Any]], ordered: bool,
                 options: Optional[Dict[str, Any]] = None, balance: bool = False,
                 chunk_limit: Optional[int] = None, sink: Optional[EventSink] = None,
                 progress: Any = None) -> None:
        self.link = link
        self.ordered = ordered
        self.function = function_name(func)
        total: Optional[int]
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        self._costs: Optional[ItemCosts] = getattr(link, "item_costs", None)
        self._cost_key = _cost_key(func, callback)
        self.sizer = ChunkSizer(chunksize, total, balance, chunk_limit,
                                self._costs.get(self._cost_key) if self._costs else None,
                                getattr(link, "processes_seen", 0))
        self.job_id = uuid.uuid4().hex
        self.events: EventQueue = EventQueue()
        # Where the connection puts this job's events: ``events`` (read by chunks()), or the
        # sink of an event-driven reader (JobHandle).
        self._sink: EventSink = self.events if sink is None else sink
        self.credit = INITIAL_CREDIT
        self.window = MIN_WINDOW
        self.exhausted = False
        self.finished = False
        self.n_chunks = 0
        self.items_sent = 0
        self.items_done = 0
        # chunk id -> (first item, n items, encoded CHUNK): kept until answered, for resubmission
        self.outstanding: Dict[int, Tuple[int, int, List[bytes]]] = {}
        self.session_chunks = 0  # CHUNKs sent on the current connection (END counts these)
        # chunk id -> reference of a chunk sent as a shared-memory segment (achilles.core.shm;
        # the segment holds what the encoded CHUNK held before): unlinked when its result
        # arrives or the job ends; read back to resend it as bytes to a server this end has
        # not proven to share memory with
        self.segments: Dict[int, bytes] = {}
        self._shm: Any = getattr(link, "segments", None)
        self.buffered: Dict[int, list] = {}
        self.ready: Deque[Tuple[int, list]] = collections.deque()  # (first item, results)
        self.next_chunk = 0
        self.error: Optional[Tuple[int, BaseException, list]] = None  # (chunk id, exc, partial)
        self.error_first = 0  # input index of the failing chunk's first item
        self.error_index: Optional[int] = None  # input index of the failing item, when known
        #: What ended the input early: the iterable's own exception, or an item's pickling error.
        self.input_error: Optional[BaseException] = None
        self.output = OutputPrinter()
        # Pickled before anything is registered or sent: an unpicklable function raises here.
        self._submit = wire.encode_message(wire.SUBMIT, (
            self.job_id, self.function, dumps_code_cached(func), dumps_code_cached(callback),
            options or {}))
        self.progress: Optional[Progress] = None
        self.chunks_failed = 0
        self._base = (0, 0)  # items done and re-runs before the server's current copy of the job
        self._retried = 0
        self._opening = [self._submit]
        if progress is not None:
            self._opening.append(wire.encode_message(wire.WATCH, (self.job_id,)))
        self._input: Iterator[Any] = iter(iterable)
        self._conn = 0
        head = [] if total == 0 else [None] if total else self._read(1)
        if not head:  # empty input (or it raised at once): nothing to ask the server
            self.exhausted = self.finished = True
            return
        if total is None:
            self._input = itertools.chain(head, self._input)
        self._conn = link.register(self.job_id, self._sink)
        if progress is not None:
            self.progress = Progress(progress, total, self.function)
        try:
            self._fill(list(self._opening))
        except BaseException:
            self.close()
            raise

    # --- input ------------------------------------------------------------------------------
    def _read(self, n: int) -> list:
        """Up to ``n`` items; an exception from the iterable ends the input (kept, not raised)."""
        items: list = []
        if self.input_error is None:
            try:
                # extend keeps the items appended before an exception from the iterable
                items.extend(itertools.islice(self._input, n))
            except Exception as exc:
                self.input_error = exc
        return items

    def _pickle(self, items: list) -> Tuple[list, Optional[bytes]]:
        """``(items, payload)``; if an item cannot be pickled, only the items before it, and
        the input ends with that item's error."""
        try:
            return items, dumps_data(items)
        except Exception:
            pass
        for index, item in enumerate(items):
            try:
                dumps_data(item)
            except Exception as exc:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"item {self.items_sent + index} of the input to "
                                 f"{self.function} ({type(item).__name__}) cannot be pickled")
                self.input_error = exc
                items = items[:index]
                break
        else:
            self.input_error, items = TypeError(
                f"items {self.items_sent}..{self.items_sent + len(items) - 1} of the input to "
                f"{self.function} cannot be pickled together"), []
        return items, (dumps_data(items) if items else None)

    def _fill(self, messages: Optional[List[List[bytes]]] = None) -> None:
        """Send chunks while credit and the window allow (after ``messages``, if any)."""
        messages = [] if messages is None else messages
        while (self.credit > 0 and not self.exhausted and self.error is None and not self.finished
               and len(self.outstanding) + len(self.buffered) + len(self.ready) < self.window):
            size = self.sizer.size()
            items, payload = self._encode(self._read(size))
            self.sizer.issue(len(items))
            if items:
                cid = self.n_chunks
                self.n_chunks += 1
                if payload is not None and shm.is_ref(payload):
                    self.segments[cid] = payload
                message = wire.encode_message(
                    wire.CHUNK, (self.job_id, cid, len(items), payload))
                self.outstanding[cid] = (self.items_sent, len(items), message)
                self.items_sent += len(items)
                messages.append(message)
                self.session_chunks += 1
                self.credit -= 1
            if len(items) < size or self.input_error is not None:
                self.exhausted = True
                messages.append(wire.encode_message(wire.END, (self.job_id, self.session_chunks)))
        if messages:
            self.link.send(messages)

    def _side(self) -> Any:
        """The shared-memory end when the live connection proved it shares the server's."""
        shared = getattr(self.link, "shared_memory", None)
        return shared() if shared is not None else None

    def _encode(self, items: list) -> Tuple[list, Optional[bytes]]:
        """``(items, payload)`` as :meth:`_pickle`, except that a large chunk on a connection
        that shares the server's memory goes as a segment: ``payload`` is its reference.
        Items that look large (the first one's size times their number) are pickled straight
        into the segment; others are pickled first and written if the pickle is large. When
        shared memory is full the bytes go in the frame."""
        side = self._side()
        if side is not None and items and \
                sys.getsizeof(items[0]) * len(items) >= side.threshold:
            ref = self._fitting(side, side.dump(items))
            if ref is not None:
                return items, ref
        items, payload = self._pickle(items)
        if side is not None and payload is not None and len(payload) >= side.threshold:
            ref = self._fitting(side, side.write(payload))
            if ref is not None:
                return items, ref
        return items, payload

    def _fitting(self, side: Any, ref: Optional[bytes]) -> Optional[bytes]:
        """``ref`` unless its payload would be over the frame limit inline (the limit holds
        whichever way a payload travels: the bytes then raise FrameTooLarge as always)."""
        limit = getattr(self.link, "frame_limit", None)
        if ref is not None and limit is not None and not shm.fits(ref, limit()):
            side.discard(ref)
            return None
        return ref

    def _unlink(self, cid: int) -> None:
        """Chunk ``cid`` is answered or abandoned: unlink its segment, if it has one."""
        ref = self.segments.pop(cid, None)
        if ref is not None and self._shm is not None:
            self._shm.discard(ref)

    # --- results ----------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        match event:
            case Want(n=n, processes=processes, capacity=capacity):
                self.credit += n
                self.sizer.processes = processes
                if hasattr(self.link, "processes_seen"):
                    self.link.processes_seen = processes
                self.window = max(MIN_WINDOW, 2 * capacity + INITIAL_CREDIT)
            case ChunkResult():
                self._result(event)
            case Output(chunk_id=chunk_id):
                spec = self.outstanding.get(chunk_id)
                if spec is not None:
                    self.output.show(event, _label(chunk_id, spec[0]))
            case OutputTail():
                self.output.keep_tail(event)
            case JobProgress(done=done, failed=failed, retried=retried) if self.progress:
                self._retried = self._base[1] + retried
                self.progress.update(self._base[0] + done, max(failed, self.chunks_failed),
                                     retried=self._retried)
            case JobFailed(message=message):
                raise JobCancelled(f"job {self.job_id[:8]} failed on the server: {message}")
            case Cancelled(reason=reason):
                raise JobCancelled(reason)
            case ConnectionLostEvent(reason=reason, conn_id=conn_id) if conn_id == self._conn:
                self._resume(reason)

    def _result(self, event: ChunkResult) -> None:
        spec = self.outstanding.pop(event.chunk_id, None)
        payload: Any = event.payload
        shared = event.status == wire.OK and self._shm is not None and shm.is_ref(payload)
        if spec is None:
            if shared:
                self._shm.drop(self.job_id, payload)
            return
        self._unlink(event.chunk_id)
        first, n, _ = spec
        if shared:
            try:
                payload = self._shm.take(self.job_id, payload)
            except shm.ShmError as refused:
                if self.finished:  # cancelled from another thread, which unlinked it
                    return
                # Refused before anything in it was unpickled: the chunk fails with why.
                self.chunks_failed += 1
                self._failed(event.chunk_id, refused, None, [], first)
                return
        if event.status == wire.OK:
            self.output.forget(event.chunk_id)
            values = loads_data(payload)
            self.items_done += n
            self.sizer.observe(n, event.elapsed)
            if self.ordered:
                self.buffered[event.chunk_id] = values
            else:
                self.ready.append((first, values))
            return
        self.chunks_failed += 1
        exc, index, partial = failure_exception(event.status, event.payload, self.function,
                                                event.node, first, n)
        if event.status == wire.ITEM_ERROR and index is not None and hasattr(exc, "add_note"):
            exc.add_note(f"raised by {self.function} on item {first + index} "
                         f"(node {event.node}, job {self.job_id[:8]})")
        self._failed(event.chunk_id, exc, index, partial, first)

    def _failed(self, chunk_id: int, exc: BaseException, index: Optional[int], partial: list,
                first: int) -> None:
        """Chunk ``chunk_id`` (input from ``first``) failed with ``exc``: keep the error that
        comes first in the caller's order."""
        self.output.attach(exc, chunk_id, _label(chunk_id, first))
        if self.error is None or (self.ordered and chunk_id < self.error[0]):
            self.error = (chunk_id, exc, partial)
            self.error_first = first
            self.error_index = None if index is None else first + index

    def _resume(self, reason: str) -> None:
        """Reconnect (the server restarted or the link dropped) and resubmit every chunk not
        yet answered; raises ConnectionLost if the server stays away past the deadline."""
        try:
            self._conn = self.link.reconnect(self.job_id, self._sink)
        except ConnectionLost as exc:
            raise ConnectionLost(
                f"lost the connection to the server ({reason}) with {self.items_done} of "
                f"{self.items_sent} items done; {exc}", done=self.items_done) from None
        # The server's new copy of the job counts from zero: what was done before is the base.
        self._base = (self.items_done, self._retried)
        if self.segments and self._side() is None:
            # not (yet) proven to share this server's memory: the chunks go as bytes again
            for cid in sorted(self.segments):
                first, n, _ = self.outstanding[cid]
                try:
                    payload = self._shm.read(self.segments[cid])
                except shm.ShmError as lost:  # removed or altered meanwhile: that chunk fails
                    del self.outstanding[cid]
                    self.chunks_failed += 1
                    self._failed(cid, lost, None, [], first)
                    payload = None
                self._unlink(cid)
                if payload is not None:
                    self.outstanding[cid] = (first, n, wire.encode_message(
                        wire.CHUNK, (self.job_id, cid, n, payload)))
        messages = self._opening + [self.outstanding[cid][2] for cid in sorted(self.outstanding)]
        self.session_chunks = len(self.outstanding)
        self.credit = max(0, INITIAL_CREDIT - self.session_chunks)
        if self.exhausted:
            messages.append(wire.encode_message(wire.END, (self.job_id, self.session_chunks)))
        self.link.send(messages)

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
                        yield self.ready.popleft()[1]
                if self.error is not None and (not self.ordered or self.next_chunk == self.error[0]):
                    _, exc, partial = self.error
                    if partial:
                        yield partial
                    raise exc
                if self._answered():
                    self.finished = True
                    if self.input_error is not None:
                        raise self.input_error
                    return
                self._fill()
                if not self._answered():  # _fill may have just found the input's end
                    self._handle(self.events.get())
        finally:
            self.close()

    def _answered(self) -> bool:
        return self.exhausted and not self.outstanding and not self.buffered and not self.ready

    # --- for event-driven readers (JobHandle), which call these from one thread at a time --
    def apply(self, event: Event) -> None:
        """Take one event from the connection (what :meth:`chunks` does with each)."""
        self._handle(event)

    def top_up(self) -> None:
        """Send more input while credit and the window allow."""
        self._fill()

    def answered(self) -> bool:
        """Whether the input has ended and every result has been taken."""
        return self._answered()

    def close(self, reason: str = "cancelled by the caller") -> None:
        """Cancel the job on the server if it has not finished; stop listening for it."""
        if not self.finished:
            self.finished = True
            self.link.send([wire.encode_message(wire.CANCEL, (self.job_id, reason))])
        self.link.unregister(self.job_id)
        costs, self._costs = self._costs, None  # once, however often close() runs
        if costs is not None:
            costs.put(self._cost_key, *self.sizer.timed)
        for cid in list(self.segments):
            self._unlink(cid)
        if self.progress is not None and not self.progress.closed:
            # The final figures are this side's: every result it has, every failure it saw.
            complete = self._answered() and self.error is None and self.input_error is None
            n = self.items_sent if complete else max(self.progress.n, self.items_done)
            self.progress.update(n, max(self.progress.figures["failed"], self.chunks_failed),
                                 retried=self._retried,
                                 total=self.items_sent if complete else None)
            self.progress.close()

    def cancel(self, reason: str) -> None:
        """From any thread: cancel the job on the server (queued chunks are dropped, nodes stop
        its running ones) and make a reader waiting in :meth:`chunks` raise
        ``JobCancelled(reason)`` instead of waiting on."""
        self.close(reason)
        self.events.put(Cancelled(reason))


class ResultIterator:
    """What ``imap`` and ``imap_unordered`` return: results one at a time; ``close()`` cancels."""

    def __init__(self, run: JobRun) -> None:
        self._run = run
        self._items = (value for chunk in run.chunks() for value in chunk)

    def __iter__(self) -> "ResultIterator":
        return self

    def __next__(self) -> Any:
        return next(self._items)

    def chunks(self) -> Iterator[list]:
        """The same results a chunk (a list) at a time, for consumers that pass them on in
        bulk; use either this or the iterator itself, not both."""
        return self._run.chunks()

    def cancel(self, reason: str = "cancelled by the caller") -> None:
        """Stop the job from any thread (also while another thread reads it): the server drops
        its queued chunks and the nodes stop its running ones; the reader's next wait raises
        :class:`~achilles.JobCancelled` with ``reason``."""
        self._run.cancel(reason)

    def close(self) -> None:
        """Stop early: the rest of the job is cancelled."""
        self._items.close()
        self._run.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
