"""The Pool API over a real local cluster: results, order, inputs, chunking, callbacks, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import achilles
from achilles.core.errors import RemoteError, RemoteTraceback
from conftest import poll, wait_for
from tasks import (
    TaskFailure, add_one, delayed, fail_on_three, gated, pause, slow_square, square,
    unpicklable_error, where,
)

pytestmark = pytest.mark.timeout(90)


def gen(n):
    for i in range(n):
        yield i


def gen500():
    yield from range(500)


@pytest.mark.parametrize("make_input", [
    lambda: range(500), lambda: list(range(500)), lambda: gen(500), lambda: gen500,
], ids=["range", "list", "generator", "generator-function"])
def test_map_imap_over_inputs(cluster, make_input):
    """map and imap return f(x) for every input kind, in input order; imap_unordered returns
    the same multiset."""
    expected = [x * x for x in range(500)]
    assert cluster.map(square, make_input()) == expected
    assert list(cluster.imap(square, make_input())) == expected
    assert sorted(cluster.imap_unordered(square, make_input())) == expected


def test_generator_function_is_called(cluster):
    """A generator *function* passed as the input is called by the controller."""
    def numbers():
        yield from (1, 2, 3)
    assert cluster.map(add_one, numbers) == [2, 3, 4]


class InputBroke(Exception):
    """What the input below raises."""


def test_input_that_raises_inside_a_chunk_keeps_the_items_before_it(cluster):
    """An input that raises partway through a chunk's items: imap yields the results of every
    item read before the exception (also those of the chunk it broke), then raises it."""
    def six_then_break():
        yield from range(6)
        raise InputBroke("the input broke after six items")
    it = cluster.imap(square, six_then_break(), chunksize=4)
    assert [next(it) for _ in range(6)] == [0, 1, 4, 9, 16, 25]
    with pytest.raises(InputBroke):
        next(it)


def test_list_item_is_one_argument(cluster):
    """Each item is passed as one argument, as in multiprocessing.Pool.map."""
    assert cluster.map(len, [[1, 2], (1, 2, 3), "abcd"]) == [2, 3, 4]


def test_empty_input(cluster):
    """Empty input gives an empty result for every call."""
    assert cluster.map(square, []) == []
    assert list(cluster.imap(square, iter(()))) == []
    assert list(cluster.imap_unordered(square, range(0))) == []


@pytest.mark.parametrize("chunksize", [1, 7, 10_000])
def test_chunksize(cluster, chunksize):
    """Explicit chunk sizes (1, odd, larger than the input) do not change results or order."""
    assert cluster.map(square, range(300), chunksize=chunksize) == [x * x for x in range(300)]
    assert list(cluster.imap(square, range(300), chunksize=chunksize)) == [x * x for x in range(300)]


def test_imap_unordered_is_completion_order(cluster, tmp_path):
    """imap_unordered yields an item that has finished before one submitted earlier that is
    still running (item 0 runs until the test opens its gate, item 1's is open)."""
    (tmp_path / "1").touch()
    it = cluster.imap_unordered(gated, [(i, str(tmp_path), 1) for i in range(2)], chunksize=1)
    assert next(it) == 1
    (tmp_path / "0").touch()
    assert list(it) == [0]


def test_imap_yields_before_job_ends(cluster):
    """imap gives the first result while later items are still running."""
    it = cluster.imap(delayed, [0.0] + [1.0] * 3, chunksize=1)
    assert next(it) == 0.0
    status = cluster.status()
    assert any(job["done"] < 4 for job in status["jobs"]), status
    assert list(it) == [1.0] * 3


def test_callback_runs_on_node(cluster):
    """callback is applied on the node to each result before it is returned."""
    parent = os.getpid()
    out = cluster.map(square, range(20), callback=lambda r: (r, os.getpid()))
    assert [r for r, _ in out] == [x * x for x in range(20)]
    assert all(pid != parent for _, pid in out)
    assert list(cluster.imap_unordered(add_one, [1], callback=str)) == ["2"]


def test_closures_and_lambdas(cluster):
    """Closures and lambdas capturing local state are shipped with dill."""
    base = 10
    factor = {"k": 3}

    def scaled(x):
        return (x + base) * factor["k"]

    assert cluster.map(scaled, range(5)) == [(x + 10) * 3 for x in range(5)]
    assert cluster.map(lambda x: x - base, [10, 11]) == [0, 1]


def test_main_script_lambdas(tmp_path):
    """Functions, lambdas and closures defined in a script's __main__ work (shipped by value)."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import achilles

        def cube(x):
            return x ** 3

        def make_adder(n):
            return lambda x: x + n

        if __name__ == "__main__":
            with achilles.LocalCluster(nodes=1, processes=2) as c:
                print(c.map(cube, range(4)), c.map(lambda x: -x, [1, 2]),
                      list(c.imap(make_adder(100), [1])))
    """))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(achilles.__file__)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1, 8, 27] [-1, -2] [101]"


def test_exception_type_message_and_traceback(cluster):
    """A failing item raises its own exception type, message and remote traceback in the caller."""
    with pytest.raises(TaskFailure, match="item 3 is bad") as info:
        cluster.map(fail_on_three, range(10), chunksize=2)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on_three" in cause.tb and "raise TaskFailure" in cause.tb
    assert any("item 3" in note for note in getattr(info.value, "__notes__", []))


