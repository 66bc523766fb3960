"""Stage pipelines (``achilles.pipeline``) on real local clusters: structures, stage life,
meta, ordering, sources, bounded queues, error policies, faults and resources."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import achilles
from achilles import As, Broadcast, Parallel, Serial, StageError
from achilles.core.errors import ResourceUnavailable, WorkerCrashed
from conftest import ROOT, alive, wait_for
from pipeline_stages import (Add, BadSetup, Chatty, ChattyFail, Collecting, Count, DieInSetup, Double, Explode,
                             FailOn, Forever, Gpu, Lifecycle, Marker, MetaTag, PidFile, ReadMeta,
                             Slow, Tag, hostname_of_node)
from tasks import TaskFailure, square

pytestmark = pytest.mark.timeout(120)


def exactly_once(results, expected):
    counts = collections.Counter(results)
    assert counts == collections.Counter(expected), "missing, extra or repeated outputs"


# --- structures ---------------------------------------------------------------------------
def test_serial_stages_in_sequence(cluster):
    """``pipeline(iterable, a, b, c)`` runs the stages in sequence on every item."""
    out = achilles.pipeline(range(50), Add(1), Double(), square, cluster=cluster).list()
    assert sorted(out) == sorted((2 * (x + 1)) ** 2 for x in range(50))


def test_list_tuple_set_and_wrappers_nest(cluster):
    """``[]`` is serial, ``()`` parallel on a shared input, ``{}`` broadcast, and the named
    wrappers mean the same; branches join again before a following stage."""
    p = achilles.pipeline(range(20), [Add(0), (Tag("a"), Tag("b"))], lambda t: t[1], cluster=cluster)
    out = p.list()
    exactly_once(out, range(20))  # parallel: each item goes through exactly one branch

    b = achilles.pipeline(range(20), {Double(), Add(1000)}, Add(1), cluster=cluster).list()
    exactly_once(b, [2 * x + 1 for x in range(20)] + [x + 1001 for x in range(20)])

    w = achilles.pipeline(range(20), Serial(Add(0), Broadcast(Serial(Double(), Double()),
                                                                Parallel(Add(1), Add(1)))),
                          cluster=cluster).list()
    exactly_once(w, [4 * x for x in range(20)] + [x + 1 for x in range(20)])


def test_as_makes_parallel_copies_sharing_the_input(cluster):
    """``As(n, Stage, *args)`` makes n copies of one stage; together they see each item once."""
    p = achilles.pipeline(range(200), As(3, Add, 5), hostname_of_node, cluster=cluster)
    out = p.list()
    exactly_once([x for _, x in out], [x + 5 for x in range(200)])
    g = p.graph()
    assert [s["copies"] for s in g["stages"]] == [3, 1]
    assert g["edges"] == [["input", 0], [0, 1], [1, "output"]]
    json.dumps(g)


def test_graph_describes_a_broadcast(cluster):
    """``graph()`` returns the structure as JSON: stages and edges from input to output."""
    p = achilles.pipeline(range(3), Add(1), Broadcast(Double(), Tag("t")), Add(0), cluster=cluster)
    g = json.loads(json.dumps(p.graph()))
    assert [s["name"] for s in g["stages"]] == ["Add", "Double", "Tag", "Add#2"]
    assert sorted(map(tuple, g["edges"]), key=str) == sorted(
        [("input", 0), (0, 1), (0, 2), (1, 3), (2, 3), (3, "output")], key=str)
    assert g["stages"][0]["route"] == ["all", [1, 2]]


def test_zero_or_many_outputs_per_item(cluster):
    """``do`` may put zero or more outputs; ordered output keeps input order."""
    out = achilles.pipeline([3, 0, 2, 1], Explode(), cluster=cluster, ordered=True).list()
    assert out == [3, 3, 3, 2, 2, 1]


def test_ordered_restores_input_order(cluster):
    """``ordered=True`` yields outputs in input order even when parallel copies finish out of
    order."""
    out = achilles.pipeline(range(120), As(3, Slow, 0.002), Add(0), cluster=cluster, ordered=True,
                            batch=4).list()
    assert out == list(range(120))


# --- stage life ---------------------------------------------------------------------------
def test_setup_and_teardown_run_once_per_copy(cluster, tmp_path):
    """Each copy runs setup once before its items and teardown once after its input is
    drained; teardown may still put, and the items each copy counted add up."""
    out = achilles.pipeline(range(100), As(2, Lifecycle, str(tmp_path)), cluster=cluster).list()
    setups = list(tmp_path.glob("setup-*"))
    teardowns = list(tmp_path.glob("teardown-*"))
    assert len(setups) == 2 and len(teardowns) == 2
    assert {p.name.split("-")[1] for p in setups} == {p.name.split("-")[1] for p in teardowns}
    counts = [x for x in out if isinstance(x, tuple)]
    assert sorted(x for x in out if not isinstance(x, tuple)) == list(range(100))
    assert sum(n for _, n in counts) == 100 == sum(int(p.read_text()) for p in teardowns)


def test_meta_reaches_the_last_stage(cluster):
    """``self.meta`` set by a source travels with each item through every stage to the last."""
    out = achilles.pipeline(Count(30), MetaTag("x"), As(2, MetaTag, "y"), ReadMeta(),
                            cluster=cluster, ordered=True).list()
    assert out == [(i, {"i": i, "seen": "xy"}) for i in range(30)]


def test_source_stage_generates_the_items(cluster):
    """A first stage without an input iterable is a source: its setup's puts are the items."""
    assert achilles.pipeline(Count(500), Add(1), cluster=cluster, ordered=True).list() == \
        list(range(1, 501))
    assert achilles.EZ(As(2, Count, 10), Add(0), cluster=cluster).join() == 20


