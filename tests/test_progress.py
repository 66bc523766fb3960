"""Progress in the caller: bars fed by the server's JOB_PROGRESS events as nodes finish work."""

from __future__ import annotations

import io
import os
import pickle

import pytest
from tqdm import tqdm

import achilles
from achilles import task
from achilles.core import wire
from achilles.core.errors import ProtocolError
from achilles.server.scheduler import PROGRESS_INTERVAL, Scheduler
from twisted.internet.task import Clock

from progress_tasks import first_waits, reports_each, fails_on
from tasks import square

pytestmark = pytest.mark.timeout(90)


@task
def leaf(i):
    return i


@task
def explode(x):
    raise ValueError(f"task got {x}")


@task(retries=1)
def flaky(x):
    raise ValueError(f"flaky got {x}")


@task
def gather(*xs):
    return sum(xs)


def _bar() -> tqdm:
    return tqdm(file=io.StringIO(), mininterval=0)


def test_map_bar_reaches_total(cluster, capsys):
    """``progress=True`` draws a tqdm bar on stderr that ends at done == total; a caller's
    tqdm gets its total and count; a generator's bar counts and gets its total at the end."""
    assert cluster.map(square, range(500), progress=True) == [x * x for x in range(500)]
    err = capsys.readouterr().err
    assert "500/500" in err and "item/s" in err
    bar = _bar()
    assert list(cluster.imap(square, range(300), progress=bar)) == [x * x for x in range(300)]
    assert bar.n == bar.total == 300
    bar = _bar()
    assert sorted(cluster.imap_unordered(square, (x for x in range(77)), progress=bar)) == \
        sorted(x * x for x in range(77))
    assert bar.n == bar.total == 77
    assert not bar.postfix


def test_callable_sees_nodes_finish_before_the_caller_consumes(cluster, tmp_path):
    """An ordered imap whose first item is slow: the bar counts the other items as nodes
    finish them, while the caller still waits for item 0 (which finishes only once the
    progress callable has seen the other five done)."""
    marker = str(tmp_path / "go")
    seen = []

    def shown(done, total):
        seen.append((done, total))
        if done >= 5 and not os.path.exists(marker):
            open(marker, "w").close()

    it = cluster.imap(first_waits, [(x, marker) for x in range(6)], chunksize=1, progress=shown)
    assert next(it) is True  # item 0 found the marker: progress moved before it was consumed
    assert list(it) == [1, 2, 3, 4, 5]
    assert (5, 6) in seen and seen[-1] == (6, 6)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_report_progress_moves_the_bar_inside_a_chunk(cluster, tmp_path):
    """One chunk of ten items whose tasks call ``achilles.report_progress(1)``: the bar shows
    nine items done while the chunk still runs (its last item waits for the callable to see
    them), and ends at ten."""
    marker = str(tmp_path / "go")
    seen = []

    def shown(done, total):
        seen.append(done)
        if done >= 9 and not os.path.exists(marker):
            open(marker, "w").close()

    args = [(x, 9, marker) for x in range(10)]
    assert cluster.map(reports_each, args, chunksize=10, progress=shown) == list(range(9)) + [True]
    assert 9 in seen and seen[-1] == 10


def test_report_progress_outside_a_worker_is_a_no_op_and_checks_its_argument():
    """Called in the caller's own process it does nothing; a non-positive or non-numeric
    count is a ValueError."""
    achilles.report_progress(3)
    for bad in (0, -1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError):
            achilles.report_progress(bad)


def test_failed_map_counts_the_failure(cluster):
    """A map whose item raises: the caller gets the item's exception and the bar's postfix
    counts the failure."""
    bar = _bar()
    with pytest.raises(ValueError, match="item 3 is bad"):
        cluster.map(fails_on, [(x, 3) for x in range(8)], chunksize=1, progress=bar)
    assert bar.total == 8 and bar.n <= 7
    assert "failed=1" in bar.postfix


