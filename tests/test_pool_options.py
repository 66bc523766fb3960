"""Per-job options of map/imap/imap_unordered (initializer, maxtasksperchild, max_active,
group) and the stdlib Pool edge cases the cluster core handles, on a real local cluster."""

from __future__ import annotations

import collections
import os
import threading

import pytest

import achilles
from pool_tasks import failing_init, init_worker, pid_of, running, tagged
from tasks import square

pytestmark = pytest.mark.timeout(120)


def init_counts(log_dir):
    """How many times the initializer ran in each process (pid -> calls)."""
    return collections.Counter(int(name.split("-")[0]) for name in os.listdir(log_dir))


# --- initializer ------------------------------------------------------------------------------

def test_initializer_runs_once_per_worker_process_not_per_task(cluster, tmp_path):
    """initializer(*initargs) runs exactly once in each worker process that runs the job's
    items, before its first one: every item sees the state it set, each process that ran an
    item counts one call, and there are far fewer calls than items."""
    out = cluster.map(tagged, range(400), chunksize=1, initializer=init_worker,
                      initargs=(str(tmp_path), "A"))
    assert [x for _, _, x in out] == list(range(400))
    assert {tag for _, tag, _ in out} == {"A"}
    counts = init_counts(tmp_path)
    assert set(counts.values()) == {1}, counts
    assert set(counts) == {pid for pid, _, _ in out}
    assert sum(counts.values()) <= 4 < 400  # 2 nodes x 2 processes


@pytest.mark.parametrize("call", ["imap", "imap_unordered"])
def test_initializer_on_imap(cluster, tmp_path, call):
    """imap and imap_unordered take the same initializer and run it once per process."""
    out = list(getattr(cluster, call)(tagged, range(100), initializer=init_worker,
                                      initargs=(str(tmp_path), "B")))
    assert sorted(x for _, _, x in out) == list(range(100))
    assert {tag for _, tag, _ in out} == {"B"}
    assert set(init_counts(tmp_path).values()) == {1}


def test_a_group_shares_initializer_state_across_jobs(cluster, tmp_path):
    """Jobs with the same group run the initializer once per process over all of them;
    without a group each job runs its own."""
    shared, separate = tmp_path / "shared", tmp_path / "separate"
    shared.mkdir()
    separate.mkdir()
    pids = set()
    for _ in range(3):
        out = cluster.map(tagged, range(100), chunksize=1, initializer=init_worker,
                          initargs=(str(shared), "G"), group="pool-1")
        assert {tag for _, tag, _ in out} == {"G"}
        pids |= {pid for pid, _, _ in out}
    assert set(init_counts(shared).values()) == {1}
    assert set(init_counts(shared)) == pids
    for _ in range(3):
        cluster.map(tagged, range(100), chunksize=1, initializer=init_worker,
                    initargs=(str(separate), "S"))
    assert max(init_counts(separate).values()) > 1  # the same processes ran it per job


def test_failing_initializer_raises_its_own_error(cluster):
    """An initializer that raises fails the job with that exception, naming the initializer."""
    with pytest.raises(LookupError, match="no model to load") as info:
        cluster.map(square, range(10), initializer=failing_init)
    assert any("initializer" in note for note in getattr(info.value, "__notes__", []))
    assert cluster.map(square, range(5)) == [0, 1, 4, 9, 16]


# --- maxtasksperchild -------------------------------------------------------------------------

@pytest.mark.parametrize("chunksize", [None, 1])
def test_maxtasksperchild_replaces_workers(cluster, chunksize):
    """With maxtasksperchild=3 no worker process runs more than 3 of the job's items: the
    processes are replaced, so many more pids than processes appear."""
    out = cluster.map(pid_of, range(60), chunksize=chunksize, maxtasksperchild=3)
    per_pid = collections.Counter(out)
    assert max(per_pid.values()) <= 3
    assert len(per_pid) >= 20


def test_chunk_larger_than_maxtasksperchild_runs_on_a_fresh_process(cluster):
    """An explicit chunksize above maxtasksperchild runs each chunk whole on its own process."""
    out = cluster.map(pid_of, range(40), chunksize=5, maxtasksperchild=2)
    chunks = [out[i:i + 5] for i in range(0, 40, 5)]
    assert all(len(set(c)) == 1 for c in chunks)
    assert len({c[0] for c in chunks}) == 8


