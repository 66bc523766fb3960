"""achilles.Executor against a real local cluster: the behaviours CPython's
test_concurrent_futures checks for ProcessPoolExecutor, rewritten for calls that run on nodes."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import gc
import os
import subprocess
import sys

import pytest

import achilles
from achilles.core.errors import RemoteTraceback
from conftest import ROOT, wait_for
from pool_tasks import Unpicklable, init_worker, running, tagged
from tasks import TaskFailure, fail_on_three, pause

pytestmark = pytest.mark.timeout(120)


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def wait_file(path):
    """Run until ``path`` exists (the test decides when a call may finish); return it."""
    while not os.path.exists(path):
        pause(0.01)
    return path


def value_or_wait(value, gate):
    """``value`` at once, unless ``gate`` is given: then wait for that file first."""
    if gate:
        wait_file(gate)
    return value


@pytest.fixture
def executor(shared_cluster):
    """An Executor on the module's shared cluster, shut down (cancelling) after the test."""
    ex = achilles.Executor(cluster=shared_cluster)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def jobs(cluster) -> int:
    """How many jobs the server has."""
    return len(cluster.status()["jobs"])


def idle(cluster) -> bool:
    """Whether the cluster runs nothing: no job, no busy node process."""
    status = cluster.status()
    return not status["jobs"] and all(n["busy"] == 0 for n in status["nodes"])


def busy(cluster) -> int:
    """Worker processes running something, over all nodes."""
    return sum(n["busy"] for n in cluster.status()["nodes"])


def test_submit_returns_real_futures(executor):
    """submit runs fn(*args, **kwargs) and returns a concurrent.futures.Future of its value;
    keyword arguments named ``fn`` or ``self`` reach the function."""
    future = executor.submit(pow, 2, 8)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=60) == 256
    assert future.done() and not future.cancelled() and future.exception() is None
    assert executor.submit(mul, 2, y=8).result(timeout=60) == 16
    assert executor.submit(capture, 1, self=2, fn=4).result(timeout=60) == ((1,), {"self": 2, "fn": 4})


def test_pending_futures_take_no_thread_each(executor, tmp_path):
    """Many pending futures share the cluster's event thread and the executor's one settling
    thread: submit does not start a thread per call."""
    import threading

    gate = str(tmp_path / "gate")
    executor.submit(mul, 1, 1).result(timeout=60)  # the executor's threads exist from here on
    before = threading.active_count()
    futures = [executor.submit(wait_file, gate) for _ in range(50)]
    assert threading.active_count() - before < 5
    open(gate, "w").close()
    assert [f.result(timeout=60) for f in futures] == [gate] * 50


def test_future_exception_keeps_its_type(executor):
    """A failing call's future holds the call's own exception, remote traceback as cause."""
    future = executor.submit(fail_on_three, 3)
    exc = future.exception(timeout=60)
    assert isinstance(exc, TaskFailure)
    assert isinstance(exc.__cause__, RemoteTraceback)
    with pytest.raises(TaskFailure):
        future.result()


def test_map(executor):
    """map gives the builtin map's results in order, over several iterables and chunk sizes."""
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(executor.map(abs, range(-50, 50), chunksize=7)) == [abs(x) for x in range(-50, 50)]
    assert list(executor.map(mul, [1, 2, 3], [4, 5])) == [4, 10]
    assert list(executor.map(abs, [])) == []
    with pytest.raises(ValueError):
        executor.map(abs, [1], chunksize=0)


def test_map_raises_at_the_failing_item(executor):
    """Iterating map yields the results before a failing item, then raises its exception."""
    results = executor.map(fail_on_three, range(6), chunksize=1)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TaskFailure):
        next(results)
    assert list(results) == []  # like the stdlib's generator, finished once it raised


def test_map_is_lazy(executor, tmp_path):
    """map's first result comes while a later call still runs."""
    gate = str(tmp_path / "gate")
    results = executor.map(value_or_wait, ["first", "second"], [None, gate], chunksize=1)
    assert next(results) == "first"
    open(gate, "w").close()
    assert list(results) == ["second"]


def test_map_timeout(executor, shared_cluster, tmp_path):
    """map raises TimeoutError when the next result is not there ``timeout`` seconds after the
    call; the results before it are yielded and the rest of its work is cancelled."""
    never = str(tmp_path / "never")
    # generous: the first two calls must be back before it, the third never comes
    results = executor.map(value_or_wait, [1, 2, 3], [None, None, never], timeout=5, chunksize=1)
    got = []
    with pytest.raises(cf.TimeoutError):
        for value in results:
            got.append(value)
    assert got == [1, 2]
    wait_for(lambda: idle(shared_cluster.cluster), what="the timed-out map to be cancelled")