def test_context_manager_and_items_are_lazy(cluster):
    """A pipeline is a context manager; ``items()`` yields as outputs come and leaving the
    block stops whatever still runs."""
    with achilles.pipeline(range(10 ** 9), Add(1), cluster=cluster) as p:
        first = []
        for x in p.items():
            first.append(x)
            if len(first) == 25:
                break
    assert len(first) == 25
    assert cluster.map(square, range(4)) == [0, 1, 4, 9]


def test_infinite_source_is_stopped(cluster, tmp_path):
    """An endless source stage runs until ``stop()``; every copy stops and the source's
    teardown runs; the cluster serves the next call."""
    p = achilles.pipeline(Forever(str(tmp_path)), Add(0), cluster=cluster, batch=8).start()
    got = []
    for x in p.items():
        got.append(x)
        if len(got) == 200:
            p.stop()
            break
    assert len(set(got)) == 200
    wait_for(lambda: list(tmp_path.glob("source-teardown-*")), what="the source's teardown")
    wait_for(lambda: not [j for j in cluster.status()["jobs"] if j["kind"] == "pipeline"],
             what="the pipeline to leave the server")
    assert cluster.map(square, range(3)) == [0, 1, 4]


def test_slow_last_stage_bounds_the_source(cluster):
    """With a slow last stage and a slow reader, an endless source is held back by the
    bounded queues: what it produced stays within a fixed bound of what was consumed."""
    p = achilles.pipeline(Count(10 ** 9), Slow(0.001), cluster=cluster, batch=4).start()
    it = p.items()
    for _ in range(100):
        next(it)
    stages = p.stage_status()
    produced = stages[0]["items_out"]
    # 4-item batches: the Slow queue (4 batches) + 2 in flight per copy + 8 result batches +
    # one pull, plus what was read; an unbounded source would have made millions by now.
    assert produced <= 100 + 4 * (4 + 2 + 8 + 2), stages
    p.stop()


# --- errors -------------------------------------------------------------------------------
def test_stage_error_fails_the_pipeline_with_its_own_type(cluster):
    """An exception in ``do`` raises the stage's own exception type in the caller, with the
    remote traceback and a note naming the stage, the copy and the node."""
    with pytest.raises(TaskFailure) as info:
        achilles.pipeline(range(1, 50), Add(0), FailOn(7), cluster=cluster).list()
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "stage FailOn copy 0 on node local-" in notes
    assert "no multiples of 7" in str(info.value.__cause__)
    assert cluster.map(square, range(3)) == [0, 1, 4]