def test_maxtasksperchild_with_initializer_reinitializes_new_processes(cluster, tmp_path):
    """A replacement process runs the initializer again before its first item."""
    out = cluster.map(tagged, range(30), chunksize=1, maxtasksperchild=2,
                      initializer=init_worker, initargs=(str(tmp_path), "M"))
    assert {tag for _, tag, _ in out} == {"M"}
    counts = init_counts(tmp_path)
    assert set(counts.values()) == {1}
    assert set(counts) == {pid for pid, _, _ in out}
    assert len(counts) >= 15


# --- max_active -------------------------------------------------------------------------------

def test_max_active_caps_concurrency(cluster, tmp_path):
    """max_active=2 on a 4-process cluster: never more than 2 items of the job run at once."""
    seen = cluster.map(running, [(str(tmp_path), i) for i in range(40)], chunksize=1,
                       max_active=2)
    assert len(seen) == 40 and max(seen) <= 2


def test_max_active_status_shows_the_cap_and_held_chunks(cluster, tmp_path):
    """While a capped job runs, the server shows at most max_active chunks running and holds
    the rest queued."""
    it = cluster.imap(running, [(str(tmp_path), i) for i in range(60)], chunksize=1,
                      max_active=1)
    first = next(it)
    views = []
    for _ in range(5):
        jobs = [j for j in cluster.status()["jobs"] if j["max_active"] == 1]
        views += jobs
        next(it)
    rest = list(it)
    assert first == 1 and max(rest) == 1
    assert views and all(j["running"] <= 1 for j in views)
    assert any(j["queued"] > 0 for j in views)


def test_a_group_shares_one_max_active_cap(cluster, tmp_path):
    """Two jobs running at once in one group with max_active=2 run at most 2 items together."""
    items = [(str(tmp_path), i) for i in range(30)]
    results = {}

    def run(name):
        results[name] = list(cluster.imap_unordered(running, items, chunksize=1, max_active=2,
                                                    group="capped"))

    threads = [threading.Thread(target=run, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert sorted(results) == ["a", "b"]
    assert max(results["a"] + results["b"]) <= 2


# --- checked in the caller --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error", [
    ({"initializer": 5}, TypeError),
    ({"initializer": print, "initargs": 5}, TypeError),
    ({"initializer": print, "initargs": "ab"}, TypeError),
    ({"initargs": (1,)}, ValueError),
    ({"maxtasksperchild": 0}, ValueError),
    ({"maxtasksperchild": 1.5}, TypeError),
    ({"max_active": -1}, ValueError),
    ({"max_active": "2"}, TypeError),
    ({"group": 7}, TypeError),
    ({"chunksize": 0}, ValueError),
    ({"chunksize": -3}, ValueError),
    ({"chunksize": 2.0}, TypeError),
    ({"processes": 2}, TypeError),
])
@pytest.mark.parametrize("call", ["map", "imap", "imap_unordered"])
def test_bad_options_raise_in_the_caller(cluster, call, kwargs, error):
    """An unknown or ill-typed option raises TypeError/ValueError at the call, like Pool."""
    before = len(cluster.status()["jobs"])
    with pytest.raises(error):
        getattr(cluster, call)(square, range(10), **kwargs)
    assert len(cluster.status()["jobs"]) == before


def test_module_level_calls_take_the_options_and_refuse_unknown_ones():
    """achilles.map/imap/imap_unordered take the same keywords; an unknown one is a TypeError
    before any connection is made."""
    for fn in (achilles.map, achilles.imap, achilles.imap_unordered):
        with pytest.raises(TypeError):
            fn(square, [1], maxtasks=2)


def test_unpicklable_initargs_raise_in_the_caller(cluster):
    """initargs that cannot be pickled raise in the caller; no job reaches the server."""
    with pytest.raises(TypeError, match="pickle"):
        cluster.map(square, range(3), initializer=init_worker,
                    initargs=((x for x in ()), "x"))
    assert cluster.status()["jobs"] == []


# --- stdlib edge cases ------------------------------------------------------------------------

class Boom(Exception):
    """The input iterator's own error."""


def failing_input(n_good):
    yield from range(n_good)
    raise Boom(f"input broke after {n_good} items")


def test_empty_input_returns_at_once_without_a_node(make_cluster):
    """An empty iterable returns at once, even with no node connected to run anything."""
    lc = make_cluster(nodes=0)
    assert lc.cluster.map(square, []) == []
    assert list(lc.cluster.imap(square, iter(()))) == []
    assert list(lc.cluster.imap_unordered(square, (x for x in ()))) == []
    assert lc.cluster.status()["jobs"] == []


