"""Races around a crashed chunk's life, each pinned down deterministically.

The hang of issue #8 (9a): ``test_worker_crash_is_retried`` waited for ever although the
server had finished the job. A crash and its retry shift the order in which RESULT and WANT
reach the controller; when every chunk was answered *before* a late WANT let the controller
read past the end of its input, ``JobRun.chunks`` sent END and then blocked on its event
queue, for a message the server never sends.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import signal
import threading
import time
from typing import Dict, Optional

import pytest

from achilles.core import wire
from achilles.controller.events import ChunkResult, Event, Want
from achilles.controller import reactor_thread
from achilles.controller.job import JobRun
from achilles.node.pool import Task, WorkerPool
from achilles.core.serialization import dumps_code, dumps_data
from conftest import alive, proc_stats, wait_for
from crash_tasks import exit_with, fork_then_exit
from tasks import delayed, square, where

pytestmark = pytest.mark.timeout(60)


class ServerScript:
    """Stands in for the controller's link so that the server's messages can be delivered in
    an exact order (no real server can be made to interleave them on demand). It records what
    the JobRun sends, and its event queue fails instead of blocking when nothing is queued."""

    def __init__(self) -> None:
        self.sent: list = []

    def register(self, job_id: str, q: "queue.Queue[Event]") -> int:
        return 1

    def unregister(self, job_id: str) -> None:
        pass

    def send(self, messages: list) -> None:
        for pieces in messages:
            data = b"".join(pieces)
            code, _ = wire.HEADER.unpack_from(data, 0)
            self.sent.append((code, wire.decode_message(data[wire.HEADER.size:], code)))

    def of(self, code: int) -> list:
        return [fields for c, fields in self.sent if c == code]


class NoWait(queue.Queue):
    """An event queue whose ``get`` fails at once when empty: waiting there would be a hang."""

    def get(self, block: bool = True, timeout: float = None):
        if self.empty():
            raise AssertionError("JobRun waits for a server message that will never come")
        return super().get(block=False)


def result(cid: int, values: list) -> ChunkResult:
    """A RESULT event as ControllerProtocol queues it."""
    return ChunkResult(cid, wire.OK, dumps_data(values), 0.01, "n")


@pytest.mark.parametrize("ordered", [True, False], ids=["map", "imap_unordered"])
def test_input_end_found_after_last_result_does_not_hang(ordered):
    """Every chunk is answered before the WANT that lets the controller read past the end of
    its input: the run sends END and returns its results instead of waiting for ever."""
    link = ServerScript()
    run = JobRun(link, square, range(20), 10, None, ordered)
    assert [f[1] for f in link.of(wire.CHUNK)] == [0, 1]  # the initial credit is spent
    assert not run.exhausted and not link.of(wire.END)
    run.events = NoWait()
    run.events.put(result(1, [x * x for x in range(10, 20)]))  # the retried chunk 0 comes last
    run.events.put(result(0, [x * x for x in range(10)]))
    run.events.put(Want(2, 2, 4))  # sent by the server after chunk 0's retry was queued
    out = [x for values in run.chunks() for x in values]
    assert sorted(out) == [x * x for x in range(20)]
    if ordered:
        assert out == [x * x for x in range(20)]
    assert [f[1] for f in link.of(wire.END)] == [2]
    assert not link.of(wire.CANCEL), "a finished job must not be cancelled"


# --- the node's worker pool, driven directly with real worker processes --------------------

def descendants() -> set:
    """Live pids below this process."""
    children: dict = collections.defaultdict(list)
    for pid, fields in proc_stats():
        if fields[0] != "Z":
            children[int(fields[1])].append(pid)
    out, todo = set(), [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            out.add(pid)
            todo.append(pid)
    return out


class Outcomes:
    """``on_result`` for a WorkerPool: every outcome by chunk id, in arrival order."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.got: Dict[int, list] = collections.defaultdict(list)

    def __call__(self, task: Task, status: int, payload: bytes, elapsed: float) -> None:
        with self.cv:
            self.got[task.chunk_id].append((status, bytes(payload)))
            self.cv.notify_all()

    def wait(self, ids, timeout: float = 30.0) -> bool:
        """Whether every chunk in ``ids`` got an outcome within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while not all(i in self.got for i in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(left)
        return True


def chunk(cid: int, func, items: list, job: str = "job", careful: bool = False,
          timeout: Optional[float] = None) -> Task:
    """A map task as the node builds it from a TASK message."""
    return Task(1, job, cid, dumps_code(func), b"", dumps_data(items), careful, timeout)


class InReactor:
    """A WorkerPool driven from a test's thread: each call runs in the reactor thread (where
    the pool lives, as in a node) and is waited for."""

    def __init__(self, processes: int, out: Outcomes) -> None:
        self.pool = reactor_thread.call(WorkerPool, processes, out, timeout=30)

    def __getattr__(self, name: str):
        value = reactor_thread.call(getattr, self.pool, name, timeout=30)
        if not callable(value):
            return value
        return lambda *args: reactor_thread.call(value, *args, timeout=30)


@pytest.fixture
def pools():
    """Factory of started WorkerPools ``(outcomes, pool)``, living in the reactor thread; at
    teardown the pools are closed, the forkserver they started is stopped, and no process they
    started may be left."""
    from multiprocess import forkserver, resource_tracker

    had_server = forkserver._forkserver._forkserver_pid is not None
    had_tracker = resource_tracker._resource_tracker._pid is not None
    before = descendants()
    made = []

    def make(processes: int = 2):
        out = Outcomes()
        pool = InReactor(processes, out)
        made.append(pool)
        return out, pool

    yield make
    for pool in made:
        pool.close()
    # test-only: multiprocess's own stop hooks for its helper processes
    if not had_server:
        forkserver._forkserver._stop()
    if not had_tracker:
        resource_tracker._resource_tracker._stop()
    try:
        wait_for(lambda: not (descendants() - before), timeout=10)
    except AssertionError:
        raise AssertionError(f"processes outlived the test: {sorted(descendants() - before)}") from None


def test_crash_is_seen_while_a_forked_child_holds_the_pipe(pools, tmp_path):
    """A worker that forked a child and then died is reported CRASHED at once, although the
    child keeps the worker's pipe open (the pipe alone never reports end-of-file)."""
    out, pool = pools(1)
    pid_file = tmp_path / "grandchild"
    pool.submit(chunk(0, fork_then_exit, [str(pid_file)]))
    try:
        assert out.wait({0}, 20), "the crash was never reported: the chunk was lost"
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    [(status, payload)] = out.got[0]
    assert status == wire.CRASHED and pickle.loads(payload)[0] == 3


