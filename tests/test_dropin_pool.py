"""achilles.Pool against a real local cluster: the behaviours CPython's own Pool tests check
(Lib/test/_test_multiprocessing.py), rewritten for a pool whose workers are cluster nodes."""

from __future__ import annotations

import collections
import gc
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading

import pytest

import achilles
from achilles.core.errors import ConfigError, JobCancelled, RemoteError, RemoteTraceback
from achilles.pool import ApplyResult, AsyncResult, IMapIterator, IMapUnorderedIterator, MapResult
from conftest import ROOT, group_members, wait_for
from pool_tasks import Unpicklable, init_worker, pid_of, raise_no_rebuild, running, tagged
from tasks import TaskFailure, fail_on_three, pause, square

pytestmark = pytest.mark.timeout(120)


def sqr(x, wait=0.0):
    """The stdlib tests' task: x * x after ``wait`` seconds."""
    pause(wait)
    return x * x


def mul(x, y):
    return x * y


def wait_file(path):
    """Run until ``path`` exists (the test decides when a task may finish); return it."""
    while not os.path.exists(path):
        pause(0.01)
    return path


def raising():
    raise KeyError("key")


def unpicklable_result(x):
    return (i for i in range(x))  # neither pickle nor dill can pickle a generator


@pytest.fixture
def pool(shared_cluster):
    """A Pool on the module's shared cluster, terminated after the test."""
    p = achilles.Pool(cluster=shared_cluster)
    yield p
    p.terminate()


def idle(cluster) -> bool:
    """Whether the cluster runs nothing: no job, no busy node process."""
    status = cluster.status()
    return not status["jobs"] and all(n["busy"] == 0 for n in status["nodes"])


def test_apply(pool):
    """apply runs func(*args, **kwds) and returns its value."""
    assert pool.apply(sqr, (5,)) == 25
    assert pool.apply(sqr, (), {"x": 3}) == 9
    assert pool.apply(mul, (6,), {"y": 7}) == 42


def test_apply_async_result(pool):
    """apply_async returns an AsyncResult: get() is the value, then ready() and successful()."""
    res = pool.apply_async(sqr, (7,))
    assert isinstance(res, ApplyResult) and AsyncResult is ApplyResult
    assert res.get(timeout=60) == 49
    assert res.ready() and res.successful()


def test_result_not_ready_yet(pool, tmp_path):
    """Before the call completes: ready() is False, successful() raises ValueError, get with a
    timeout raises multiprocessing.TimeoutError and wait(timeout) just returns."""
    gate = str(tmp_path / "gate")
    res = pool.apply_async(wait_file, (gate,))
    assert not res.ready()
    with pytest.raises(ValueError):
        res.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        res.get(timeout=0.05)
    assert res.wait(0.05) is None and not res.ready()
    open(gate, "w").close()
    assert res.get(timeout=60) == gate
    assert res.successful()


def test_pending_calls_take_no_thread_each(pool, tmp_path):
    """Many pending apply_async/map_async calls share the cluster's event thread and the
    pool's one callback thread: they do not start a thread per call."""
    gate = str(tmp_path / "gate")
    pool.apply(sqr, (1,))  # the pool's threads exist from here on
    before = threading.active_count()
    pending = [pool.apply_async(wait_file, (gate,)) for _ in range(40)]
    pending += [pool.map_async(wait_file, [gate, gate]) for _ in range(10)]
    assert threading.active_count() - before < 5
    open(gate, "w").close()
    assert [r.get(timeout=60) for r in pending[:40]] == [gate] * 40


def test_map_and_starmap(pool):
    """map and starmap return the builtin's results in order, whatever the chunksize."""
    assert pool.map(sqr, list(range(10))) == [x * x for x in range(10)]
    assert pool.map(sqr, range(100), chunksize=20) == [x * x for x in range(100)]
    pairs = list(zip(range(10), range(9, -1, -1)))
    assert pool.starmap(mul, pairs) == [x * y for x, y in pairs]
    assert pool.starmap(mul, pairs, chunksize=3) == [x * y for x, y in pairs]


def test_map_async_and_starmap_async(pool):
    """map_async and starmap_async return MapResults whose get() is the list."""
    res = pool.map_async(sqr, range(10))
    assert isinstance(res, MapResult)
    assert res.get(timeout=60) == [x * x for x in range(10)]
    pairs = [(1, 2), (3, 4)]
    assert pool.starmap_async(mul, pairs).get(timeout=60) == [2, 12]