def test_imap_yields_results_before_the_error(cluster):
    """imap yields every result before the failing item, then raises at its position."""
    it = cluster.imap(fail_on_three, range(10), chunksize=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TaskFailure):
        next(it)


def test_unrebuildable_exception_is_remote_error(cluster):
    """An exception that cannot be pickled arrives as RemoteError naming the type."""
    with pytest.raises(RemoteError) as info:
        cluster.map(unpicklable_error, [1])
    assert info.value.type_name == "tasks.TwoArgError" and "cannot be rebuilt" in str(info.value)
    assert "unpicklable_error" in info.value.traceback


def test_failed_job_is_cancelled_and_cluster_keeps_serving(cluster):
    """After a failure the rest of that job is dropped and the next job runs normally."""
    with pytest.raises(ZeroDivisionError):
        cluster.map(lambda x: 1 / (x - 5), range(10_000))
    wait_for(lambda: cluster.status()["jobs"] == [], what="the failed job to be dropped")
    assert cluster.map(add_one, range(3)) == [1, 2, 3]


def test_abandoned_imap_is_cancelled(cluster):
    """Closing an imap iterator early cancels the job on the server."""
    it = cluster.imap(slow_square, range(100_000), chunksize=1)
    next(it)
    it.close()
    wait_for(lambda: cluster.status()["jobs"] == [], what="the abandoned job to be cancelled")


def test_two_nodes_share_a_job(cluster, shared_cluster):
    """Both nodes of a two-node cluster run part of one job."""
    before = {n["name"]: n["done"] for n in cluster.status()["nodes"]}
    pids = set(cluster.map(where, range(200), chunksize=5))
    after = {n["name"]: n["done"] for n in cluster.status()["nodes"]}
    assert len(after) == 2
    assert all(after[name] > before.get(name, 0) for name in after), (before, after)
    assert len(pids) >= 3


def test_two_controllers_at_once(shared_cluster):
    """Two controllers (two connections) run jobs at the same time on the same nodes."""
    from achilles.controller.cluster import Cluster

    second = Cluster(shared_cluster.cluster.config)
    results = {}

    def run(name, c, offset):
        results[name] = c.map(lambda x: (pause(0.002), x + offset)[1], range(400), chunksize=4)

    try:
        threads = [threading.Thread(target=run, args=("a", shared_cluster.cluster, 0)),
                   threading.Thread(target=run, args=("b", second, 1000))]
        for t in threads:
            t.start()
        seen = []

        def done_watching() -> bool:
            seen.append(len(shared_cluster.cluster.status()["jobs"]))
            return not any(t.is_alive() for t in threads)

        poll(done_watching, 30, 0.01)
        seen_two = 2 in seen
        for t in threads:
            t.join(30)
    finally:
        second.close()
    assert results["a"] == list(range(400))
    assert results["b"] == [x + 1000 for x in range(400)]
    assert seen_two, "the two jobs never ran at the same time"


def test_status_is_json(cluster):
    """status() is JSON-serializable with the documented fields."""
    status = json.loads(json.dumps(cluster.status()))
    assert set(status) >= {"nodes", "jobs"}
    for node in status["nodes"]:
        assert {"name", "address", "processes", "busy", "done"} <= set(node)
    it = cluster.imap(slow_square, range(50), chunksize=1)
    next(it)
    jobs = cluster.status()["jobs"]
    assert jobs and {"id", "owner", "function", "sent", "done", "failed"} <= set(jobs[0])
    assert "slow_square" in jobs[0]["function"]
    it.close()


def test_node_joins_mid_job(make_cluster):
    """A node that joins while a job runs gets chunks of it at once."""
    lc = make_cluster(nodes=1, processes=1)
    c = lc.cluster
    it = c.imap(where, range(3000), chunksize=2)
    first = next(it)
    lc.add_node(processes=1, name="late")
    lc.wait_for_nodes(2)
    pids = {first} | set(it)
    late = [n for n in c.status()["nodes"] if n["name"] == "late"]
    assert late and late[0]["done"] > 0
    assert len(pids) == 2


def test_status_shows_each_node_host_load(cluster):
    """Nodes report their host's load average, CPUs and memory (NODE_LOAD), and status
    shows the latest report per node."""
    wait_for(lambda: all(n["load"] for n in cluster.status()["nodes"]), what="load reports")
    for n in cluster.status()["nodes"]:
        load = n["load"]
        assert load["cpus"] == os.cpu_count()
        assert load["load1"] >= 0
        assert load["mem_total"] > load["mem_available"] > 0


def test_tasks_run_with_cpythons_collector_settings(cluster):
    """The node's reactor process tunes its garbage collector (achilles.core.gctune); the worker
    processes where users' code runs keep CPython's default thresholds."""
    from achilles.core.gctune import CPYTHON_THRESHOLDS

    seen = set(cluster.map(lambda _: __import__("gc").get_threshold(), range(8), chunksize=1))
    assert seen == {CPYTHON_THRESHOLDS}


def test_settle_freezes_and_raises_the_young_threshold():
    """gctune.settle() collects, freezes what start-up allocated and raises the young
    generation's threshold, keeping the older ones."""
    code = ("import gc; from achilles.core import gctune; old = gc.get_threshold(); "
            "gctune.settle(); print(gc.get_freeze_count() > 0, gc.get_threshold()[0], "
            "gc.get_threshold()[1:] == old[1:])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from achilles.core.gctune import YOUNG_THRESHOLD

    assert out.stdout.split() == ["True", str(YOUNG_THRESHOLD), "True"], out.stderr
