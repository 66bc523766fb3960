"""Batches of fast graph tasks: the server's bookkeeping driven directly (random events, every
invariant after each step), and real clusters (values, failures, a node lost mid-batch)."""

from __future__ import annotations

import collections
import os
import pickle
import random
import re
import signal

import pytest

from achilles import task
from achilles.core import wire
from achilles.core.errors import RemoteTraceback
from achilles.core.serialization import error_record
from achilles.server.graphs import FAST_TASK, MAX_BATCH, NOT_RUN
from conftest import wait_for
from tasks import TaskFailure, pause
from test_graphs import add, num
from test_scheduler import Recorder, controller, make

pytestmark = pytest.mark.timeout(120)

FAST = FAST_TASK / 10  # the run time the fake nodes report: fast enough to batch


def tree_tasks(leaves):
    """A reduction tree in GRAPH's wire form (leaves first, then pairwise sums up to a root);
    returns (tasks, root id)."""
    tasks, layer, next_id = [], [], 0
    for _ in range(leaves):
        tasks.append((next_id, "leaf", [], {}, "f0", b""))
        layer.append(next_id)
        next_id += 1
    while len(layer) > 1:
        nxt = []
        for i in range(0, len(layer) - 1, 2):
            tasks.append((next_id, "add", [layer[i], layer[i + 1]], {}, "f1", b""))
            nxt.append(next_id)
            next_id += 1
        if len(layer) % 2:
            nxt.append(layer[-1])
        layer = nxt
    return tasks, layer[0]


def outcomes(payload, fail=lambda task_id: False):
    """A well-formed batch result for a batch ``payload``: each task OK (a value when it is
    to be kept), failed when ``fail(task_id)``, or not run after a failed input."""
    items, keep = pickle.loads(payload)
    keep, bad, out = set(keep), set(), []
    for task_id, _key, _args, _inputs, inner in items:
        if any(d in bad for d in inner):
            bad.add(task_id)
            out.append((task_id, NOT_RUN, 0.0, None))
        elif fail(task_id):
            bad.add(task_id)
            out.append((task_id, wire.ITEM_ERROR, FAST,
                        error_record(0, TaskFailure(f"task {task_id}"), [])))
        else:
            out.append((task_id, wire.OK, FAST, b"v" if task_id in keep else None))
    return pickle.dumps(out)


def answer(sched, node, key, rng=None):
    """Answer one in-flight chunk as a node would: a single task OK, a batch with its
    outcomes (some failing when ``rng`` is given)."""
    job_id, chunk_id = key
    payload = node.inflight[key].payload
    if chunk_id < 0:
        fail = (lambda t: rng.random() < 0.05) if rng else (lambda t: False)
        sched.result(node, job_id, chunk_id, wire.OK, outcomes(payload, fail), FAST)
    else:
        sched.result(node, job_id, chunk_id, wire.OK, b"v", FAST)


def test_fast_tasks_go_in_batches_with_their_downstream_tasks():
    """Once a function is measured fast, ready tasks leave many to a chunk, each batch also
    holding the tasks downstream whose inputs are all in it; every task settles once and
    the root's value is the only one sent to the controller."""
    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    npeer = Recorder("n")
    n = sched.add_node(npeer, "n", "n:1", 2)
    tasks, root = tree_tasks(256)
    sched.submit_graph(ctrl, "g", b"FUNCS", tasks, [root])
    sizes = []
    while "g" in sched.jobs:
        for key in sorted(n.inflight):
            if key[1] < 0:
                sizes.append(n.inflight[key].n_items)
            answer(sched, n, key)
            sched.check_invariants()
    assert [m[2] for m in cpeer.of(wire.TASK_DONE)] == [root]
    report = cpeer.of(wire.GRAPH_DONE)[0][2]
    assert all(info["state"] == "done" for info in report.values())
    batched = sum(info["batched"] for info in report.values())
    assert batched > len(tasks) // 2, f"only {batched} of {len(tasks)} tasks ran in batches"
    assert max(sizes) > 2 and max(sizes) <= MAX_BATCH
    # a batch holds more than its leaves: the sums over them came along
    fused = [m for m in npeer.of(wire.TASK) if m[2] < 0
             and any(inner for *_, inner in pickle.loads(m[-1])[0])]
    assert fused