def test_empty_iterables(pool):
    """An empty iterable gives an empty result from every call."""
    assert pool.map(sqr, []) == []
    assert pool.starmap(mul, []) == []
    assert pool.map_async(sqr, iter(())).get(timeout=60) == []
    assert list(pool.imap(sqr, [])) == []
    assert list(pool.imap_unordered(sqr, [])) == []


def test_callbacks_run_in_the_caller_before_get_returns(pool):
    """callback gets the value in this process, before get() returns; error_callback gets the
    exception; map_async's callback gets the whole list."""
    seen = []
    res = pool.apply_async(sqr, (4,), callback=lambda v: seen.append((os.getpid(), v)))
    assert res.get(timeout=60) == 16
    assert seen == [(os.getpid(), 16)]
    errors = []
    bad = pool.apply_async(raising, error_callback=errors.append)
    with pytest.raises(KeyError):
        bad.get(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], KeyError)
    assert not bad.successful()
    lists = []
    assert pool.map_async(sqr, range(5), callback=lists.append).get(timeout=60) == [0, 1, 4, 9, 16]
    assert lists == [[0, 1, 4, 9, 16]]


def test_error_callback_of_a_failing_map(pool):
    """map_async's error_callback gets the failing item's own exception."""
    failed = []
    res = pool.map_async(fail_on_three, range(6), error_callback=failed.append)
    with pytest.raises(TaskFailure):
        res.get(timeout=60)
    assert len(failed) == 1 and isinstance(failed[0], TaskFailure)


def test_callbacks_run_one_at_a_time(pool):
    """Callbacks never overlap (the stdlib runs them on its one result-handler thread)."""
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def slow_callback(_value):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        pause(0.01)  # a callback that takes a while
        with lock:
            state["now"] -= 1

    results = [pool.apply_async(sqr, (i,), callback=slow_callback) for i in range(12)]
    assert [r.get(timeout=60) for r in results] == [i * i for i in range(12)]
    assert state["most"] == 1


def test_failing_callback_is_logged_and_the_pool_goes_on(pool, caplog):
    """A callback that raises is logged; its result is still ready and the pool still works."""
    def broken(_value):
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR, logger="achilles.pool"):
        res = pool.apply_async(sqr, (3,), callback=broken)
        assert res.get(timeout=60) == 9
    assert "callback" in caplog.text and "callback bug" in caplog.text
    assert pool.apply(sqr, (2,)) == 4


def test_imap(pool):
    """imap yields in input order; next() and next(timeout) work; StopIteration at the end."""
    it = pool.imap(sqr, list(range(10)))
    assert isinstance(it, IMapIterator)
    assert list(it) == [x * x for x in range(10)]
    it = pool.imap(sqr, range(10))
    for i in range(10):
        assert it.next(timeout=60) == i * i
    with pytest.raises(StopIteration):
        it.next()
    it = pool.imap(sqr, range(1000), chunksize=100)
    assert [next(it) for _ in range(1000)] == [x * x for x in range(1000)]
    with pytest.raises(StopIteration):
        next(it)


def test_imap_unordered(pool):
    """imap_unordered yields every result once, in completion order."""
    it = pool.imap_unordered(sqr, range(100))
    assert isinstance(it, IMapUnorderedIterator)
    assert sorted(it) == [x * x for x in range(100)]
    assert sorted(pool.imap_unordered(sqr, range(100), chunksize=7)) == [x * x for x in range(100)]


def test_imap_next_timeout(pool, tmp_path):
    """next(timeout) raises multiprocessing.TimeoutError while the next result is not ready,
    and returns it once it is."""
    gate = str(tmp_path / "gate")
    it = pool.imap(wait_file, [gate])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    open(gate, "w").close()
    assert it.next(timeout=60) == gate


def test_imap_raises_at_the_failing_item(pool):
    """imap yields every result before a failing item, then raises that item's exception;
    the rest of the job is cancelled, so the iterator is then exhausted."""
    it = pool.imap(fail_on_three, range(10), chunksize=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TaskFailure):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_task_exception_keeps_its_type_and_remote_traceback(pool):
    """A task's exception reaches the caller as itself, with the remote traceback as cause."""
    with pytest.raises(TaskFailure) as info:
        pool.map(fail_on_three, range(10))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on_three" in str(info.value.__cause__)
    with pytest.raises(KeyError):
        pool.apply(raising)


