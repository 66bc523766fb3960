"""Call graphs, futures and dataflow on a real local cluster."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import pytest

from achilles import TaskTimeout, dataflow, task, workflow
from achilles.core.errors import RemoteTraceback, ResourceUnavailable
from tasks import TaskFailure, pause, record

pytestmark = pytest.mark.timeout(120)


@task
def num(n):
    return n


@task
def add(a, b):
    return a + b


@task
def total(values):
    return sum(values)


@task
def counted(path, value):
    record(path, value)
    return value


@task
def explode(x):
    raise TaskFailure(f"bad input {x}")


@task(timeout=1.0)
def spin():
    while True:
        pass


@task
def describe(a, b=None, *, items=(), mapping=None):
    return {"a": a, "b": b, "items": list(items), "mapping": mapping}


def test_nested_and_imperative_graphs(cluster):
    """Nested and imperative spellings build the same graph and give the same value."""
    nested = add(add(num(6), num(1)), add(num(5), num(-2)))
    x = add(num(6), num(1))
    y = add(num(5), num(-2))
    imperative = add(x, y)
    assert cluster.compute(nested) == [10]
    assert cluster.compute(imperative) == [10]
    assert nested.result(cluster) == 10 and imperative.result(cluster) == 10


def test_default_cluster_and_entangle_spelling(shared_cluster, monkeypatch):
    """g.result() and g() run on the default connection."""
    monkeypatch.setattr("achilles.api._default", shared_cluster.cluster)
    g = add(num(2), num(3))
    assert g.result() == 5
    assert g() == 5


def test_diamond_runs_shared_task_once(cluster, tmp_path):
    """A lazy call used twice in a graph runs once and both consumers get its value."""
    path = str(tmp_path / "runs")
    shared = counted(path, 21)
    assert cluster.compute(add(shared, shared)) == [42]
    with open(path) as fh:
        assert fh.read().split() == ["21"]


def test_compute_shares_common_parts(cluster, tmp_path):
    """cluster.compute(g1, g2) runs a sub-graph they share once."""
    path = str(tmp_path / "runs")
    common = counted(path, 5)
    assert cluster.compute(add(common, num(1)), add(common, num(2))) == [6, 7]
    with open(path) as fh:
        assert fh.read().split() == ["5"]


@pytest.mark.parametrize("leaves", [512, 5000])
def test_large_reduction_trees(cluster, leaves):
    """Graphs of ~1,000 and ~10,000 tasks (a reduction tree) give the right value."""
    layer = [num(i) for i in range(leaves)]
    count = len(layer)
    while len(layer) > 1:
        nxt = [add(layer[i], layer[i + 1]) for i in range(0, len(layer) - 1, 2)]
        if len(layer) % 2:
            nxt.append(layer[-1])
        layer = nxt
        count += len(nxt)
    assert count >= 2 * leaves - 1
    assert cluster.compute(layer[0]) == [sum(range(leaves))]


def test_wide_fan_in(cluster):
    """One task over 500 lazy inputs (in a list) gets all their values."""
    assert cluster.compute(total([num(i) for i in range(500)])) == [sum(range(500))]


def test_lazy_calls_in_containers_and_kwargs(cluster):
    """Lazy calls inside lists, tuples, dicts and keyword arguments are resolved."""
    g = describe(num(1), b=num(2), items=(num(3), [num(4)]),
                 mapping={"x": num(5), "nested": {"y": [num(6)]}})
    assert cluster.compute(g) == [{"a": 1, "b": 2, "items": [3, [4]],
                                   "mapping": {"x": 5, "nested": {"y": [6]}}}]


def test_falsy_values(cluster):
    """0, '', None and [] are ordinary values between tasks."""
    for value in (0, "", None, [], False):
        assert cluster.compute(num(num(value))) == [value]
    assert cluster.compute(add(num(0), num(0))) == [0]


def test_error_propagates_and_other_branches_finish(cluster, tmp_path):
    """A failing task raises its own type with the remote traceback and its position in the
    graph; its dependents do not run; an independent branch still runs; nothing hangs."""
    path = str(tmp_path / "runs")
    bad = explode(7)
    downstream = counted(path, add(bad, num(1)))
    other = counted(path, 99)
    with pytest.raises(TaskFailure, match="bad input 7") as info:
        cluster.compute(add(downstream, other))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "explode" in info.value.__cause__.tb
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert f"explode#{bad.id}" in notes and "arg 0 of add" in notes
    with open(path) as fh:
        assert fh.read().split() == ["99"]
    states = {t["name"]: t["state"] for t in add(downstream, other).graph()["tasks"]}
    assert states["explode"] == "failed"


def test_timeout_kills_task_and_node_serves(make_cluster):
    """A task past its timeout has its worker killed and fails with TaskTimeout naming it;
    the node goes on serving with both processes."""
    lc = make_cluster(nodes=1, processes=2)
    with pytest.raises(TaskTimeout, match="spin"):
        lc.cluster.compute(spin())
    assert lc.cluster.map(abs, range(-4, 0), chunksize=1) == [4, 3, 2, 1]
    assert lc.cluster.compute(add(num(1), num(1))) == [2]


def test_retries_with_delay(cluster, tmp_path):
    """A task with retries=2 re-runs after retry_delay until it succeeds; the attempts are
    counted and spaced by at least the delay."""
    path = str(tmp_path / "attempts")

    @task(retries=2, retry_delay=0.5)
    def flaky(p):
        record(p, time.time())
        with open(p) as fh:
            if len(fh.read().split()) < 3:
                raise TaskFailure("not yet")
        return "ok"

    g = flaky(path)
    assert cluster.compute(g) == ["ok"]
    with open(path) as fh:
        times = [float(t) for t in fh.read().split()]
    assert len(times) == 3
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:]))
    assert g.graph()["tasks"][0]["attempts"] == 3


def test_retries_exhausted_raise_last_error(cluster, tmp_path):
    """After the retries, the last error is raised."""
    path = str(tmp_path / "attempts")

    @task(retries=1)
    def always(p):
        record(p, "x")
        with open(p) as fh:
            raise TaskFailure(f"attempt {len(fh.read().split())}")

    with pytest.raises(TaskFailure, match="attempt 2"):
        cluster.compute(always(path))


def test_resources_limit_concurrency(make_cluster, tmp_path):
    """On a node with gpu=1 and 2 processes, gpu tasks never overlap; plain tasks still use
    both processes."""
    lc = make_cluster(nodes=1, processes=2, resources="gpu=1")

    @task(resources={"gpu": 1})
    def on_gpu(i):
        start = time.time()
        pause(0.15)
        return start, time.time()

    spans = lc.cluster.compute(*[on_gpu(i) for i in range(4)])
    spans.sort()
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), spans

    @task
    def plain(i, folder):
        # Side by side: each starts, then waits (up to 30 s) for the other to have started.
        import os
        open(os.path.join(folder, f"plain-{i}"), "w").close()
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(folder, f"plain-{1 - i}")):
            if time.time() > deadline:
                return False
            pause(0.005)
        return True

    met = lc.cluster.compute(*[plain(i, str(tmp_path)) for i in range(2)])
    assert met == [True, True], "plain tasks should run side by side"


def test_impossible_resource_fails_fast(cluster):
    """A task asking for a resource no node has fails with ResourceUnavailable at once."""
    @task(resources={"tpu": 4})
    def needs_tpu():
        return 1

    with pytest.raises(ResourceUnavailable, match="tpu=4"):
        cluster.compute(add(needs_tpu(), num(1)))


def test_futures_and_callbacks(cluster):
    """g.future(), cluster.submit_graph and cluster.submit return concurrent.futures.Futures
    that work with add_done_callback, as_completed and wait."""
    seen = []
    done = threading.Event()
    f1 = add(num(1), num(2)).future(cluster)
    f1.add_done_callback(lambda f: (seen.append(f.result()), done.set()))
    f2 = cluster.submit_graph(add(num(3), num(4)))
    f3 = cluster.submit(pow, 2, 8)
    f4 = cluster.submit(explode, 1)
    results = {f.result() for f in concurrent.futures.as_completed([f1, f2, f3])}
    assert results == {3, 7, 256}
    concurrent.futures.wait([f4])
    assert isinstance(f4.exception(), TaskFailure)
    assert done.wait(10) and seen == [3]


def test_workflow_composition(cluster):
    """A workflow passed to another workflow (uncalled) is spliced into its graph."""
    @workflow
    def first():
        return add(num(1), num(2))

    @workflow
    def second(flow, extra):
        return add(flow(), num(extra))

    @workflow
    def third(flow):
        return add(flow, num(100))

    assert cluster.compute(second(first, 10)) == [13]
    assert cluster.compute(third(first)) == [103]


def test_graph_description(cluster):
    """graph() is JSON-serializable with names, edges, literal args and, after a run, each
    task's state, node and duration."""
    a = num(6)
    g = add(a, num(1))
    before = json.loads(json.dumps(g.graph()))
    assert {t["name"] for t in before["tasks"]} == {"num", "add"}
    assert [a.id, g.id] in before["edges"]
    assert {"args": [6]}.items() <= next(t for t in before["tasks"] if t["id"] == a.id).items()
    cluster.compute(g)
    after = g.graph()
    assert all(t["state"] == "done" and t["node"] and t["duration"] is not None
               for t in after["tasks"])


