"""A supervised pool of ``multiprocess`` worker processes.

Each worker process has a supervising thread in the node that feeds it one chunk at a time over
a pipe and hands the outcome to ``on_result``. Because the node owns each process directly:

- a worker that dies (``os._exit``, a segfault, the OOM killer) is noticed at once and
  replaced, and its chunk is reported as ``CRASHED`` (with the item it was running, when the
  chunk ran in careful mode) instead of hanging the pool as ``multiprocessing.Pool`` does;
- a running chunk can be stopped (its job was cancelled) by killing its worker.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Set, Tuple

import multiprocess

from achilles.core import wire
from achilles.core.errors import describe_exit

log = logging.getLogger("achilles.node")

_STOP = object()


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


ResultHandler = Callable[[Task, int, bytes, float], None]


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
        self.proc.start()
        child.close()
        self.task: Optional[Task] = None
        self.killed = False


class WorkerPool:
    """``processes`` workers; :meth:`submit` queues a task, ``on_result`` gets every outcome.

    ``on_result(task, status, payload, elapsed)`` is called from supervisor threads: pass a
    function that hops to the reactor (``reactor.callFromThread``).
    """

    def __init__(self, processes: int, on_result: ResultHandler) -> None:
        self.processes = processes
        self.on_result = on_result
        self._ctx = _context()
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._cancelled: Set[Tuple[int, str]] = set()  # (session, job id)
        self._lock = threading.Lock()
        self._closed = False
        self._slots: List[_Slot] = [_Slot(self._ctx) for _ in range(processes)]
        self._threads = [threading.Thread(target=self._supervise, args=(i,), daemon=True,
                                          name=f"achilles-worker-{i}") for i in range(processes)]
        for t in self._threads:
            t.start()

    def submit(self, task: Task) -> None:
        """Queue a task (thread-safe)."""
        self._queue.put(task)

    def cancel_job(self, session: int, job_id: str) -> None:
        """Drop this job's queued tasks of this server session and kill the workers running
        them. (After a reconnect the same job may come back in a new session.)"""
        key = (session, job_id)
        with self._lock:
            self._cancelled.add(key)
            if len(self._cancelled) > 10000:
                self._cancelled = set(list(self._cancelled)[-5000:])
            for slot in self._slots:
                task = slot.task
                if task is not None and (task.session, task.job_id) == key and not slot.killed:
                    slot.killed = True
                    slot.proc.kill()

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
            for slot in self._slots:
                if slot.task is not None and not slot.killed:
                    slot.killed = True
                    slot.proc.kill()
        return dropped

    @property
    def busy(self) -> int:
        """Workers running a task now."""
        return sum(1 for s in self._slots if s.task is not None)

    def _supervise(self, index: int) -> None:
        while True:
            task = self._queue.get()
            if task is _STOP:
                return
            with self._lock:
                if (task.session, task.job_id) in self._cancelled:
                    continue
                slot = self._slots[index]
                slot.task = task
                slot.progress.value = -1
            outcome = self._run(slot, task)
            if outcome == "timeout":
                with self._lock:
                    slot.task = None
                    slot.proc.kill()
                    slot.proc.join(5)
                    self._slots[index] = _Slot(self._ctx)
                log.warning("chunk %d of job %s ran past its %g s timeout; worker %d killed "
                            "and replaced", task.chunk_id, task.job_id[:8], task.timeout, index)
                self.on_result(task, wire.TIMED_OUT, pickle.dumps(task.timeout), task.timeout or 0.0)
                continue
            with self._lock:
                slot.task = None
                killed = slot.killed
            if outcome is None or killed:  # dead or killed by us: replace the process
                if self._closed:
                    return
                slot.proc.join(1)
                item = slot.progress.value if task.careful and slot.progress.value >= 0 else None
                exitcode = slot.proc.exitcode
                with self._lock:
                    self._slots[index] = _Slot(self._ctx)
                if not killed:
                    log.warning("worker %d (pid %s) %s running chunk %d of job %s; replaced",
                                index, slot.proc.pid, describe_exit(exitcode), task.chunk_id,
                                task.job_id[:8])
                    self.on_result(task, wire.CRASHED, pickle.dumps((exitcode, item)), 0.0)
                continue
            if (task.session, task.job_id) not in self._cancelled:
                self.on_result(task, *outcome)

    @staticmethod
    def _run(slot: _Slot, task: Task) -> Any:
        """Run a task: ``(status, payload, elapsed)``, None if the worker died, or
        ``"timeout"``."""
        try:
            slot.conn.send_bytes(pickle.dumps(
                (task.func_bytes, task.callback_bytes, task.careful, task.kind), protocol=5))
            slot.conn.send_bytes(task.payload)
            if task.timeout is not None and not slot.conn.poll(task.timeout):
                return "timeout"
            status, elapsed = pickle.loads(slot.conn.recv_bytes())
            payload = slot.conn.recv_bytes()
        except (EOFError, OSError):
            return None
        return status, payload, elapsed

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers and their threads."""
        if self._closed:
            return
        self._closed = True
        self.drain()
        for _ in self._threads:
            self._queue.put(_STOP)
        for slot in self._slots:
            try:
                slot.conn.close()
            except Exception:
                pass
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            slot.proc.join(max(0.0, deadline - time.monotonic()))
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join(1)