def test_unpicklable_result_raises_in_the_caller(pool):
    """A result that cannot be pickled raises in the caller instead of hanging."""
    with pytest.raises(TypeError, match="pickle"):
        pool.map(unpicklable_result, range(3))
    with pytest.raises(TypeError, match="pickle"):
        pool.apply_async(unpicklable_result, (1,)).get(timeout=60)


def test_closed_pool_raises_value_error(shared_cluster):
    """After close(), every call raises ValueError, as does entering it; join() returns once
    the work submitted before close() is done."""
    p = achilles.Pool(cluster=shared_cluster)
    res = p.map_async(sqr, range(20))
    p.close()
    for call in (lambda: p.apply(sqr, (1,)), lambda: p.apply_async(sqr, (1,)),
                 lambda: p.map(sqr, [1]), lambda: p.map_async(sqr, [1]),
                 lambda: p.starmap(mul, [(1, 2)]), lambda: p.starmap_async(mul, [(1, 2)]),
                 lambda: p.imap(sqr, [1]), lambda: p.imap_unordered(sqr, [1])):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        with p:
            pass
    p.join()
    assert res.ready() and res.get() == [x * x for x in range(20)]


def test_join_needs_close_or_terminate(pool):
    """join() on a running pool raises ValueError."""
    with pytest.raises(ValueError):
        pool.join()


def test_close_then_join_keeps_unread_imap_results(shared_cluster):
    """An imap nobody reads does not block join(): its results are kept and read afterwards,
    as with the stdlib (a reader that falls behind only pauses the job until join)."""
    p = achilles.Pool(cluster=shared_cluster)
    it = p.imap(sqr, range(2000), chunksize=10)
    asyncs = [p.apply_async(sqr, (i,)) for i in range(5)]
    p.close()
    p.join()
    assert all(r.ready() for r in asyncs)
    assert list(it) == [x * x for x in range(2000)]


def test_terminate_with_tasks_queued_frees_the_nodes(shared_cluster, tmp_path):
    """terminate() returns with tasks running and queued (they would never end by
    themselves), their results raise JobCancelled without running callbacks, and the nodes
    are left free."""
    cluster = shared_cluster.cluster
    p = achilles.Pool(cluster=shared_cluster)
    never = str(tmp_path / "never")
    called = []
    pending = [p.apply_async(wait_file, (never,), callback=called.append,
                             error_callback=called.append) for _ in range(12)]
    pending.append(p.map_async(wait_file, [never] * 20, chunksize=1))
    it = p.imap(wait_file, [never] * 5)
    wait_for(lambda: any(n["busy"] for n in cluster.status()["nodes"]), what="tasks running")
    p.terminate()
    for res in pending:
        assert res.ready()
        with pytest.raises(JobCancelled):
            res.get()
    with pytest.raises(JobCancelled):
        next(it)
    assert called == []
    wait_for(lambda: idle(cluster), what="the nodes to be free")
    with pytest.raises(ValueError):
        p.map(sqr, [1])
    assert cluster.map(square, range(10)) == [x * x for x in range(10)]


def test_context_manager_terminates(shared_cluster, tmp_path):
    """Leaving ``with Pool() as p`` terminates: unfinished results raise JobCancelled, the
    nodes are freed and the pool takes no more work."""
    cluster = shared_cluster.cluster
    never = str(tmp_path / "never")
    with achilles.Pool(cluster=shared_cluster) as p:
        assert p.map(sqr, range(5)) == [0, 1, 4, 9, 16]
        res = p.apply_async(wait_file, (never,))
    with pytest.raises(JobCancelled):
        res.get(timeout=60)
    wait_for(lambda: idle(cluster), what="the nodes to be free")
    with pytest.raises(ValueError):
        p.apply(sqr, (1,))


def test_dropped_imap_cancels_its_job(pool, tmp_path):
    """An imap iterator dropped before its end cancels the rest of its job."""
    cluster = pool._backend.cluster
    never = str(tmp_path / "never")
    it = pool.imap(wait_file, [never] * 8)
    wait_for(lambda: any(n["busy"] for n in cluster.status()["nodes"]), what="tasks running")
    del it
    gc.collect()
    wait_for(lambda: idle(cluster), what="the dropped imap's job to be cancelled")


def init_counts(log_dir):
    """How many times the initializer ran in each process (pid -> calls)."""
    return collections.Counter(int(name.split("-")[0]) for name in os.listdir(log_dir))


