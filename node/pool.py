"""A supervised pool of ``multiprocess`` worker processes.

Each worker process has a supervising thread in the node that feeds it one chunk at a time over
a pipe and hands the outcome to ``on_result``. Because the node owns each process directly:

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

from achilles.core import wire
from achilles.core.errors import describe_exit
from achilles.node.pipeio import recv_buffer
from achilles.node.worker import INLINE_MAX, PROGRESS, RETIRE
from achilles.core.output import TAIL_LINES

log = logging.getLogger("achilles.node")

_STOP = object()

#: ``multiprocess`` lets any ``Process.start()`` poll every child of this process, and a poll
#: consumes the exit status that the forkserver sends once: a supervisor reaping its worker
#: while another starts one could read exit code 255 (CPython gh-130895). Starting and
#: reaping workers hold this lock; waiting for a worker to end does not.
_PROCESS_LOCK = threading.Lock()

#: The progress counter until the worker has received its chunk (``worker.TAKEN`` after).
UNTAKEN = -1
#: A chunk whose worker died before taking it runs on a new worker, up to this many times
#: before it is reported CRASHED (workers that die at start must not loop for ever).
UNTAKEN_RERUNS = 2


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
    #: The last lines of its output when it failed (the worker's count; else what arrived).
    tail: Optional[Deque[list]] = None


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

    def __init__(self, ctx: Any) -> None:
        from achilles.node.worker import worker_main

        self.progress = ctx.RawValue("q", -1)
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_main, args=(child, self.progress), daemon=True)
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
    """

    def __init__(self, processes: int, on_result: ResultHandler,
                 on_output: Optional[OutputHandler] = None,
                 on_progress: Optional[ProgressHandler] = None) -> None:
        self.processes = processes
        self.on_result = on_result
        self.on_output = on_output
        self.on_progress = on_progress
        self._ctx = _context()
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._waiting: Dict[int, Task] = {}  # id(task) -> task, queued and not yet taken
        self._lock = threading.Lock()
        self._closed = False
        self._slots: List[_Slot] = [_Slot(self._ctx) for _ in range(processes)]
        self._threads = [threading.Thread(target=self._supervise, args=(i,), daemon=True,
                                          name=f"achilles-worker-{i}") for i in range(processes)]
        for t in self._threads:
            t.start()

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

    def _supervise(self, index: int) -> None:
        while True:
            task = self._queue.get()
            if task is _STOP:
                return
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
                if report is not None and not task.cancelled:
                    self.on_result(task, *report)
                again = report is None and replace and not task.cancelled
                if again:  # its worker died before taking it: queued again, for cancel_job
                    with self._lock:
                        self._waiting[id(task)] = task
                if replace:
                    self._replace(index, slot)
                if not again:
                    break

    def _outcome(self, index: int, slot: _Slot, task: Task,
                 rerun: bool) -> Tuple[Optional[tuple], bool]:
        """Run ``task`` on ``slot``: its one outcome ``(status, payload, elapsed)``, or None
        when it was killed by us or (with ``rerun``) its worker died before taking it; and
        whether the worker must be replaced."""
        outcome = self._run(slot, task)
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
                slot = _Slot(self._ctx)
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

    def _run(self, slot: _Slot, task: Task) -> Any:
        """Run a task: ``(status, payload, elapsed, retire)``, None if the worker died,
        ``"timeout"``, or ``"retire"`` when the worker retired before running it. Output
        messages that come first go to ``on_output``, progress reports to ``on_progress``."""
        forward = task.forward and self.on_output is not None
        try:
            small = len(task.payload) <= INLINE_MAX
            slot.conn.send_bytes(pickle.dumps(
                (task.func_bytes, task.callback_bytes, task.careful, task.kind, task.group,
                 task.init, task.maxtasks, forward, bytes(task.payload) if small else None),
                protocol=5))
            if not small:
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
