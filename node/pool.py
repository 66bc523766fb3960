"""A supervised pool of ``multiprocess`` worker processes.

Each worker process has a supervising thread in the node that feeds it one chunk at a time over
a pipe and hands the outcome to ``on_result``; chunks of a job whose chunks run in under
:data:`QUICK_CHUNK` go several to a pipe message when enough are queued (a fair share of the
queue each), still each answered and reported on its own. Because the node owns each process directly:

- a worker that dies (``os._exit``, a segfault, the OOM killer) is noticed at once and
  replaced, and its chunk is reported as ``CRASHED`` (with the item it was running, when the
  chunk ran in careful mode) instead of hanging the pool as ``multiprocessing.Pool`` does;
- a running chunk can be stopped (its job was cancelled) by killing its worker.

Every task taken from the queue gets exactly one outcome (unless its job was cancelled or the
pool closed): death is seen through the process's sentinel as well as the pipe, because a
process the task forked may hold the pipe open after the worker died.
"""

from __future__ import annotations

import collections
import logging
import pickle
import queue
import select
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import multiprocess
from multiprocess.connection import wait

from achilles.core import shm, wire
from achilles.core.errors import describe_exit
from achilles.node.pipeio import recv_buffer
from achilles.node.worker import INLINE_MAX, PROGRESS, RETIRE, UNTAKEN
from achilles.core.output import TAIL_LINES

log = logging.getLogger("achilles.node")

_STOP = object()

#: ``multiprocess`` lets any ``Process.start()`` poll every child of this process, and a poll
#: consumes the exit status that the forkserver sends once: a supervisor reaping its worker
#: while another starts one could read exit code 255 (CPython gh-130895). Starting and
#: reaping workers hold this lock; waiting for a worker to end does not.
_PROCESS_LOCK = threading.Lock()

#: A chunk whose worker died before taking it runs on a new worker, up to this many times
#: before it is reported CRASHED (workers that die at start must not loop for ever).
UNTAKEN_RERUNS = 2
#: Chunks of a job whose last chunk ran faster than this (seconds) go to a worker several in
#: one pipe message (each still answered on its own), when enough are queued.
QUICK_CHUNK = 0.001
#: At most this many chunks in one such message.
MAX_BATCH = 16


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
    """One worker process, its pipe, its shared progress counter and its current task."""

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
        self.task: Optional[Task] = None
        self.killed = False
        # One poll set per worker for its life (a fresh selector per wait cost more than the
        # rest of a small chunk's hand-off): the pipe and the process's sentinel.
        self._fd = self.conn.fileno()
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._poll.register(self.proc.sentinel, select.POLLIN)

    def wait_ready(self, timeout: Optional[float]) -> Optional[bool]:
        """Wait for the worker's next message: True when one is readable (or the pipe is at
        its end), False when the worker died first, None after ``timeout`` seconds."""
        ready = self._poll.poll(None if timeout is None else max(0.0, timeout) * 1000)
        if not ready:
            return None
        return any(fd == self._fd for fd, _ in ready)

    def reap(self, timeout: float) -> Optional[int]:
        """Wait up to ``timeout`` s for the process to end; its exit code, or None."""
        wait([self.proc.sentinel], timeout)
        with _PROCESS_LOCK:
            return self.proc.exitcode

    def stop(self, timeout: float) -> Optional[int]:
        """Kill the process (if it still runs) and reap it; its exit code, or None."""
        exitcode = self.reap(0)
        if exitcode is None:
            self.proc.kill()
            exitcode = self.reap(timeout)
        try:
            self.conn.close()
        except OSError:
            pass
        return exitcode