def test_processes_caps_the_pool_across_its_calls(shared_cluster, tmp_path):
    """Pool(processes=2) runs at most 2 of its tasks at once on a cluster of 4 worker
    processes, over all its calls together (map, starmap and apply_async)."""
    with achilles.Pool(2, cluster=shared_cluster) as p:
        runs = [(str(tmp_path), i) for i in range(12)]
        pending = [p.map_async(running, runs, chunksize=1),
                   p.map_async(running, runs, chunksize=1)]
        pending += [p.apply_async(running, ((str(tmp_path), i),)) for i in range(6)]
        counts = pending[0].get(60) + pending[1].get(60) + [r.get(60) for r in pending[2:]]
    assert max(counts) <= 2, counts
    with achilles.Pool(cluster=shared_cluster) as p:  # no cap: the cluster's 4 processes
        assert max(p.map(running, [(str(tmp_path), i) for i in range(24)], chunksize=1)) > 2


def test_initializer_runs_once_per_worker_process(shared_cluster, tmp_path):
    """initializer(*initargs) runs once in each worker process that runs the pool's tasks,
    over all of the pool's calls, not once per task; every task sees its state."""
    with achilles.Pool(initializer=init_worker, initargs=(str(tmp_path), "P"),
                       cluster=shared_cluster) as p:
        out = p.map(tagged, range(200), chunksize=1)
        out += p.starmap(tagged, [(i,) for i in range(50)])
        out += [p.apply(tagged, (i,)) for i in range(5)]
        out += list(p.imap_unordered(tagged, range(50)))
    assert {tag for _, tag, _ in out} == {"P"}
    counts = init_counts(tmp_path)
    assert set(counts.values()) == {1}, counts
    assert {pid for pid, _, _ in out} <= set(counts)
    assert len(counts) <= 4 < len(out)  # 2 nodes x 2 processes


def test_maxtasksperchild_replaces_workers(shared_cluster):
    """With maxtasksperchild=2 no worker process runs more than 2 of the pool's tasks; with
    maxtasksperchild=1, close() then join() before the tasks are done does not deadlock."""
    with achilles.Pool(maxtasksperchild=2, cluster=shared_cluster) as p:
        pids = p.map(pid_of, range(20), chunksize=1)
    per_process = collections.Counter(pids)
    assert max(per_process.values()) <= 2 and len(per_process) >= 10
    p = achilles.Pool(maxtasksperchild=1, cluster=shared_cluster)
    results = [p.apply_async(pid_of, (i,)) for i in range(6)]
    p.close()
    p.join()
    assert len({r.get() for r in results}) == 6


def test_join_after_a_failed_map(shared_cluster):
    """A map that failed does not leave join() waiting (CPython issue 23992)."""
    p = achilles.Pool(cluster=shared_cluster)
    with pytest.raises(TaskFailure):
        p.map(fail_on_three, range(50), chunksize=1)
    p.close()
    p.join()


def test_chunksize_below_one_raises_value_error(pool):
    """chunksize=0 (or negative) raises ValueError at the call, for every mapping method."""
    for call in (pool.map, pool.map_async, pool.imap, pool.imap_unordered):
        with pytest.raises(ValueError):
            call(sqr, range(5), 0)
    for call in (pool.starmap, pool.starmap_async):
        with pytest.raises(ValueError):
            call(mul, [(1, 2)], -1)


class Broken(Exception):
    """What the failing input iterator raises."""


def breaks_at_five():
    yield from range(5)
    raise Broken("input broke")


def test_input_iterator_raising_midway(pool):
    """An input iterator that raises: imap yields every result before that item, then raises
    the iterator's own exception (imap_unordered the same, in any order); map and map_async
    raise it."""
    it = pool.imap(sqr, breaks_at_five(), chunksize=1)
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    with pytest.raises(Broken):
        next(it)
    it = pool.imap_unordered(sqr, breaks_at_five(), chunksize=1)
    assert sorted(next(it) for _ in range(5)) == [0, 1, 4, 9, 16]
    with pytest.raises(Broken):
        next(it)
    with pytest.raises(Broken):
        pool.map(sqr, breaks_at_five())
    errors = []
    with pytest.raises(Broken):
        pool.map_async(sqr, breaks_at_five(), error_callback=errors.append).get(60)
    assert len(errors) == 1 and isinstance(errors[0], Broken)