def test_skip_policy_drops_failing_items(cluster):
    """``on_error="skip"`` drops the failing items (logged on the node and counted)."""
    p = achilles.pipeline(range(1, 50), FailOn(7), cluster=cluster, on_error="skip")
    assert sorted(p.list()) == [x for x in range(1, 50) if x % 7]
    assert p.stats["stages"][0]["skipped"] == 7


def test_collect_policy_returns_errors_with_results(cluster):
    """``on_error="collect"`` (here set on the Stage class) yields StageError objects, holding
    the stage's own exception, alongside the results."""
    out = achilles.pipeline(range(1, 30), Collecting(5), Add(0), cluster=cluster).list()
    errors = [x for x in out if isinstance(x, StageError)]
    assert sorted(x for x in out if not isinstance(x, StageError)) == \
        [x for x in range(1, 30) if x % 5]
    assert len(errors) == 5
    assert all(isinstance(e.exception, TaskFailure) and e.stage == "Collecting" for e in errors)
    assert sorted(int(e.item) for e in errors) == [5, 10, 15, 20, 25]


def test_setup_error_fails_the_pipeline(cluster):
    """An exception in ``setup`` fails the pipeline with its own type, naming the stage."""
    with pytest.raises(TaskFailure, match="cannot load the model") as info:
        achilles.pipeline(range(5), Add(0), BadSetup(), cluster=cluster).list()
    assert "stage BadSetup copy 0" in " ".join(info.value.__notes__)


def test_copy_dying_in_setup_fails_with_worker_crashed(cluster):
    """A copy whose process dies in ``setup`` every time is started again, then the pipeline
    fails with WorkerCrashed instead of restarting it forever."""
    with pytest.raises(WorkerCrashed, match="DieInSetup copy 0 died 3 times"):
        achilles.pipeline(range(5), DieInSetup(), cluster=cluster).list()
    assert cluster.map(square, range(3)) == [0, 1, 4]


# --- faults -------------------------------------------------------------------------------
@pytest.mark.faults
def test_stage_process_killed_outputs_arrive_once(make_cluster, tmp_path):
    """SIGKILL of a stage copy's process mid-stream: the copy starts again (setup runs again)
    and every output arrives exactly once."""
    lc = make_cluster(nodes=1, processes=2)
    p = achilles.pipeline(range(400), As(2, PidFile, str(tmp_path), 0.002), Add(0),
                          cluster=lc.cluster, batch=4)
    out = []
    killed = None
    for x in p.items():
        out.append(x)
        if len(out) == 60:
            killed = int(sorted(tmp_path.glob("pid-*"))[0].name.split("-")[1])
            os.kill(killed, signal.SIGKILL)
    exactly_once(out, range(400))
    assert killed is not None and not alive(killed)
    assert len(list(tmp_path.glob("pid-*"))) == 3  # two copies, one started again
    assert sum(s["restarts"] for s in p.stats["stages"]) == 1


@pytest.mark.faults
def test_node_killed_mid_stream_outputs_arrive_once(make_cluster, tmp_path):
    """kill -9 of a node daemon mid-stream: its stage copies start again on the other node,
    the batches they held are re-run, and every output arrives exactly once."""
    lc = make_cluster(nodes=2, processes=1)
    p = achilles.pipeline(range(600), As(2, PidFile, str(tmp_path), 0.002), As(2, Add, 0),
                          cluster=lc.cluster, batch=4)
    out = []
    for x in p.items():
        out.append(x)
        if len(out) == 80:
            stages = p.stage_status()
            assert stages[0]["nodes"] == ["local-0", "local-1"], stages  # copies spread
            os.kill(lc.nodes[0].pid, signal.SIGKILL)
    exactly_once(out, range(600))
    assert all(s["nodes"] == [] for s in p.stats["stages"])  # every copy ended
    assert [n["name"] for n in lc.cluster.status()["nodes"]] == ["local-1"]