def test_as_completed_and_wait(executor, tmp_path):
    """as_completed yields futures as they finish; wait's FIRST_COMPLETED, FIRST_EXCEPTION and
    ALL_COMPLETED return the stdlib's done/not_done sets."""
    gate = str(tmp_path / "gate")
    slow = executor.submit(wait_file, gate)
    fast = executor.submit(mul, 6, 7)
    assert next(cf.as_completed([slow, fast], timeout=60)) is fast
    with pytest.raises(cf.TimeoutError):
        slow.result(timeout=0.05)
    with pytest.raises(cf.TimeoutError):
        list(cf.as_completed([slow], timeout=0.05))
    done, not_done = cf.wait([slow, fast], timeout=60, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    failing = executor.submit(fail_on_three, 3)
    done, not_done = cf.wait([slow, failing], timeout=60, return_when=cf.FIRST_EXCEPTION)
    assert done == {failing} and not_done == {slow}
    open(gate, "w").close()
    done, not_done = cf.wait([slow, fast, failing], timeout=60, return_when=cf.ALL_COMPLETED)
    assert done == {slow, fast, failing} and not not_done
    assert {f.result() for f in cf.as_completed([slow, fast])} == {gate, 42}


def test_add_done_callback(executor):
    """add_done_callback runs in this process with the future, also when added after it is done."""
    seen = []
    future = executor.submit(mul, 3, 3)
    future.add_done_callback(lambda f: seen.append((os.getpid(), f.result())))
    future.result(timeout=60)
    wait_for(lambda: seen, what="the done callback")
    future.add_done_callback(lambda f: seen.append("late"))
    assert seen == [(os.getpid(), 9), "late"]


def test_cancel_a_queued_future_cancels_it_on_the_server(shared_cluster, tmp_path):
    """With every worker process busy, cancel() on a queued future returns True, its result
    raises CancelledError, done callbacks and waiters see it, and the server drops its job."""
    cluster = shared_cluster.cluster
    never = str(tmp_path / "never")
    wait_for(lambda: idle(cluster), what="earlier tests' jobs to leave")
    with achilles.Executor(cluster=shared_cluster) as ex:
        blockers = [ex.submit(wait_file, never) for _ in range(4)]
        wait_for(lambda: busy(cluster) == 4, what="every worker process busy")
        queued = ex.submit(mul, 2, 3)
        wait_for(lambda: jobs(cluster) == 5, what="the queued call on the server")
        seen = []
        queued.add_done_callback(seen.append)
        assert queued.cancel() and queued.cancelled() and queued.done()
        with pytest.raises(cf.CancelledError):
            queued.result(timeout=60)
        assert seen == [queued]
        done, _ = cf.wait([queued], timeout=60)
        assert done == {queued}
        wait_for(lambda: jobs(cluster) == 4, what="the cancelled job to leave the server")
        for blocker in blockers:
            assert blocker.cancel()
    wait_for(lambda: idle(cluster), what="the nodes to be free")


def test_cancel_a_finished_future_returns_false(executor):
    """cancel() on a future whose result is back returns False and keeps the result."""
    future = executor.submit(mul, 4, 5)
    assert future.result(timeout=60) == 20
    assert not future.cancel() and not future.cancelled()


def test_shutdown_refuses_new_work(shared_cluster):
    """After shutdown, submit and map raise RuntimeError; shutdown(wait=True) returns once
    the submitted calls are done."""
    ex = achilles.Executor(cluster=shared_cluster)
    futures = [ex.submit(mul, i, i) for i in range(8)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(8)]
    with pytest.raises(RuntimeError):
        ex.submit(mul, 1, 1)
    with pytest.raises(RuntimeError):
        ex.map(abs, [1])


def test_shutdown_without_wait_lets_calls_finish(shared_cluster, tmp_path):
    """shutdown(wait=False) returns while calls run; they still complete afterwards."""
    gate = str(tmp_path / "gate")
    ex = achilles.Executor(cluster=shared_cluster)
    future = ex.submit(wait_file, gate)
    ex.shutdown(wait=False)
    assert not future.done()
    open(gate, "w").close()
    assert future.result(timeout=60) == gate


def test_shutdown_cancel_futures(shared_cluster, tmp_path):
    """shutdown(cancel_futures=True) cancels every call whose result is not back, on the
    cluster too, and the nodes are left free."""
    cluster = shared_cluster.cluster
    never = str(tmp_path / "never")
    ex = achilles.Executor(cluster=shared_cluster)
    done = ex.submit(mul, 1, 2)
    assert done.result(timeout=60) == 2
    pending = [ex.submit(wait_file, never) for _ in range(10)]
    results = ex.map(wait_file, [never] * 3)
    wait_for(lambda: busy(cluster) > 0, what="calls running")
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in pending) and done.result() == 2
    with pytest.raises(achilles.JobCancelled):
        next(results)
    wait_for(lambda: idle(cluster), what="the nodes to be free")