def test_unpicklable_arguments_raise_in_the_caller(pool):
    """Arguments that cannot be pickled raise in the caller (never hang), for apply and map."""
    with pytest.raises(TypeError, match="cannot be pickled"):
        pool.apply(sqr, (Unpicklable(),))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pool.map(sqr, [1, 2, Unpicklable()])
    assert pool.apply(sqr, (3,)) == 9


def test_exception_that_cannot_be_rebuilt_is_remote_error(pool):
    """A task exception that cannot be rebuilt in the caller arrives as RemoteError naming it."""
    with pytest.raises(RemoteError, match="NoRebuildError"):
        pool.apply(raise_no_rebuild, (1,))
    errors = []
    res = pool.map_async(raise_no_rebuild, [1], error_callback=errors.append)
    with pytest.raises(RemoteError):
        res.get(60)
    assert isinstance(errors[0], RemoteError)


def test_invalid_arguments():
    """processes below 1, a non-callable initializer and a non-positive maxtasksperchild are
    refused as the stdlib refuses them, before any connection is made."""
    with pytest.raises(ValueError):
        achilles.Pool(0)
    with pytest.raises(ValueError):
        achilles.Pool(-1)
    with pytest.raises(TypeError):
        achilles.Pool(initializer=3)
    with pytest.raises(ValueError):
        achilles.Pool(maxtasksperchild=0)


def test_pool_cannot_be_pickled(pool):
    """Pickling a pool raises NotImplementedError, as the stdlib's does."""
    with pytest.raises(NotImplementedError):
        pickle.dumps(pool)


def test_unclosed_pool_warns(shared_cluster):
    """A running pool that is garbage-collected gives a ResourceWarning."""
    p = achilles.Pool(cluster=shared_cluster)
    with pytest.warns(ResourceWarning):
        del p
        gc.collect()


def test_pool_on_a_named_server_and_in_a_with_block(shared_cluster):
    """Pool(host=, port=, username=, secret_key=) opens a connection of its own; without
    arguments inside ``with achilles.connect(...)`` it runs on that block's cluster."""
    named = dict(host="127.0.0.1", port=shared_cluster.port, username="local",
                 secret_key=shared_cluster._secret)
    with achilles.Pool(**named) as p:
        assert p._backend.cluster is not shared_cluster.cluster
        assert p.map(sqr, range(4)) == [0, 1, 4, 9]
    with achilles.connect(**named) as block:
        with achilles.Pool() as p:
            assert p._backend.cluster is block
            assert p.starmap(mul, [(2, 3)]) == [6]


def test_local_true_starts_and_stops_its_own_cluster(tmp_path, monkeypatch):
    """With nothing configured, Pool(local=True) starts a LocalCluster of ``processes``
    worker processes and terminate() stops it; without local=True it is a ConfigError."""
    monkeypatch.chdir(tmp_path)
    for var in ("ACHILLES_SECRET_KEY", "ACHILLES_ENV_FILE", "ACHILLES_HOST", "ACHILLES_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError):
        achilles.Pool()
    p = achilles.Pool(2, local=True)
    try:
        local = p._backend._owned
        assert isinstance(local, achilles.LocalCluster)
        pids = [local.server.pid] + [n.pid for n in local.nodes]
        assert p.map(sqr, range(6)) == [x * x for x in range(6)]
        assert local.cluster.status()["nodes"][0]["processes"] == 2
    finally:
        p.terminate()
    for pid in pids:
        assert not group_members(pid)


@pytest.mark.timeout(180)
def test_example_runs_unchanged_but_for_the_import(shared_cluster):
    """examples/dropin_pool.py, written for multiprocessing.Pool, prints the same on the
    cluster as with ``from multiprocessing import Pool``."""
    script = os.path.join(ROOT, "examples", "dropin_pool.py")
    env = dict(os.environ, ACHILLES_HOST="127.0.0.1", ACHILLES_PORT=str(shared_cluster.port),
               ACHILLES_USERNAME="local", ACHILLES_SECRET_KEY=shared_cluster._secret,
               PYTHONPATH=ROOT)
    env.pop("ACHILLES_ENV_FILE", None)
    runs = [subprocess.run([sys.executable, script, *flag], env=env, capture_output=True,
                           text=True, timeout=150, cwd=ROOT) for flag in ([], ["--stdlib"])]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    assert runs[0].stdout == runs[1].stdout
    assert "apply_async" in runs[0].stdout