@pytest.mark.faults
def test_controller_gone_stops_every_copy(make_cluster, tmp_path):
    """When the controller's connection goes away mid-stream, every stage copy stops: idle
    ones after running teardown, and none is left running."""
    lc = make_cluster(nodes=1, processes=2)
    p = achilles.pipeline(range(10 ** 6), As(2, Marker, str(tmp_path)), Add(0),
                          cluster=lc.cluster, batch=2)
    it = p.items()
    for _ in range(20):
        next(it)
    # Both copies were placed when the pipeline started; the second may start after the
    # first has made 20 outputs.
    wait_for(lambda: len(list(tmp_path.glob("pid-*"))) == 2, what="both stage copies to start")
    pids = [int(f.name.split("-")[1]) for f in tmp_path.glob("pid-*")]
    lc.cluster.close()
    wait_for(lambda: not any(alive(pid) for pid in pids), what="the stage copies to stop")
    assert len(list(tmp_path.glob("teardown-*"))) == 2


# --- resources ----------------------------------------------------------------------------
def test_resources_place_copies_on_nodes_that_offer_them(make_cluster):
    """A stage with ``resources`` runs only on nodes offering them; one nobody offers fails
    with ResourceUnavailable."""
    lc = make_cluster(nodes=1, processes=1)
    lc.add_node(processes=1, name="gpu-node", resources="gpu=1")
    lc.wait_for_nodes(2)
    out = achilles.pipeline(range(20), As(2, Gpu), str, cluster=lc.cluster).list()
    assert out == ["gpu-node"] * 20  # one gpu: the two copies ran one after the other
    p2 = achilles.pipeline(range(5), As(2, Add, 0, resources={"tpu": 1}), cluster=lc.cluster)
    with pytest.raises(ResourceUnavailable, match="tpu=1"):
        p2.list()
    # Two stages that each hold the one gpu could never both run: refused, not hung.
    with pytest.raises(ResourceUnavailable, match="need gpu=2 at once"):
        achilles.pipeline(range(5), Gpu(), Gpu(), cluster=lc.cluster).list()


# --- examples -----------------------------------------------------------------------------
def run_example(name: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("ACHILLES_ENV_FILE", None)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)], env=env,
                          capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_example_pipeline_mpyx():
    """examples/pipeline_mpyx.py (source stage, As, broadcast of functions, meta, teardown
    put) prints every frame's sum and max once, labelled with the frame from meta."""
    lines = run_example("pipeline_mpyx.py").splitlines()
    assert lines[0] == "['Frames', 'Label', 'Scale', 'peak', 'total']"
    rows = lines[1:]
    assert rows[0] == "('label saw', 12)"
    assert sorted(rows[1:]) == sorted(
        [f"({n}, 'sum', {sum(range(n, n + 4)) * 10})" for n in range(6)]
        + [f"({n}, 'max', {(n + 3) * 10})" for n in range(6)])