@dataflow
def start(x):
    return x + 1


@dataflow
def double(v):
    return v * 2


@dataflow
def negate(v):
    return -v


def test_dataflow_fan_out_and_branching(cluster):
    """flow(x) runs the root first and its result feeds its children in parallel; leaves come
    back by name; a callable child picks the branch at run time; a flow can run again."""
    flow = start(double(), negate())
    assert flow(1, cluster=cluster) == {"double": 4, "negate": -2}
    assert flow(10, cluster=cluster) == {"double": 22, "negate": -11}
    branch = start(lambda v: double() if v > 0 else negate())
    assert branch(1, cluster=cluster) == {"double": 4}
    assert branch(-5, cluster=cluster) == {"negate": 4}
    deep = start(double(negate()), negate())
    assert deep(3, cluster=cluster) == {"start/double/negate": -8, "start/negate": -4}


def test_two_controllers_graphs_at_once(shared_cluster):
    """Graphs from two controllers run side by side on the same nodes."""
    from achilles.controller.cluster import Cluster

    other = Cluster(shared_cluster.cluster.config)
    out = {}
    try:
        def run(name, c, k):
            out[name] = c.compute(total([add(num(i), num(k)) for i in range(300)]))[0]
        threads = [threading.Thread(target=run, args=("a", shared_cluster.cluster, 0)),
                   threading.Thread(target=run, args=("b", other, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        other.close()
    assert out == {"a": sum(range(300)), "b": sum(range(300)) + 300}