def test_graph_bar_counts_tasks_failures_retries_and_skips(cluster):
    """A graph of 8 tasks where one task fails after a retry (its consumer is skipped) and
    another fails at once: the bar ends at 8/8 with failed=2, skipped=1, retried=1 in its
    postfix; ``progress="tasks"`` draws one bar per task name."""
    bar = _bar()
    ok = gather(leaf(1), leaf(2), leaf(3))
    bad = gather(flaky(1), leaf(4))
    with pytest.raises(ValueError):
        cluster.compute(ok, bad, explode(0), progress=bar)
    assert bar.n == bar.total == 8
    assert "failed=2" in bar.postfix and "skipped=1" in bar.postfix and "retried=1" in bar.postfix
    seen = []
    assert gather(leaf(1), leaf(2)).result(cluster, progress=lambda d, t: seen.append((d, t))) == 3
    assert seen[-1] == (3, 3)


def test_per_task_bars(cluster, capsys):
    """``progress="tasks"`` draws one bar per @task name, each ending at its own count."""
    assert cluster.compute(gather(*[leaf(i) for i in range(6)]), progress="tasks") == [15]
    err = capsys.readouterr().err
    assert "leaf" in err and "6/6" in err and "gather" in err and "1/1" in err


def test_environment_turns_bars_on(shared_cluster, monkeypatch, capsys):
    """``ACHILLES_PROGRESS=1`` (read by load_config, and by LocalCluster from the environment)
    shows a bar for calls that pass no ``progress=``; ``progress=False`` still turns it off."""
    monkeypatch.setenv("ACHILLES_PROGRESS", "1")
    monkeypatch.setenv("ACHILLES_SECRET_KEY", "x" * 20)
    assert achilles.load_config().progress is True
    monkeypatch.setattr(shared_cluster.cluster.config, "progress", True)
    shared_cluster.cluster.map(square, range(40))
    assert "40/40" in capsys.readouterr().err
    shared_cluster.cluster.map(square, range(40), progress=False)
    assert "40/40" not in capsys.readouterr().err
    monkeypatch.setenv("ACHILLES_PROGRESS", "maybe")
    with pytest.raises(achilles.ConfigError, match="ACHILLES_PROGRESS"):
        achilles.load_config()


class Recorder:
    """A peer handle for the scheduler: records what it is sent."""

    def __init__(self) -> None:
        self.sent = []

    def send(self, code, *fields):
        self.sent.append((code,) + fields)

    def of(self, code):
        return [m for m in self.sent if m[0] == code]


def _map_job(clock, chunks=10, n_items=5):
    sched = Scheduler(prefetch=2, clock=clock)
    cpeer = Recorder()
    ctrl = sched.add_controller(cpeer, "c:1")
    npeer = Recorder()
    node = sched.add_node(npeer, "n", "n:1", 2)
    sched.submit(ctrl, "j", "f", b"F", b"", {})
    for cid in range(chunks):
        sched.add_chunk(ctrl, "j", cid, n_items, b"x")
    return sched, cpeer, ctrl, node


def _placed(node):
    return sorted(cid for _, cid in node.inflight)


def test_server_sends_progress_only_for_watched_jobs_coalesced():
    """An unwatched job gets no JOB_PROGRESS at all (progress costs nothing when off). Once
    watched, results and task reports within one interval give one JOB_PROGRESS with the
    summed figures, sent when the interval ends."""
    clock = Clock()
    sched, cpeer, ctrl, node = _map_job(clock)
    for cid in _placed(node)[:2]:
        sched.result(node, "j", cid, wire.OK, b"r", 0.01)
    clock.advance(5)
    assert not cpeer.of(wire.JOB_PROGRESS)
    sched.watch(ctrl, "j")
    clock.advance(PROGRESS_INTERVAL)
    assert [m[1:] for m in cpeer.of(wire.JOB_PROGRESS)] == [("j", 10.0, 0, 0, 0, {})]
    first, second = _placed(node)[:2]
    sched.result(node, "j", first, wire.OK, b"r", 0.01)
    sched.progress(node, "j", second, 2)
    sched.progress(node, "j", second, 1.5)
    sched.check_invariants()
    assert len(cpeer.of(wire.JOB_PROGRESS)) == 1
    clock.advance(PROGRESS_INTERVAL)
    assert [m[2] for m in cpeer.of(wire.JOB_PROGRESS)] == [10.0, 18.5]