def test_example_pipeline_errors():
    """examples/pipeline_errors.py: skipped lines are counted, a collected error comes out in
    its input position, results in input order."""
    out = run_example("pipeline_errors.py")
    assert out.splitlines() == ["result 2.0", "result 3.0", "error in Root ValueError -1.0",
                                "result 4.0", "result 5.0", "skipped 2"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_long_source_runs_in_flat_memory(make_cluster):
    """A source stage of 2,000,000 items streams with flat memory: from 400,000 items on, the
    RSS of the controller, the server and the node (with its stage processes) stays put."""
    from test_load import rss_mib, tree_rss_mib

    lc = make_cluster(nodes=1, processes=2)
    me = os.getpid()
    first, peak = {}, collections.Counter()
    n = 0
    for _ in achilles.pipeline(Count(2_000_000), Add(0), cluster=lc.cluster, batch=1000).items():
        n += 1
        if n % 200_000 == 0:
            now = {"controller": rss_mib(me), "server": rss_mib(lc.server.pid),
                   "node": tree_rss_mib(lc.nodes[0].pid)}
            if n == 400_000:
                first = now
            for role, value in now.items():
                peak[role] = max(peak[role], value)
    assert n == 2_000_000
    growth = {role: peak[role] - first[role] for role in first}
    print("rss at 400k", first, "peak", dict(peak))
    # Holding the items anywhere would take ~60+ MiB (2M ints in lists).
    assert all(g < 25 for g in growth.values()), growth


def test_stop_from_another_thread_ends_items(cluster, tmp_path):
    """``stop()`` called from another thread while ``items()`` waits makes ``items()`` end
    (no hang) and stops the copies."""
    import threading

    p = achilles.pipeline(Forever(str(tmp_path)), Slow(0.5), cluster=cluster, batch=1).start()
    it = p.items()
    next(it)
    timer = threading.Timer(0.2, p.stop)
    timer.start()
    rest = list(it)  # returns once stopped
    timer.join()
    assert len(rest) < 50
    wait_for(lambda: list(tmp_path.glob("source-teardown-*")), what="the source's teardown")


def test_watch_prints_queue_fill_and_busy_copies(cluster):
    """``watch()`` prints, while the pipeline runs, each stage's busy copies, queue fill and
    output count."""
    import io

    buf = io.StringIO()
    p = achilles.pipeline(range(100), As(2, Slow, 0.01), Slow(0.01), cluster=cluster, batch=2)
    assert p.watch(interval=0.05, file=buf) is p
    assert sorted(p.list()) == list(range(100))
    text = buf.getvalue()
    assert "pipeline Slow -> Slow#2:" in text
    assert "Slow#2" in text and "busy " in text and "/2  queue " in text and "out " in text


@pytest.mark.faults
def test_server_restart_fails_the_pipeline_with_connection_lost(make_cluster):
    """A server restart mid-stream ends the pipeline with ConnectionLost saying it is not
    resumed (its stages' state lived on the nodes); the cluster serves the next call."""
    from achilles.core.errors import ConnectionLost

    lc = make_cluster(nodes=1, processes=1)
    it = achilles.pipeline(range(10 ** 6), Slow(0.001), cluster=lc.cluster, batch=4).items()
    for _ in range(10):
        next(it)
    lc.restart_server()
    with pytest.raises(ConnectionLost, match="not resumed"):
        for _ in it:
            pass
    lc.wait_for_nodes(1)
    assert lc.cluster.map(square, range(3)) == [0, 1, 4]


# --- output -------------------------------------------------------------------------------
STAGE_LINE = re.compile(r"^\((local-\d+) stage ([A-Za-z]+)\.(\d+)\) (.*)$")


def stage_lines(text):
    """``[(stage, copy, text)]`` for every forwarded stage line in captured output."""
    return [m.groups()[1:] for m in map(STAGE_LINE.match, text.splitlines()) if m]


def test_stage_output_reaches_the_caller(cluster, capfd):
    """What stage copies print, write to stderr and log (in setup, do and teardown) is
    printed by the caller with the node, stage and copy; lines printed before a stage's
    failure come out before it is raised; forward_output=False keeps them on the node."""
    assert sorted(achilles.pipeline(range(4), As(2, Chatty), cluster=cluster).list()) == [0, 1, 2, 3]
    out, err = capfd.readouterr()
    outs = stage_lines(out)
    assert sorted(t for _, _, t in outs) == sorted(
        ["setting up"] * 2 + ["tearing down"] * 2 + [f"out {i}" for i in range(4)])
    assert {(s, c) for s, c, _ in outs} == {("Chatty", "0"), ("Chatty", "1")}
    assert sorted(t for _, _, t in stage_lines(err)) == sorted(
        [f"err {i}" for i in range(4)] + [f"WARNING chatty: log {i}" for i in range(4)])

    with pytest.raises(TaskFailure):
        achilles.pipeline(range(6), ChattyFail(), cluster=cluster, batch=8).list()
    out, _ = capfd.readouterr()
    assert [t for _, _, t in stage_lines(out)] == [f"before {i}" for i in range(4)]

    achilles.pipeline(range(2), Chatty(), cluster=cluster, forward_output=False).list()
    out, err = capfd.readouterr()
    assert stage_lines(out) == [] and stage_lines(err) == []