@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_imap_yields_every_result_before_a_failing_input_item(cluster, chunksize):
    """An input iterator that raises after 10 items: imap yields the 10 results, in order,
    then raises the iterator's own exception; nothing stays on the server."""
    it = cluster.imap(square, failing_input(10), chunksize=chunksize)
    got = []
    with pytest.raises(Boom, match="after 10 items"):
        for value in it:
            got.append(value)
    assert got == [x * x for x in range(10)]
    assert cluster.status()["jobs"] == []


def test_imap_unordered_and_map_raise_the_input_error_after_the_results(cluster):
    """imap_unordered yields all 10 results before the iterator's exception; map raises it."""
    got = []
    with pytest.raises(Boom):
        for value in cluster.imap_unordered(square, failing_input(10)):
            got.append(value)
    assert sorted(got) == [x * x for x in range(10)]
    with pytest.raises(Boom):
        cluster.map(square, failing_input(5))
    with pytest.raises(Boom):  # raising before the first item
        list(cluster.imap(square, failing_input(0)))


def test_unpicklable_argument_raises_in_the_caller_after_earlier_results(cluster):
    """An argument that cannot be pickled raises its pickling error in the caller (naming
    the item) after the results of the items before it; nothing hangs or stays queued."""
    from pool_tasks import Unpicklable

    items = [0, 1, 2, Unpicklable(), 4]
    got = []
    with pytest.raises(TypeError, match="cannot be pickled") as info:
        for value in cluster.imap(square, items, chunksize=2):
            got.append(value)
    assert got == [0, 1, 4]
    assert any("item 3" in note for note in getattr(info.value, "__notes__", []))
    with pytest.raises(TypeError):
        cluster.map(square, [Unpicklable()])
    assert cluster.status()["jobs"] == []


def test_unpicklable_result_raises_in_the_caller_after_earlier_results(cluster):
    """A result that cannot be pickled on the node raises in the caller, after the results
    before it, naming the item."""
    from pool_tasks import make_unpicklable

    got = []
    with pytest.raises(TypeError, match="cannot be pickled") as info:
        for value in cluster.imap(make_unpicklable, range(6), chunksize=6):
            got.append(value)
    assert got == [0, 1, 2]
    assert any("item 3" in note for note in getattr(info.value, "__notes__", []))
    assert cluster.map(square, range(3)) == [0, 1, 4]


def test_unpicklable_function_raises_in_the_caller(cluster):
    """A function that cannot be pickled raises at the call; no job is started."""
    from pool_tasks import Unpicklable

    class Callable_(Unpicklable):
        def __call__(self, x):
            return x

    with pytest.raises(TypeError):
        cluster.map(Callable_(), range(3))
    assert cluster.status()["jobs"] == []


def test_exception_that_cannot_be_rebuilt_is_remote_error(cluster):
    """An exception that pickles on the node but cannot be rebuilt in the caller arrives as
    RemoteError with its type name, message and remote traceback."""
    from pool_tasks import raise_no_rebuild

    with pytest.raises(achilles.RemoteError) as info:
        cluster.map(raise_no_rebuild, [1])
    assert info.value.type_name.endswith("NoRebuildError")
    assert info.value.message == "lost in transit"
    assert "raise_no_rebuild" in info.value.traceback


def test_closing_a_running_imap_frees_the_nodes(cluster, tmp_path):
    """Closing an imap with many slow items queued drops them on the server: the job leaves
    status, and a new map runs on all processes without waiting for the old items."""
    it = cluster.imap(running, [(str(tmp_path), i) for i in range(10_000)], chunksize=1)
    next(it)
    it.close()
    assert cluster.status()["jobs"] == []
    assert cluster.map(square, range(20)) == [x * x for x in range(20)]
    assert all(n["busy"] == 0 for n in cluster.status()["nodes"])


def test_result_that_cannot_be_unpickled_raises_in_the_caller(cluster):
    """A result that fails to unpickle in the caller raises there and cancels the job."""
    from pool_tasks import loads_badly

    with pytest.raises(RuntimeError, match="cannot be rebuilt here"):
        cluster.map(loads_badly, range(5))
    assert cluster.status()["jobs"] == []
