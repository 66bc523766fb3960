"""A supervised pool of ``multiprocess`` worker processes.

Each worker process has a supervising thread in the node that feeds it one chunk at a time over
a pipe and hands the result to the reactor. Because the node owns each process directly, a worker
that dies (``os._exit``, a segfault, the OOM killer) is noticed at once and replaced, and the
chunk is reported as crashed instead of hanging the pool (the failure mode of
``multiprocessing.Pool``).
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Set

import multiprocess

from achilles import wire

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


ResultHandler = Callable[[Task, int, bytes, float], None]


def _context() -> Any:
    try:
        ctx = multiprocess.get_context("forkserver")
        ctx.set_forkserver_preload(["achilles.node.worker"])
        return ctx
    except ValueError:
        return multiprocess.get_context()


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
        self._cancelled: Set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._threads: List[threading.Thread] = []
        self._procs: List[Any] = [None] * processes
        for slot in range(processes):
            t = threading.Thread(target=self._supervise, args=(slot,), name=f"achilles-worker-{slot}",
                                 daemon=True)
            self._threads.append(t)
        for slot in range(processes):
            self._procs[slot] = self._spawn()
        for t in self._threads:
            t.start()

    def _spawn(self) -> Any:
        from achilles.node.worker import worker_main

        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=worker_main, args=(child,), daemon=True)
        proc.start()
        child.close()
        proc.conn = parent
        return proc

    def submit(self, task: Task) -> None:
        """Queue a task (thread-safe)."""
        self._queue.put(task)

    def cancel_job(self, job_id: str) -> None:
        """Skip this job's queued tasks; a running one finishes and its result is dropped."""
        with self._lock:
            self._cancelled.add(job_id)
            if len(self._cancelled) > 10000:
                self._cancelled = set(list(self._cancelled)[-5000:])

    def drain(self) -> int:
        """Drop every queued task (the server connection is gone); returns how many."""
        dropped = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            if item is _STOP:
                self._queue.put(_STOP)
                return dropped
            dropped += 1

    @property
    def queued(self) -> int:
        """Tasks waiting for a worker."""
        return self._queue.qsize()

    def _supervise(self, slot: int) -> None:
        while True:
            task = self._queue.get()
            if task is _STOP:
                return
            if task.job_id in self._cancelled:
                continue
            proc = self._procs[slot]
            try:
                proc.conn.send_bytes(pickle.dumps(
                    (task.func_bytes, task.callback_bytes, task.payload), protocol=5))
                status, elapsed = pickle.loads(proc.conn.recv_bytes())
                payload = proc.conn.recv_bytes()
            except (EOFError, OSError):
                if self._closed:
                    return
                proc.join(1)
                log.warning("worker %d (pid %s) died with exit code %s while running chunk %d "
                            "of job %s; replacing it", slot, proc.pid, proc.exitcode,
                            task.chunk_id, task.job_id[:8])
                self._procs[slot] = self._spawn()
                self.on_result(task, wire.CRASHED, pickle.dumps(proc.exitcode), 0.0)
                continue
            if task.job_id not in self._cancelled:
                self.on_result(task, status, payload, elapsed)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers and their threads."""
        if self._closed:
            return
        self._closed = True
        self.drain()
        for _ in self._threads:
            self._queue.put(_STOP)
        for proc in self._procs:
            try:
                proc.conn.close()
            except Exception:
                pass
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1)