def test_context_manager_waits(shared_cluster):
    """Leaving ``with Executor() as ex`` waits for the submitted calls."""
    with achilles.Executor(cluster=shared_cluster) as ex:
        futures = [ex.submit(mul, i, 2) for i in range(6)]
        results = ex.map(abs, range(-3, 3))
    assert [f.result(timeout=0) for f in futures] == [0, 2, 4, 6, 8, 10]
    assert list(results) == [3, 2, 1, 0, 1, 2]


def test_results_outlive_the_dropped_executor(shared_cluster):
    """Results of an executor dropped without shutdown still arrive (CPython's
    test_del_shutdown)."""
    ex = achilles.Executor(cluster=shared_cluster)
    results = ex.map(abs, range(-5, 5))
    future = ex.submit(mul, 3, 4)
    del ex
    gc.collect()
    assert list(results) == [abs(x) for x in range(-5, 5)]
    assert future.result(timeout=60) == 12


def test_dropped_map_cancels_its_job(executor, shared_cluster, tmp_path):
    """Dropping map's iterator before its end cancels the rest of its job."""
    never = str(tmp_path / "never")
    results = executor.map(wait_file, [never] * 6)
    wait_for(lambda: busy(shared_cluster.cluster) > 0, what="calls running")
    del results
    gc.collect()
    wait_for(lambda: idle(shared_cluster.cluster), what="the dropped map's job to be cancelled")


def test_asyncio_run_in_executor(executor):
    """loop.run_in_executor runs calls on the cluster and awaits their results."""
    async def main():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(executor, mul, i, 3) for i in range(6)))

    assert asyncio.run(main()) == [0, 3, 6, 9, 12, 15]


def test_max_workers_caps_running_calls(shared_cluster, tmp_path):
    """Executor(max_workers=2) runs at most 2 of its calls at once on a cluster of 4 worker
    processes, over submit and map together."""
    with achilles.Executor(2, cluster=shared_cluster) as ex:
        futures = [ex.submit(running, (str(tmp_path), i)) for i in range(10)]
        counts = list(ex.map(running, [(str(tmp_path), i) for i in range(10)], chunksize=1))
        counts += [f.result(timeout=60) for f in futures]
    assert max(counts) <= 2, counts


def test_initializer_runs_once_per_worker_process(shared_cluster, tmp_path):
    """initializer(*initargs) runs once per worker process over all the executor's calls."""
    with achilles.Executor(initializer=init_worker, initargs=(str(tmp_path), "E"),
                           cluster=shared_cluster) as ex:
        out = [f.result(timeout=60) for f in [ex.submit(tagged, i) for i in range(20)]]
        out += list(ex.map(tagged, range(100), chunksize=1))
    assert {tag for _, tag, _ in out} == {"E"}
    counts = collections.Counter(int(n.split("-")[0]) for n in os.listdir(tmp_path))
    assert set(counts.values()) == {1}, counts
    assert len(counts) <= 4 < len(out)


def test_unpicklable_argument_fails_the_future(executor):
    """A call whose arguments cannot be pickled fails (at submit or in its future); nothing
    hangs and the executor goes on."""
    with pytest.raises(TypeError, match="cannot be pickled"):
        executor.submit(mul, Unpicklable(), 2).result(timeout=60)
    with pytest.raises(TypeError, match="cannot be pickled"):
        list(executor.map(abs, [1, Unpicklable()]))
    assert executor.submit(mul, 2, 2).result(timeout=60) == 4


def test_invalid_arguments():
    """max_workers below 1, a non-callable initializer and a bad max_tasks_per_child are
    refused as the stdlib refuses them, before any connection is made."""
    for bad in (0, -1):
        with pytest.raises(ValueError):
            achilles.Executor(bad)
    with pytest.raises(TypeError):
        achilles.Executor(initializer=3)
    with pytest.raises(ValueError):
        achilles.Executor(max_tasks_per_child=0)


@pytest.mark.timeout(180)
def test_example_runs_unchanged_but_for_the_import(shared_cluster):
    """examples/dropin_executor.py, written for ProcessPoolExecutor, prints the same on the
    cluster as with ``from concurrent.futures import ProcessPoolExecutor``."""
    script = os.path.join(ROOT, "examples", "dropin_executor.py")
    env = dict(os.environ, ACHILLES_HOST="127.0.0.1", ACHILLES_PORT=str(shared_cluster.port),
               ACHILLES_USERNAME="local", ACHILLES_SECRET_KEY=shared_cluster._secret,
               PYTHONPATH=ROOT)
    env.pop("ACHILLES_ENV_FILE", None)
    runs = [subprocess.run([sys.executable, script, *flag], env=env, capture_output=True,
                           text=True, timeout=150, cwd=ROOT) for flag in ([], ["--stdlib"])]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    assert runs[0].stdout == runs[1].stdout
    assert "as_completed" in runs[0].stdout