class WorkerPool:
    """``processes`` workers; :meth:`submit` queues a task, ``on_result`` gets every outcome.

    ``on_result(task, status, payload, elapsed)``, ``on_output(task, lines, dropped)`` and
    ``on_progress(task, n)`` (a running task's :func:`~achilles.node.worker.report_progress`)
    are called from supervisor threads: pass functions that hop to the reactor
    (``reactor.callFromThread``). A task's output always comes before its result.
    ``shm``: ``(directory, key, threshold)`` of this node's shared memory
    (:mod:`achilles.core.shm`), given to every worker, or None (off).
    """

    def __init__(self, processes: int, on_result: ResultHandler,
                 on_output: Optional[OutputHandler] = None,
                 on_progress: Optional[ProgressHandler] = None,
                 shm: Optional[Tuple[str, bytes, int]] = None) -> None:
        self.processes = processes
        self.shm = shm
        self.on_result = on_result
        self.on_output = on_output
        self.on_progress = on_progress
        self._ctx = _context()
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._waiting: Dict[int, Task] = {}  # id(task) -> task, queued and not yet taken
        self._lock = threading.Lock()
        self._closed = False
        #: (session, job id) -> seconds its last chunk took, for jobs whose chunks are quick.
        self._quick: Dict[Tuple[int, str], float] = {}
        self.batched = 0  # chunks sent to workers in batches, over the pool's life
        self._slots: List[_Slot] = [_Slot(self._ctx, shm) for _ in range(processes)]
        self._threads = [threading.Thread(target=self._supervise, args=(i,), daemon=True,
                                          name=f"achilles-worker-{i}") for i in range(processes)]
        for t in self._threads:
            t.start()

    def _drop_segment(self, task: Task, report: Optional[tuple]) -> None:
        """Unlink ``task``'s result segment unless ``report`` (None: nothing goes out) is an
        OK result, whose reference goes on to the server: the worker may have written it
        and then died, timed out or been cancelled."""
        if task.shm is None or self.shm is None or (report is not None
                                                    and report[0] == wire.OK):
            return
        shm.discard(self.shm[0], task.shm)

    def submit(self, task: Task) -> None:
        """Queue a task (thread-safe)."""
        with self._lock:
            self._waiting[id(task)] = task
        self._queue.put(task)

    def cancel_job(self, session: int, job_id: str) -> None:
        """Drop this job's queued tasks of this server session and kill the workers running
        them. Tasks submitted later run: the server may send the same job again (the
        controller reconnected and resubmitted it)."""
        with self._lock:
            for task in self._waiting.values():
                if task.session == session and task.job_id == job_id:
                    task.cancelled = True
            for slot in self._slots:
                running = slot.task
                if running is not None and running.session == session and running.job_id == job_id:
                    self._kill(slot)

    def drain(self) -> int:
        """Drop every queued task and stop the running ones (the server connection is gone)."""
        dropped = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            dropped += 1
        with self._lock:
            for task in self._waiting.values():
                task.cancelled = True
            self._waiting.clear()
            for slot in self._slots:
                if slot.task is not None:
                    self._kill(slot)
        return dropped

    @staticmethod
    def _kill(slot: _Slot) -> None:
        """Stop the slot's running task (call with the lock held)."""
        assert slot.task is not None
        slot.task.cancelled = True
        if not slot.killed:
            slot.killed = True
            slot.proc.kill()

    @property
    def busy(self) -> int:
        """Workers running a task now."""
        return sum(1 for s in self._slots if s.task is not None)

    def is_quick(self, session: int, job_id: str) -> bool:
        """Whether the job's last chunk ran in under :data:`QUICK_CHUNK` (so its chunks may
        go to a worker several at a time)."""
        return self._quick.get((session, job_id), QUICK_CHUNK) < QUICK_CHUNK

    def _batchable(self, task: Task) -> bool:
        """Whether ``task`` may share a pipe message with other chunks of its job."""
        return (task.kind == "map" and not task.careful and task.timeout is None
                and not task.init and not task.maxtasks and not task.solo
                and len(task.payload) <= INLINE_MAX and self.is_quick(task.session, task.job_id))

    def _timed(self, task: Task, status: int, payload: bytes, elapsed: float) -> None:
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

    def _gather(self, task: Task) -> Tuple[List[Task], Any]:
        """``task`` and the queued chunks of its job that may go with it (a fair share of
        the queue, at most :data:`MAX_BATCH`); and the next item taken from the queue that
        may not (None if none was taken)."""
        batch = [task]
        if not self._batchable(task):
            return batch, None
        room = min(MAX_BATCH, self._queue.qsize() // self.processes + 1)
        while len(batch) < room:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            if (item.session, item.job_id) != (task.session, task.job_id) \
                    or not self._batchable(item):
                return batch, item
            batch.append(item)
        return batch, None

    def _supervise(self, index: int) -> None:
        carried: Any = None
        while True:
            task, carried = (self._queue.get(), None) if carried is None else (carried, None)
            if task is _STOP:
                return
            batch, carried = self._gather(task)
            if len(batch) > 1:
                if not self._run_batch(index, batch):
                    return
                continue
            for attempt in range(UNTAKEN_RERUNS + 1):
                with self._lock:
                    self._waiting.pop(id(task), None)
                    if task.cancelled:
                        break
                    slot = self._slots[index]
                    slot.task = task
                    slot.progress.value = UNTAKEN
                try:
                    report, replace = self._outcome(index, slot, task, attempt < UNTAKEN_RERUNS)
                except Exception:
                    # A bug here must lose neither the chunk nor this worker's thread.
                    log.exception("worker %d: unexpected error supervising chunk %d of job %s",
                                  index, task.chunk_id, task.job_id[:8])
                    with self._lock:
                        slot.task = None
                    report, replace = (wire.CRASHED, pickle.dumps((None, None)), 0.0), True
                if self._closed:
                    return
                deliver = report is not None and not task.cancelled
                self._drop_segment(task, report if deliver else None)
                if deliver:
                    assert report is not None
                    self._timed(task, *report)
                    self.on_result(task, *report)
                again = report is None and replace and not task.cancelled
                if again:  # its worker died before taking it: queued again, for cancel_job
                    with self._lock:
                        self._waiting[id(task)] = task
                if replace:
                    self._replace(index, slot)
                if not again:
                    break

    def _run_batch(self, index: int, batch: List[Task]) -> bool:
        """Send ``batch`` (chunks of one job) to worker ``index`` in one message and hand on
        each chunk's outcome as its answer comes. If the worker dies, the chunk it was
        running is reported as a single chunk's would be and the chunks after it are queued
        again, each to run alone. False when the pool closed meanwhile."""
        slot = self._slots[index]
        with self._lock:
            slot.progress.value = UNTAKEN
        self.batched += len(batch)
        try:
            slot.conn.send_bytes(pickle.dumps([self._header(t) for t in batch], protocol=5))
        except (EOFError, OSError):
            pass  # a dead worker: the first read below says so
        for position, task in enumerate(batch):
            with self._lock:
                self._waiting.pop(id(task), None)
                slot.task = task
            try:
                report, replace = self._outcome(index, slot, task, True, send=False)
            except Exception:
                log.exception("worker %d: unexpected error supervising chunk %d of job %s",
                              index, task.chunk_id, task.job_id[:8])
                with self._lock:
                    slot.task = None
                report, replace = (wire.CRASHED, pickle.dumps((None, None)), 0.0), True
            if self._closed:
                return False
            deliver = report is not None and not task.cancelled
            self._drop_segment(task, report if deliver else None)
            if deliver:
                assert report is not None
                self._timed(task, *report)
                self.on_result(task, *report)
            if replace:
                again = batch[position + (report is not None):]
                for t in again:
                    t.solo = True
                    if not t.cancelled:
                        self.submit(t)
                self._replace(index, slot)
                return not self._closed
        return True

    def _outcome(self, index: int, slot: _Slot, task: Task,
                 rerun: bool, send: bool = True) -> Tuple[Optional[tuple], bool]:
        """Run ``task`` on ``slot``: its one outcome ``(status, payload, elapsed)``, or None
        when it was killed by us or (with ``rerun``) its worker died before taking it; and
        whether the worker must be replaced. Without ``send`` the task went to the worker
        already (in a batch) and only its answer is read."""
        outcome = self._run(slot, task, send)
        with self._lock:
            slot.task = None
            killed = slot.killed
        if outcome == "timeout":
            slot.stop(5.0)
            log.warning("chunk %d of job %s ran past its %g s timeout; worker %d killed "
                        "and replaced", task.chunk_id, task.job_id[:8], task.timeout, index)
            return (wire.TIMED_OUT, pickle.dumps(task.timeout), task.timeout or 0.0), True
        if killed:
            return None, True
        if outcome == "retire":  # its worker reached maxtasksperchild first: run on a new one
            return None, True
        if outcome is None:  # the worker died
            exitcode = slot.reap(1.0)
            if exitcode is None:  # slow to be reaped, or it closed its pipe and lives on
                exitcode = slot.stop(5.0)
            progress = slot.progress.value
            if progress == UNTAKEN and rerun:  # not this chunk's fault: it never ran
                log.warning("worker %d (pid %s) had died (%s) before taking chunk %d of job %s;"
                            " replaced, the chunk runs on the new one", index, slot.proc.pid,
                            describe_exit(exitcode), task.chunk_id, task.job_id[:8])
                return None, True
            item = progress if task.careful and progress >= 0 else None
            log.warning("worker %d (pid %s) %s running chunk %d of job %s; replaced", index,
                        slot.proc.pid, describe_exit(exitcode), task.chunk_id, task.job_id[:8])
            return (wire.CRASHED, pickle.dumps((exitcode, item)), 0.0), True
        status, payload, elapsed, retire = outcome
        return (status, payload, elapsed), retire

    def _replace(self, index: int, old: _Slot) -> None:
        """Put a fresh worker in place of ``old`` (killed first if it still runs); retried
        until it works, so that a transient failure (no fds, forkserver restarting) does not
        leave the pool short of a worker."""
        old.stop(5.0)
        delay = 0.1
        while not self._closed:
            try:
                slot = _Slot(self._ctx, self.shm)
            except Exception as exc:
                log.error("cannot start a worker process (%s); retrying in %g s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            with self._lock:
                self._slots[index] = slot
            if self._closed:
                slot.stop(1.0)
            return

    def _header(self, task: Task) -> tuple:
        """What the worker is sent for ``task`` (see :mod:`achilles.node.worker`)."""
        forward = task.forward and self.on_output is not None
        small = len(task.payload) <= INLINE_MAX
        return (task.func_bytes, task.callback_bytes, task.careful, task.kind, task.group,
                task.init, task.maxtasks, forward, bytes(task.payload) if small else None,
                task.shm)

    def _run(self, slot: _Slot, task: Task, send: bool = True) -> Any:
        """Run a task: ``(status, payload, elapsed, retire)``, None if the worker died,
        ``"timeout"``, or ``"retire"`` when the worker retired before running it. Output
        messages that come first go to ``on_output``, progress reports to ``on_progress``.
        Without ``send`` the worker has the task already and only its answer is read."""
        try:
            if send:
                slot.conn.send_bytes(pickle.dumps(self._header(task), protocol=5))
                if len(task.payload) > INLINE_MAX:
                    slot.conn.send_bytes(task.payload)
            deadline = None if task.timeout is None else time.monotonic() + task.timeout
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = slot.wait_ready(wait)
                if ready is None:
                    return "timeout"
                if not ready:
                    return None
                header = pickle.loads(slot.conn.recv_bytes())
                if type(header[0]) is not str:
                    break
                if header[0] == PROGRESS:
                    if self.on_progress is not None and not task.cancelled:
                        self.on_progress(task, header[1])
                else:
                    self._output(task, header[0], header[1])
            status, elapsed, retire, payload = header
            if payload is None:
                if not slot.wait_ready(None):
                    return None
                payload = recv_buffer(slot.conn)
        except (EOFError, OSError):
            return None
        if status == RETIRE:
            return "retire"
        return status, payload, elapsed, retire

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

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers and their threads."""
        if self._closed:
            return
        self._closed = True
        self.drain()
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            try:
                slot.conn.close()
            except OSError:
                pass
        for slot in slots:
            if slot.reap(max(0.0, deadline - time.monotonic())) is None:
                slot.stop(1.0)