def test_exit_code_survives_workers_restarting_together(pools):
    """Two workers crashing and being replaced at the same moment each report their own exit
    code (a concurrent process start must not consume it and turn it into 255)."""
    out, pool = pools(2)
    n = 100
    for cid in range(n):
        pool.submit(chunk(cid, exit_with, [7]))
    assert out.wait(range(n), 60), "a crash was never reported"
    codes = [pickle.loads(out.got[cid][0][1])[0] for cid in range(n)]
    assert all(len(out.got[cid]) == 1 for cid in range(n))
    assert codes == [7] * n, codes


def test_job_sent_again_after_cancel_runs(pools):
    """After CANCEL, the same job id sent again in the same session (the controller
    reconnected and resubmitted it) runs: its chunks are not dropped as cancelled."""
    out, pool = pools(1)
    pool.submit(chunk(0, delayed, [0.5], job="other"))
    pool.submit(chunk(1, square, [3], job="again"))
    pool.cancel_job(1, "again")
    pool.submit(chunk(2, square, [4], job="again"))
    assert out.wait({0, 2}, 30), f"the resubmitted chunk was dropped: {dict(out.got)}"
    assert pickle.loads(out.got[2][0][1]) == [16]
    assert 1 not in out.got, "a chunk queued before its job's cancel ran anyway"


def test_failed_replacement_loses_neither_chunk_nor_worker(pools, monkeypatch):
    """When starting the replacement of a crashed worker fails once (no free fds, say), the
    chunk is still reported CRASHED and the pool keeps serving with a new worker."""
    import achilles.node.pool as pool_module

    out, pool = pools(1)
    real = pool_module._Slot
    failures = []

    def flaky(ctx, *settings):
        if not failures:
            failures.append(1)
            raise OSError(24, "Too many open files")
        return real(ctx, *settings)

    monkeypatch.setattr(pool_module, "_Slot", flaky)
    pool.submit(chunk(0, exit_with, [3]))
    assert out.wait({0}, 20), "the crashed chunk was lost"
    assert out.got[0][0][0] == wire.CRASHED
    pool.submit(chunk(1, square, [5]))
    assert out.wait({1}, 20), "the pool stopped serving"
    assert pickle.loads(out.got[1][0][1]) == [25] and failures == [1]


def test_chunk_is_not_blamed_for_a_worker_dead_before_it(pools):
    """A worker killed while idle (SIGKILL, as the OOM killer does) is replaced when the next
    chunk finds it dead, and that chunk runs on the new worker instead of being reported as
    having crashed it."""
    out, pool = pools(1)
    pool.submit(chunk(0, where, [0]))
    assert out.wait({0}, 20)
    [pid] = pickle.loads(out.got[0][0][1])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="the idle worker to die")
    pool.submit(chunk(1, square, [6]))
    assert out.wait({1}, 20), "the chunk was lost"
    [(status, payload)] = out.got[1]
    assert status == wire.OK and pickle.loads(payload) == [36], out.got[1]