def test_slow_and_optioned_tasks_are_never_batched():
    """Tasks of a function measured slow, or with a timeout, retries or resources, each go
    in a chunk of their own."""
    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    n = sched.add_node(Recorder("n"), "n", "n:1", 2, resources={"gpu": 4.0})
    options = [{}, {"timeout": 5.0}, {"retries": 1}, {"resources": {"gpu": 1}}]
    tasks = [(i, "t", [], options[i % 4] if i >= 40 else {}, "f0", b"") for i in range(80)]
    sched.submit_graph(ctrl, "g", b"FUNCS", tasks, [])
    while "g" in sched.jobs:
        for key in sorted(n.inflight):
            if key[1] < 0:
                items = pickle.loads(n.inflight[key].payload)[0]
                assert all(tasks[i[0]][3] == {} for i in items), "an optioned task was batched"
                answer(sched, n, key)
            else:  # slow: nothing of this function is batched after the first answers
                sched.result(n, *key, wire.OK, b"v", FAST_TASK * 5)
            sched.check_invariants()
    report = cpeer.of(wire.GRAPH_DONE)[0][2]
    assert not any(info["batched"] for info in report.values())


def test_a_few_slow_runs_do_not_stop_a_fast_function_from_batching():
    """A function is judged by the median of its last runs: its first runs on each worker
    (which load its code) and a preempted run may be slow without keeping its tasks from
    going in batches; a function whose runs are mostly slow is not batched."""
    for slow_runs, expect_batches in ((4, True), (9, False)):
        sched = make(prefetch=2)
        cpeer, ctrl = controller(sched)
        n = sched.add_node(Recorder("n"), "n", "n:1", 4)
        sched.submit_graph(ctrl, "g", b"FUNCS", [(i, "t", [], {}, "f0", b"") for i in range(200)],
                           [])
        answered, batches = 0, 0
        while "g" in sched.jobs:
            for key in sorted(n.inflight):
                if key[1] < 0:
                    batches += 1
                    answer(sched, n, key)
                else:
                    slow = answered < slow_runs or (slow_runs > 4 and answered % 3)
                    sched.result(n, *key, wire.OK, b"v", 0.5 if slow else FAST)
                    answered += 1
                sched.check_invariants()
        assert (batches > 0) == expect_batches, (slow_runs, batches)