def test_reports_are_capped_per_chunk_and_withdrawn_when_it_reruns():
    """A chunk's reports count at most its items; when its worker crashes or its node is lost,
    its reported part is withdrawn and the re-run counted in ``retried``. Reports for chunks
    not in flight on the reporting node are dropped; a malformed count is a ProtocolError."""
    clock = Clock()
    sched, cpeer, ctrl, node = _map_job(clock, chunks=4)
    sched.watch(ctrl, "j")
    a, b = _placed(node)[:2]
    sched.progress(node, "j", a, 100)
    sched.progress(node, "j", b, 1)
    sched.progress(node, "j", 99, 1)
    sched.progress(node, "other", a, 1)
    assert sched.jobs["j"].reported == 6
    sched.result(node, "j", a, wire.CRASHED, pickle.dumps((-9, None)), 0.0)
    sched.check_invariants()
    clock.advance(PROGRESS_INTERVAL)
    assert cpeer.of(wire.JOB_PROGRESS)[-1][2:] == (1.0, 0, 0, 1, {})
    sched.remove_node(node)
    sched.check_invariants()
    clock.advance(PROGRESS_INTERVAL)
    assert cpeer.of(wire.JOB_PROGRESS)[-1][2:] == (0.0, 0, 0, 5, {})  # 1 crash + 4 in flight
    node2 = sched.add_node(Recorder(), "m", "m:1", 1)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ProtocolError):
            sched.progress(node2, "j", _placed(node2)[0], bad)


def test_final_progress_comes_before_the_graph_report():
    """A watched graph's last JOB_PROGRESS is sent at once when it settles, before GRAPH_DONE,
    with per-name counts."""
    clock = Clock()
    sched = Scheduler(prefetch=1, clock=clock)
    cpeer = Recorder()
    ctrl = sched.add_controller(cpeer, "c:1")
    node = sched.add_node(Recorder(), "n", "n:1", 2)
    tasks = [(1, "leaf", [], {}, "f0", b""), (2, "leaf", [], {}, "f0", b""),
             (3, "sum", [1, 2], {}, "f1", b"")]
    sched.submit_graph(ctrl, "g", b"", tasks, [3])
    sched.watch(ctrl, "g")
    for tid in (1, 2):
        sched.result(node, "g", tid, wire.OK, pickle.dumps(tid), 0.01)
    sched.result(node, "g", 3, wire.OK, pickle.dumps(3), 0.01)
    codes = [m[0] for m in cpeer.sent if m[0] in (wire.JOB_PROGRESS, wire.GRAPH_DONE)]
    assert codes == [wire.JOB_PROGRESS, wire.GRAPH_DONE]
    assert cpeer.of(wire.JOB_PROGRESS)[-1][2:] == (3.0, 0, 0, 0, {"leaf": [2, 0, 2], "sum": [1, 0, 1]})
    clock.advance(PROGRESS_INTERVAL)
    assert len(cpeer.of(wire.JOB_PROGRESS)) == 1


def test_pool_methods_take_progress(cluster):
    """``achilles.Pool``'s map, starmap, imap and imap_unordered (and their async forms) take
    ``progress=`` and their bars end at done == total."""
    with achilles.Pool(cluster=cluster) as pool:
        bar = _bar()
        assert pool.map(square, range(50), progress=bar) == [x * x for x in range(50)]
        assert bar.n == bar.total == 50
        seen = []
        assert pool.starmap_async(pow, [(2, 3), (3, 2)],
                                  progress=lambda d, t: seen.append((d, t))).get(30) == [8, 9]
        assert seen[-1] == (2, 2)
        bar = _bar()
        assert sorted(pool.imap_unordered(square, range(20), progress=bar)) == \
            sorted(x * x for x in range(20))
        pool.close()
        pool.join()  # the reader thread has finished the job, and with it the bar
        assert bar.n == bar.total == 20
