"""A pool of ``multiprocess`` worker processes, driven by the node's reactor.

The reactor writes each chunk straight to an idle worker's pipe and reads the answer when the
pipe becomes readable: no thread stands between the server connection and the workers, so a
chunk costs no thread hand-off (and no contention for the interpreter lock) on either way.
Chunks of a job whose chunks run in under :data:`QUICK_CHUNK` go several to a pipe message
when enough are queued (a fair share of the queue each), still each answered and reported on
its own. Because the node owns each process directly:

- a worker that dies (``os._exit``, a segfault, the OOM killer) is noticed at once through its
  process sentinel and replaced, and its chunk is reported as ``CRASHED`` (with the item it was
  running, when the chunk ran in careful mode) instead of hanging the pool as
  ``multiprocessing.Pool`` does;
- a running chunk can be stopped (its job was cancelled) by killing its worker.

Every task submitted gets exactly one outcome (unless its job was cancelled or the pool
closed): death is seen through the process's sentinel as well as the pipe, because a process
the task forked may hold the pipe open after the worker died; whatever the worker wrote before
it died is read first. Every method, and every callback, runs in the reactor thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import multiprocess
from multiprocess.connection import wait

from achilles.core import shm, wire
from achilles.core.errors import describe_exit
from achilles.core.output import TAIL_LINES
from achilles.core.reactor import DelayedCall, Reactor, get_reactor
from achilles.node.pipeio import FrameReader, frame
from achilles.node.worker import INLINE_MAX, PROGRESS, RETIRE, UNTAKEN

log = logging.getLogger("achilles.node")

#: ``multiprocess`` lets any ``Process.start()`` poll every child of this process, and a poll
#: consumes the exit status that the forkserver sends once: reading a worker's exit code
#: while another thread (the stage host's) starts a process could give 255 (CPython
#: gh-130895). Starting processes and reading their exit codes hold this lock.
_PROCESS_LOCK = threading.Lock()

#: A chunk whose worker died before taking it runs on a new worker, up to this many times
#: before it is reported CRASHED (workers that die at start must not loop for ever).
UNTAKEN_RERUNS = 2
#: Chunks of a job whose last chunk ran faster than this (seconds) go to a worker several in
#: one pipe message (each still answered on its own), when enough are queued.
QUICK_CHUNK = 0.001
#: At most this many chunks in one such message.
MAX_BATCH = 16
#: Seconds a worker that closed its pipe may take to exit before it is killed.
EXIT_GRACE = 1.0
#: Seconds before a worker that died while idle is replaced (unless a chunk waits first).
IDLE_REPLACE_DELAY = 0.5
#: Longest wait (seconds) between attempts to start a worker that failed to start.
MAX_START_DELAY = 5.0


@dataclass
class Task:
    """One chunk for a worker."""

    session: int
    job_id: str
    chunk_id: int
    func_bytes: bytes
    callback_bytes: bytes
    payload: bytes
    careful: bool = False
    timeout: Optional[float] = None
    kind: str = "map"
    group: str = ""  # per-group state key in the worker (initializer, maxtasks)
    init: bytes = b""  # dill of (initializer, initargs), or empty
    maxtasks: int = 0  # replace a worker after this many of the group's items (0: never)
    forward: bool = False  # capture the task's output and hand it to ``on_output``
    cancelled: bool = False  # set by cancel_job/drain: skip it, or drop its outcome
    solo: bool = False  # never in a batch (it was in one whose worker died)
    untaken: int = 0  # times a worker died before taking it
    #: The last lines of its output when it failed (the worker's count; else what arrived).
    tail: Optional[Deque[list]] = None
    #: The name of its result segment when this node shares the server's shared memory
    #: (:mod:`achilles.core.shm`, the pool's ``shm`` settings): the worker then reads a
    #: reference payload, and writes a large result to that segment and answers with its
    #: reference.
    shm: Optional[str] = None


ResultHandler = Callable[[Task, int, bytes, float], None]
#: ``on_output(task, lines, dropped)``: lines a running task wrote, and how many more it
#: wrote that the rate limit dropped (see :mod:`achilles.node.capture`).
OutputHandler = Callable[[Task, List[list], int], None]
#: ``on_progress(task, n)``: the running task reported ``n`` more items done.
ProgressHandler = Callable[[Task, float], None]


def _context() -> Any:
    try:
        ctx = multiprocess.get_context("forkserver")
        ctx.set_forkserver_preload(["achilles.node.worker"])
        return ctx
    except ValueError:
        return multiprocess.get_context()


class _Slot:
    """One worker process, its pipe, its shared progress counter and the chunks it holds."""

    def __init__(self, ctx: Any, shm_settings: Optional[Tuple[str, bytes, int]] = None) -> None:
        from achilles.node.worker import worker_main

        self.progress = ctx.RawValue("q", -1)
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_main, args=(child, self.progress, shm_settings),
                                daemon=True)
        try:
            with _PROCESS_LOCK:
                self.proc.start()
        finally:
            child.close()
        self.fd = self.conn.fileno()
        os.set_blocking(self.fd, False)  # this end only: the worker's end is its own socket
        self.frames = FrameReader()
        #: Chunks sent and not yet answered, in the order the worker runs them.
        self.batch: Deque[Task] = collections.deque()
        #: ``(status, elapsed, retire)`` of an answer whose payload is the next message.
        self.pending: Optional[Tuple[int, float, bool]] = None
        self.out: Deque[memoryview] = collections.deque()  # unwritten bytes to the worker
        self.timer: Optional[DelayedCall] = None  # the running chunk's timeout
        self.grace: Optional[DelayedCall] = None  # kill after its pipe closed
        self.killed = False  # by us: its chunks' outcomes are dropped or run again
        self.retired = False  # replaced: whatever it still says is ignored
        self.exited = False  # its sentinel fired and it was reaped
        self.pipe = _PipeEnd(self)
        self.sentinel = _Sentinel(self)

    @property
    def task(self) -> Optional[Task]:
        """The chunk it is running (the first unanswered one), or None when idle."""
        return self.batch[0] if self.batch else None

    def kill(self) -> None:
        """SIGKILL the process unless it is known to have exited."""
        if not self.exited:
            try:
                self.proc.kill()
            except (OSError, ValueError):
                pass

    def exitcode(self) -> Optional[int]:
        """The exit code, once the process has ended (without waiting)."""
        with _PROCESS_LOCK:
            return self.proc.exitcode

    def reap(self, timeout: float) -> Optional[int]:
        """Wait up to ``timeout`` s for the process to end; its exit code, or None."""
        wait([self.proc.sentinel], timeout)
        return self.exitcode()


class _PipeEnd:
    """The node's end of a worker's pipe, as the reactor reads and writes it."""

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot
        self.pool: Optional["WorkerPool"] = None

    def fileno(self) -> int:
        return self.slot.fd

    def doRead(self) -> None:
        if self.pool is not None:
            self.pool._readable(self.slot)

    def doWrite(self) -> None:
        if self.pool is not None:
            self.pool._writable(self.slot)

    def connectionLost(self, reason: Any) -> None:
        if self.pool is not None:
            self.pool._pipe_closed(self.slot)

    def logPrefix(self) -> str:
        return "worker-pipe"


class _Sentinel:
    """A worker's process sentinel: readable once the process has ended."""

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot
        self.pool: Optional["WorkerPool"] = None

    def fileno(self) -> int:
        return self.slot.proc.sentinel

    def doRead(self) -> None:
        if self.pool is not None:
            self.pool._exited(self.slot)

    def connectionLost(self, reason: Any) -> None:
        # The reactor drops every reader when it shuts down; only an ended process counts.
        if wait([self.slot.proc.sentinel], 0):
            self.doRead()

    def logPrefix(self) -> str:
        return "worker-sentinel"