def test_batches_under_random_events_keep_every_invariant():
    """Random reduction trees and DAGs of fast tasks under node churn, lost nodes, worker
    crashes, malformed batch results and failing tasks inside batches: check_invariants
    holds after every step, each task is reported at most once, the caller gets the last
    lines of output of failed tasks only (never of a batch, whose id names no task), a batch that came back
    without results is dissolved into single tasks, and every graph finishes once."""
    from twisted.internet.task import Clock

    stats = collections.Counter()
    for seed in range(25):
        rng = random.Random(seed)
        clock = Clock()
        sched = make(prefetch=rng.randint(1, 3), max_crashes=rng.randint(1, 3), clock=clock)
        cpeer, ctrl = controller(sched)
        nodes = []
        graphs = {}
        for g in range(3):
            if g == 0:
                tasks, root = tree_tasks(rng.randint(20, 120))
                outputs = [root]
            else:
                tasks = []
                for tid in range(rng.randint(20, 80)):
                    deps = sorted(rng.sample(range(tid), rng.randint(0, min(3, tid))))
                    tasks.append((tid, f"t{tid % 3}", deps, {}, f"f{tid % 3}", b""))
                outputs = rng.sample(range(len(tasks)), 3)
            sched.submit_graph(ctrl, f"g{g}", b"FUNCS", tasks, outputs)
            graphs[f"g{g}"] = len(tasks)
        for step in range(3000):
            if not sched.jobs:
                break
            op = rng.random()
            live = [n for n in nodes if n.inflight]
            if op < 0.04 or not nodes:
                nodes.append(sched.add_node(Recorder(), f"n{step}", "x:1", rng.randint(1, 3)))
            elif op < 0.07 and len(nodes) > 1:
                lost = nodes.pop(rng.randrange(len(nodes)))
                stats["lost batches"] += sum(1 for k in lost.inflight if k[1] < 0)
                sched.remove_node(lost)
            elif op < 0.95 and live:
                n = rng.choice(live)
                key = rng.choice(sorted(n.inflight))
                roll = rng.random()
                if key[1] < 0 and roll < 0.08:
                    stats["crashed batches"] += 1
                    sched.result(n, *key, wire.CRASHED, pickle.dumps((-9, None)), 0.0)
                elif key[1] < 0 and roll < 0.12:
                    stats["malformed batches"] += 1
                    sched.result(n, *key, wire.OK, pickle.dumps(["nonsense"]), 0.0)
                else:
                    stats["batches" if key[1] < 0 else "singles"] += 1
                    answer(sched, n, key, rng)
            else:
                clock.advance(0.5)
            sched.check_invariants()
        assert not sched.jobs, f"seed {seed}: graphs never finished: {sorted(sched.jobs)}"
        done = [m[1] for m in cpeer.of(wire.GRAPH_DONE)]
        assert sorted(done) == sorted(graphs), f"seed {seed}: graphs finished {done}"
        for m in cpeer.of(wire.GRAPH_DONE):
            report = m[2]
            assert len(report) == graphs[m[1]]
            assert all(info["state"] in ("done", "failed", "skipped") for info in report.values())
            stats["failed in batches"] += sum(1 for info in report.values()
                                              if info["state"] == "failed" and info["batched"])
        sent = [(m[1], m[2]) for m in cpeer.of(wire.TASK_DONE)]
        assert len(sent) == len(set(sent)), f"seed {seed}: a task was reported twice"
        tails = [m[2] for m in cpeer.of(wire.OUTPUT_TAIL)]
        assert all(t >= 0 for t in tails), f"seed {seed}: a batch's tail reached the caller"
    assert min(stats.values()) > 5, stats  # the random walk did reach these paths


# --- real clusters ------------------------------------------------------------------------------

@task
def shout(i, bad):
    print(f"line of {i}")
    if i == bad:
        raise TaskFailure(f"bad input {i}")
    return i


@task
def gated(i, gate_dir):
    """Fast, except for ``i == 300``: it notes its node's process group, then waits for the
    file ``gate_dir/open``."""
    if i == 300:
        with open(os.path.join(gate_dir, f"started.{os.getpgid(0)}"), "w"):
            pass
        while not os.path.exists(os.path.join(gate_dir, "open")):
            pause(0.01)
    return i


def reduce_tree(calls):
    """A balanced tree of ``add`` over the lazy calls ``calls``; its root."""
    if len(calls) == 1:
        return calls[0]
    half = len(calls) // 2
    return add(reduce_tree(calls[:half]), reduce_tree(calls[half:]))


@task
def total(values):
    return sum(values)


def test_arguments_in_both_shipped_forms(cluster):
    """Positional lazy calls and plain values travel in the compact form, anything else
    pickled; both reach the task as they were given, also a lazy call put into a list after
    its consumer was made (listed before its consumer all the same)."""
    box = [num(1)]
    late = total(box)
    box.append(num(2))
    calls = [add(num(3), 4), add(4.5, "x" and 0.5), total([num(5), 6]), late,
             add(b"a", b"b"), add(True, None is None)]
    assert cluster.compute(*calls) == [7, 5.0, 11, 3, b"ab", 2]
    order = [t["id"] for t in late.graph()["tasks"]]
    assert order.index(box[1].id) < order.index(late.id)


def test_a_tree_of_fast_tasks_runs_in_batches(cluster):
    """A reduction tree of 2,047 tiny tasks gives the right value, most of its tasks having
    run in batches (the description says which)."""
    root = reduce_tree([num(i) for i in range(1024)])
    assert cluster.compute(root) == [sum(range(1024))]
    tasks = root.graph()["tasks"]
    assert all(t["state"] == "done" for t in tasks)
    assert sum(1 for t in tasks if t["batched"]) > len(tasks) // 2


def test_output_of_batched_tasks_is_labelled_with_each_task(cluster, capfd):
    """Lines printed by tasks that ran in one batch reach the caller each prefixed with the
    task that printed it."""
    leaves = [shout(i, -1) for i in range(128)]
    root = reduce_tree(leaves)
    assert cluster.compute(root) == [sum(range(128))]
    out, _ = capfd.readouterr()
    lines = re.findall(r"^\(local-\d+ task shout#(\d+)\) line of (\d+)$", out, re.M)
    assert sorted(int(i) for _, i in lines) == list(range(128))
    assert all(int(task_id) == leaves[int(i)].id for task_id, i in lines)
    tasks = {t["id"]: t for t in root.graph()["tasks"]}
    assert sum(1 for c in leaves if tasks[c.id]["batched"]) > 64


def test_a_task_failing_inside_a_batch_raises_its_own_error(cluster):
    """A task that fails inside a batch raises its own type with the remote traceback, its
    position and its own output lines; what is downstream of it is skipped, the other
    tasks finish."""
    leaves = [shout(i, 900) for i in range(1024)]
    root = reduce_tree(leaves)
    with pytest.raises(TaskFailure, match="bad input 900") as info:
        cluster.compute(root)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "shout" in info.value.__cause__.tb
    assert f"shout#{leaves[900].id}" in " ".join(getattr(info.value, "__notes__", []))
    assert "line of 900" in getattr(info.value, "task_output", [])
    states = {t["id"]: t for t in root.graph()["tasks"]}
    assert states[leaves[900].id]["state"] == "failed" and states[leaves[900].id]["batched"]
    assert states[root.id]["state"] == "skipped"
    assert states[leaves[0].id]["state"] == states[leaves[1023].id]["state"] == "done"


def test_a_lost_nodes_batches_run_again_elsewhere(make_cluster, tmp_path):
    """A node killed while a batch of graph tasks runs on it: the batch's tasks run again on
    the other node, one to a chunk (also the fast ones around the task that held the batch
    up), and the graph's value is right."""
    lc = make_cluster(nodes=2)
    gate = str(tmp_path)
    leaves = [gated(i, gate) for i in range(400)]
    root = reduce_tree(leaves)
    future = lc.cluster.submit_graph(root)
    wait_for(lambda: os.listdir(gate), what="task 300 to start")
    victim = int(os.listdir(gate)[0].split(".")[1])
    assert victim in [p.pid for p in lc.nodes]
    os.killpg(victim, signal.SIGKILL)
    wait_for(lambda: len(lc.cluster.status()["nodes"]) == 1, what="the server to drop the node")
    open(os.path.join(gate, "open"), "w").close()
    assert future.result(timeout=60) == sum(range(400))
    tasks = {t["id"]: t for t in root.graph()["tasks"]}
    assert all(t["state"] == "done" for t in tasks.values())
    assert not tasks[leaves[300].id]["batched"]
    # a fast leaf beside it ran alone: only a dissolved batch makes that happen
    assert any(not tasks[leaves[i].id]["batched"] for i in range(290, 311) if i != 300)
    assert sum(1 for t in tasks.values() if t["batched"]) > len(tasks) // 2