class WorkerPool:
    """``processes`` workers; :meth:`submit` queues a task, ``on_result`` gets every outcome.

    ``on_result(task, status, payload, elapsed)``, ``on_output(task, lines, dropped)`` and
    ``on_progress(task, n)`` (a running task's :func:`~achilles.node.worker.report_progress`)
    are called in the reactor thread, where every method must be called too. A task's output
    always comes before its result. ``shm``: ``(directory, key, threshold)`` of this node's
    shared memory (:mod:`achilles.core.shm`), given to every worker, or None (off).
    ``reactor``: the one it runs in (default: the global reactor).
    """

    def __init__(self, processes: int, on_result: ResultHandler,
                 on_output: Optional[OutputHandler] = None,
                 on_progress: Optional[ProgressHandler] = None,
                 shm: Optional[Tuple[str, bytes, int]] = None,
                 reactor: Optional[Reactor] = None) -> None:
        self.processes = processes
        self.shm = shm
        self.on_result = on_result
        self.on_output = on_output
        self.on_progress = on_progress
        self.reactor: Reactor = reactor if reactor is not None else get_reactor()
        self._ctx = _context()
        self._queue: Deque[Task] = collections.deque()
        self._closed = False
        self._pumping = False
        #: (session, job id) -> seconds its last chunk took, for jobs whose chunks are quick.
        self._quick: Dict[Tuple[int, str], float] = {}
        self.batched = 0  # chunks sent to workers in batches, over the pool's life
        self._slots: List[Optional[_Slot]] = [None] * processes
        self._retiring: List[_Slot] = []  # replaced, waiting for their sentinel
        self._vacant: Set[int] = set()  # slots whose idle worker died, successor not started
        for index in range(processes):
            self._install(index, _Slot(self._ctx, shm))

    # --- the public side ----------------------------------------------------------------
    def submit(self, task: Task) -> None:
        """Queue a task; it goes to the next idle worker."""
        if self._closed:
            return
        self._queue.append(task)
        self._pump()

    def cancel_job(self, session: int, job_id: str) -> None:
        """Drop this job's queued tasks of this server session and kill the workers running
        them. Tasks submitted later run: the server may send the same job again (the
        controller reconnected and resubmitted it)."""
        for task in self._queue:
            if task.session == session and task.job_id == job_id:
                task.cancelled = True
        for slot in list(self._slots):
            if slot is not None and any(t.session == session and t.job_id == job_id
                                        for t in slot.batch):
                self._kill(slot)

    def drain(self) -> int:
        """Drop every queued task and stop the running ones (the server connection is gone);
        how many queued tasks were dropped."""
        dropped = 0
        while self._queue:
            task = self._queue.popleft()
            if not task.cancelled:
                task.cancelled = True
                dropped += 1
        for slot in list(self._slots):
            if slot is not None and slot.batch:
                self._kill(slot)
        return dropped

    @property
    def busy(self) -> int:
        """Workers running a task now."""
        return sum(1 for s in self._slots if s is not None and s.batch)

    def is_quick(self, session: int, job_id: str) -> bool:
        """Whether the job's last chunk ran in under :data:`QUICK_CHUNK` (so its chunks may
        go to a worker several at a time)."""
        return self._quick.get((session, job_id), QUICK_CHUNK) < QUICK_CHUNK

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers (waiting up to ``timeout`` s for them to end)."""
        if self._closed:
            return
        self._closed = True
        self.drain()
        slots = [s for s in self._slots if s is not None] + self._retiring
        for slot in slots:
            self._detach(slot, sentinel=True)
            slot.kill()
        deadline = time.monotonic() + timeout
        for slot in slots:
            if not slot.exited:
                slot.reap(max(0.0, deadline - time.monotonic()))
            try:
                slot.conn.close()
            except OSError:
                pass

    # --- dispatch -----------------------------------------------------------------------
    def _batchable(self, task: Task) -> bool:
        """Whether ``task`` may share a pipe message with other chunks of its job."""
        return (task.kind == "map" and not task.careful and task.timeout is None
                and not task.init and not task.maxtasks and not task.solo
                and len(task.payload) <= INLINE_MAX and self.is_quick(task.session, task.job_id))

    def _pump(self) -> None:
        """Give queued tasks to idle workers."""
        if self._pumping:
            return  # called back from inside a running pump, which goes on
        self._pumping = True
        try:
            sent = True
            while sent and self._queue:
                sent = False
                for index in sorted(self._vacant):  # work is waiting: no need to wait more
                    self._start(index, 0.1)
                for slot in self._slots:
                    if slot is None or slot.batch or slot.killed or slot.retired \
                            or slot.exited:
                        continue
                    task = self._next()
                    if task is None:
                        return
                    self._send(slot, self._gather(task))
                    sent = True
        finally:
            self._pumping = False

    def _gather(self, task: Task) -> List[Task]:
        """``task`` and the queued chunks of its job that may go with it in one message (a
        fair share of the queue, at most :data:`MAX_BATCH`)."""
        batch = [task]
        if not self._batchable(task):
            return batch
        room = min(MAX_BATCH, len(self._queue) // self.processes + 1)
        while len(batch) < room and self._queue:
            nxt = self._queue[0]
            if nxt.cancelled:
                self._queue.popleft()
                continue
            if (nxt.session, nxt.job_id) != (task.session, task.job_id) \
                    or not self._batchable(nxt):
                break
            batch.append(self._queue.popleft())
        return batch

    def _next(self) -> Optional[Task]:
        while self._queue:
            task = self._queue.popleft()
            if not task.cancelled:
                return task
        return None

    def _header(self, task: Task) -> tuple:
        """What the worker is sent for ``task`` (see :mod:`achilles.node.worker`)."""
        forward = task.forward and self.on_output is not None
        small = len(task.payload) <= INLINE_MAX
        return (task.func_bytes, task.callback_bytes, task.careful, task.kind, task.group,
                task.init, task.maxtasks, forward, bytes(task.payload) if small else None,
                task.shm)

    def _send(self, slot: _Slot, batch: List[Task]) -> None:
        slot.progress.value = UNTAKEN
        slot.batch.extend(batch)
        if len(batch) > 1:
            self.batched += len(batch)
            self._write(slot, pickle.dumps([self._header(t) for t in batch], protocol=5))
            return
        task = batch[0]
        self._write(slot, pickle.dumps(self._header(task), protocol=5))
        if len(task.payload) > INLINE_MAX:
            self._write(slot, task.payload)
        if task.timeout is not None:
            slot.timer = self.reactor.callLater(task.timeout, self._timed_out, slot, task)

    def _write(self, slot: _Slot, data: "bytes | bytearray | memoryview") -> None:
        waiting = bool(slot.out)  # earlier bytes wait for the pipe: these go after them
        slot.out.extend(memoryview(p).cast("B") for p in frame(data))
        if not waiting and self._flush(slot):
            self.reactor.addWriter(slot.pipe)

    def _writable(self, slot: _Slot) -> None:
        if not self._flush(slot):
            self.reactor.removeWriter(slot.pipe)

    def _flush(self, slot: _Slot) -> bool:
        """Write what the worker's pipe takes now; whether bytes are left for later. A worker
        that is gone takes nothing (its sentinel says what became of its chunks)."""
        while slot.out:
            try:
                written = os.writev(slot.fd, list(itertools.islice(slot.out, 64)))
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                slot.out.clear()
                return False
            while written:
                piece = slot.out[0]
                if written >= len(piece):
                    written -= len(piece)
                    slot.out.popleft()
                else:
                    slot.out[0] = piece[written:]
                    written = 0
        return False

    # --- answers --------------------------------------------------------------------------
    def _readable(self, slot: _Slot, drain: bool = False) -> None:
        try:
            messages, eof = slot.frames.read(slot.fd, drain)
        except OSError:
            messages, eof = [], True
        for message in messages:
            if slot.retired or slot.killed:
                break
            try:
                self._message(slot, message)
            except Exception:
                log.exception("unexpected error handling a message of a worker (pid %s)",
                              slot.proc.pid)
                self._fail(slot)
                break
        if eof:
            self._pipe_closed(slot)

    def _message(self, slot: _Slot, data: bytearray) -> None:
        task = slot.task
        if task is None:
            log.warning("a worker (pid %s) sent a message with no chunk to answer; ignored",
                        slot.proc.pid)
            return
        if slot.pending is not None:
            (status, elapsed, retire), slot.pending = slot.pending, None
            self._answer(slot, status, data, elapsed, retire)
            return
        header = pickle.loads(data)
        if type(header[0]) is str:
            if header[0] == PROGRESS:
                if self.on_progress is not None and not task.cancelled:
                    self.on_progress(task, header[1])
            else:
                self._output(task, header[0], header[1])
            return
        status, elapsed, retire, payload = header
        if payload is None:
            slot.pending = (status, elapsed, retire)
            return
        self._answer(slot, status, payload, elapsed, retire)

    def _answer(self, slot: _Slot, status: int, payload: Any, elapsed: float,
                retire: bool) -> None:
        task = slot.batch.popleft()
        self._cancel_timer(slot)
        if status == RETIRE:  # its worker reached maxtasksperchild first: run on a new one
            if not task.cancelled:
                self._queue.appendleft(task)
            self._replace(slot)
            self._pump()
            return
        if retire:
            self._replace(slot)
        self._report(task, (status, payload, elapsed))
        self._pump()

    def _output(self, task: Task, kind: str, data: Any) -> None:
        """An output message of ``task``'s worker: lines to hand on, or its failure's tail."""
        if kind == "tail":
            task.tail = collections.deque(data, maxlen=TAIL_LINES)
            return
        lines, dropped = data
        if task.tail is None:
            task.tail = collections.deque(maxlen=TAIL_LINES)
        task.tail.extend(lines)
        if self.on_output is not None and not task.cancelled:
            self.on_output(task, lines, dropped)

    def _report(self, task: Task, report: Tuple[int, Any, float]) -> None:
        """Hand on ``task``'s one outcome (unless its job was cancelled)."""
        deliver = not task.cancelled and not self._closed
        self._drop_segment(task, report if deliver else None)
        if not deliver:
            return
        self._timed(task, *report)
        try:
            self.on_result(task, *report)
        except Exception:
            log.exception("handing on the outcome of chunk %d of job %s failed",
                          task.chunk_id, task.job_id[:8])

    def _drop_segment(self, task: Task, report: Optional[tuple]) -> None:
        """Unlink ``task``'s result segment unless ``report`` (None: nothing goes out) is an
        OK result, whose reference goes on to the server: the worker may have written it
        and then died, timed out or been cancelled."""
        if task.shm is None or self.shm is None or (report is not None
                                                    and report[0] == wire.OK):
            return
        shm.discard(self.shm[0], task.shm)

    def _timed(self, task: Task, status: int, payload: Any, elapsed: float) -> None:
        """``task`` ran for ``elapsed`` s: whether its job's chunks may go in batches now."""
        key = (task.session, task.job_id)
        if status not in (wire.OK, wire.ITEM_ERROR):
            return
        if elapsed < QUICK_CHUNK:
            if key not in self._quick and len(self._quick) >= 1024:
                self._quick.clear()
            self._quick[key] = elapsed
        else:
            self._quick.pop(key, None)

    # --- timeouts, deaths and replacements --------------------------------------------------
    def _cancel_timer(self, slot: _Slot) -> None:
        if slot.timer is not None:
            if slot.timer.active():
                slot.timer.cancel()
            slot.timer = None

    def _timed_out(self, slot: _Slot, task: Task) -> None:
        slot.timer = None
        if slot.retired or slot.killed or slot.task is not task:
            return
        self._readable(slot, drain=True)  # an answer that came with the deadline counts
        if slot.retired or slot.killed or slot.task is not task:
            return
        index = self._slots.index(slot)
        log.warning("chunk %d of job %s ran past its %g s timeout; worker %d killed and "
                    "replaced", task.chunk_id, task.job_id[:8], task.timeout, index)
        slot.batch.clear()
        self._replace(slot)
        self._report(task, (wire.TIMED_OUT, pickle.dumps(task.timeout), task.timeout or 0.0))
        self._pump()

    def _kill(self, slot: _Slot) -> None:
        """Stop the chunks the slot holds (all of one job, which was cancelled, or the pool
        drained): they get no outcome; the worker is killed and replaced."""
        for task in self._release(slot):
            task.cancelled = True
        slot.killed = True
        self._replace(slot)
        self._pump()

    def _fail(self, slot: _Slot) -> None:
        """A bug in handling the slot's messages: its chunk is reported CRASHED (no chunk may
        be lost), the rest of its batch runs again, and the worker is replaced."""
        held = self._release(slot)
        self._replace(slot)
        if held:
            self._report(held[0], (wire.CRASHED, pickle.dumps((None, None)), 0.0))
            self._again(held[1:])
        self._pump()

    def _release(self, slot: _Slot) -> List[Task]:
        """Take back the chunks ``slot`` holds (its timer cancelled, a half-read answer
        dropped), in the order it would have run them."""
        self._cancel_timer(slot)
        held = list(slot.batch)
        slot.batch.clear()
        slot.pending = None
        return held

    def _again(self, tasks: List[Task]) -> None:
        """Queue ``tasks`` (the rest of a batch whose worker is gone) to run again, each alone,
        unless cancelled."""
        for task in tasks:
            task.solo = True
        self._queue.extend(t for t in tasks if not t.cancelled)

    def _pipe_closed(self, slot: _Slot) -> None:
        """End of file on the worker's pipe: it is exiting (or closed the pipe and lives on:
        then it is killed after :data:`EXIT_GRACE`). The sentinel decides."""
        self._detach(slot)
        if not slot.exited and slot.grace is None:
            slot.grace = self.reactor.callLater(EXIT_GRACE, slot.kill)

    def _exited(self, slot: _Slot) -> None:
        """The worker's process has ended: read what it wrote first, then account for the
        chunks it held and put a new worker in its place."""
        if slot.exited:
            return
        slot.exited = True  # no new chunk goes to it while what it wrote is read
        if not (slot.retired or slot.killed):
            self._readable(slot, drain=True)
        self._detach(slot, sentinel=True)
        if slot.grace is not None and slot.grace.active():
            slot.grace.cancel()
        exitcode = slot.exitcode()
        if exitcode is None:  # the sentinel fired but no status yet: rare, short
            exitcode = slot.reap(1.0)
        try:
            slot.conn.close()
        except OSError:
            pass
        if slot in self._retiring:
            self._retiring.remove(slot)
        if slot.retired or slot.killed or self._closed:
            return
        index = self._slots.index(slot)
        held = self._release(slot)
        if not held:  # it died idle (killed from outside, or the whole node is stopping)
            self._vacate(slot)
            return
        self._replace(slot)
        task, rest = held[0], held[1:]
        progress = slot.progress.value
        if progress == UNTAKEN and (rest or task.untaken < UNTAKEN_RERUNS):
            # not this chunk's fault: it never ran
            log.warning("worker %d (pid %s) had died (%s) before taking chunk %d of job %s; "
                        "replaced, the chunk runs on the new one", index, slot.proc.pid,
                        describe_exit(exitcode), task.chunk_id, task.job_id[:8])
            task.untaken += 1
            task.solo = task.solo or bool(rest)
            if not task.cancelled:
                self._queue.appendleft(task)
        else:
            item = progress if task.careful and progress >= 0 else None
            log.warning("worker %d (pid %s) %s running chunk %d of job %s; replaced", index,
                        slot.proc.pid, describe_exit(exitcode), task.chunk_id, task.job_id[:8])
            self._report(task, (wire.CRASHED, pickle.dumps((exitcode, item)), 0.0))
        self._again(rest)
        self._pump()

    def _detach(self, slot: _Slot, sentinel: bool = False) -> None:
        """Stop watching the slot's pipe, dropping what was not written to it; with
        ``sentinel`` its sentinel too (else watched until it fires)."""
        self.reactor.removeReader(slot.pipe)
        self.reactor.removeWriter(slot.pipe)
        if sentinel:
            self.reactor.removeReader(slot.sentinel)
        slot.out.clear()

    def _install(self, index: int, slot: _Slot) -> None:
        slot.pipe.pool = self
        slot.sentinel.pool = self
        self._slots[index] = slot
        self.reactor.addReader(slot.pipe)
        self.reactor.addReader(slot.sentinel)

    def _replace(self, slot: _Slot) -> None:
        """Retire ``slot`` (killed unless it has exited) and start a new worker in its
        place; a start that fails is retried with a growing delay, so that a transient failure
        (no fds, forkserver restarting) does not leave the pool short of a worker."""
        index = self._slots.index(slot)
        slot.retired = True
        self._slots[index] = None
        if not slot.exited:
            self._retiring.append(slot)
            self._detach(slot)
            slot.kill()  # its sentinel fires: _exited reaps it
        self._start(index, 0.1)

    def _vacate(self, slot: _Slot) -> None:
        """``slot``'s worker died while idle: start its successor after
        :data:`IDLE_REPLACE_DELAY`, or as soon as a chunk waits. A node whose process group
        is being stopped sees its idle workers die just before it stops itself, and must not
        start new ones meanwhile."""
        index = self._slots.index(slot)
        slot.retired = True
        self._slots[index] = None
        self._vacant.add(index)
        self.reactor.callLater(IDLE_REPLACE_DELAY, self._start, index, 0.1)

    def _start(self, index: int, delay: float) -> None:
        self._vacant.discard(index)
        if self._closed or self._slots[index] is not None:
            return
        try:
            slot = _Slot(self._ctx, self.shm)
        except Exception as exc:
            log.error("cannot start a worker process (%s); retrying in %g s", exc, delay)
            self.reactor.callLater(delay, self._start, index, min(delay * 2, MAX_START_DELAY))
            return
        self._install(index, slot)
        self._pump()
