"""Cluster.submit_job: map jobs whose results come as events on one thread per cluster, with
cancel(); on a real local cluster."""

from __future__ import annotations

import queue
import threading

import pytest

from achilles.controller.handle import JobDone, JobError, JobResults
from achilles.core.errors import JobCancelled
from pool_tasks import init_worker, running, tagged
from tasks import TaskFailure, delayed, fail_on_three, square

pytestmark = pytest.mark.timeout(120)


class Events:
    """Collects a handle's events; ``wait()`` returns them once the terminal one came."""

    def __init__(self) -> None:
        self.items = []
        self.threads = set()
        self.terminal = threading.Event()

    def __call__(self, event) -> None:
        self.threads.add(threading.current_thread().name)
        assert not self.terminal.is_set(), f"{event!r} after the terminal event"
        self.items.append(event)
        if isinstance(event, (JobDone, JobError)):
            self.terminal.set()

    def wait(self, timeout: float = 60):
        assert self.terminal.wait(timeout), f"no terminal event; got {self.items}"
        return self.items

    def values(self):
        """Results by input index."""
        out = {}
        for e in self.items:
            if isinstance(e, JobResults):
                for i, v in enumerate(e.values):
                    assert e.start + i not in out, f"item {e.start + i} delivered twice"
                    out[e.start + i] = v
        return out


def test_results_then_one_done_on_the_event_thread(cluster):
    """Every result arrives once, tagged with its input index, then one JobDone; callbacks run
    on the cluster's event thread."""
    ev = Events()
    handle = cluster.submit_job(square, range(500), ev)
    items = ev.wait()
    assert items[-1] == JobDone(500)
    assert ev.values() == {i: i * i for i in range(500)}
    assert ev.threads == {"achilles-jobs"}
    assert handle.done and not handle.cancel()


def test_many_jobs_need_no_thread_each(cluster):
    """Thirty jobs in flight at once add at most the one event thread."""
    before = threading.active_count()
    collectors = [Events() for _ in range(30)]
    for i, ev in enumerate(collectors):
        cluster.submit_job(delayed, [0.01] * 4, ev, chunksize=1)
    assert threading.active_count() <= before + 1
    for ev in collectors:
        assert ev.wait()[-1] == JobDone(4)


def test_a_failing_item_ends_the_job_with_its_error(cluster):
    """A failing item gives one JobError with the task's own exception and its input index;
    nothing follows, and the rest of the job is cancelled on the server."""
    ev = Events()
    cluster.submit_job(fail_on_three, range(50), ev, chunksize=1)
    last = ev.wait()[-1]
    assert isinstance(last, JobError) and isinstance(last.error, TaskFailure)
    assert last.index == 3
    assert 3 not in ev.values()
    assert cluster.status()["jobs"] == []


def test_cancel_stops_the_job_and_frees_the_nodes(cluster, tmp_path):
    """cancel() from another thread delivers JobError(JobCancelled) once, drops the queued
    chunks on the server, and returns False once the job has ended."""
    ev = Events()
    handle = cluster.submit_job(running, [(str(tmp_path), i) for i in range(5_000)], ev,
                                chunksize=1)
    assert handle.cancel("enough")
    last = ev.wait()[-1]
    assert isinstance(last, JobError) and isinstance(last.error, JobCancelled)
    assert str(last.error) == "enough"
    assert not handle.cancel()
    assert cluster.status()["jobs"] == []
    assert cluster.map(square, range(8)) == [x * x for x in range(8)]


def test_cancel_from_the_callback_stops_further_results(cluster):
    """A callback that cancels its own job gets no more results, only the terminal event."""
    box = {}
    ev = Events()

    def on_event(event):
        ev(event)
        if isinstance(event, JobResults):
            box["handle"].cancel("seen one")

    started = threading.Event()
    box["handle"] = None

    def gate(event):
        started.wait(10)
        on_event(event)

    box["handle"] = cluster.submit_job(square, range(1000), gate, chunksize=1)
    started.set()
    items = ev.wait()
    assert isinstance(items[0], JobResults)
    assert len([e for e in items if isinstance(e, JobResults)]) == 1
    assert isinstance(items[-1], JobError) and isinstance(items[-1].error, JobCancelled)


def test_empty_input_is_done_at_once(cluster):
    """An empty input ends with JobDone(0) and no job on the server."""
    ev = Events()
    cluster.submit_job(square, [], ev)
    assert ev.wait() == [JobDone(0)]


class Boom(Exception):
    """The input iterator's own error."""


def broken(n):
    yield from range(n)
    raise Boom("input broke")


def test_input_error_after_the_results_before_it(cluster):
    """An input iterator that raises after 7 items: the 7 results, then JobError with the
    iterator's own exception at index 7."""
    ev = Events()
    cluster.submit_job(square, broken(7), ev)
    last = ev.wait()[-1]
    assert isinstance(last, JobError) and isinstance(last.error, Boom) and last.index == 7
    assert ev.values() == {i: i * i for i in range(7)}


def test_bad_options_raise_at_the_call(cluster):
    """Bad options, a bad chunksize and a non-callable on_event raise in the caller."""
    for kwargs in ({"chunksize": 0}, {"max_active": 0}, {"initializer": 1}):
        with pytest.raises((TypeError, ValueError)):
            cluster.submit_job(square, [1], Events(), **kwargs)
    with pytest.raises(TypeError):
        cluster.submit_job(square, [1], "not callable")


def test_options_and_group_shared_with_map(cluster, tmp_path):
    """A handle takes the job options; a group is shared with Cluster.map jobs of the same
    group: the initializer runs once per process over both."""
    import os

    cluster.map(tagged, range(100), chunksize=1, initializer=init_worker,
                initargs=(str(tmp_path), "H"), group="handles")
    ev = Events()
    cluster.submit_job(tagged, range(100), ev, chunksize=1, initializer=init_worker,
                       initargs=(str(tmp_path), "H"), group="handles", max_active=2)
    assert ev.wait()[-1] == JobDone(100)
    assert {tag for _, tag, _ in ev.values().values()} == {"H"}
    pids = [name.split("-")[0] for name in os.listdir(tmp_path)]
    assert len(pids) == len(set(pids))


def test_a_raising_callback_is_logged_and_the_job_goes_on(cluster, caplog):
    """An on_event that raises is logged; later events still come."""
    seen = queue.Queue()

    def bad(event):
        seen.put(event)
        if isinstance(event, JobResults):
            raise RuntimeError("callback bug")

    cluster.submit_job(square, range(20), bad, chunksize=5)
    events = []
    while not events or not isinstance(events[-1], (JobDone, JobError)):
        events.append(seen.get(timeout=60))
    assert events[-1] == JobDone(20)
    assert "callback bug" in caplog.text


def test_closing_the_cluster_ends_live_handles(make_cluster, tmp_path):
    """Cluster.close() ends every running handle with JobError(JobCancelled)."""
    lc = make_cluster(nodes=1, processes=1)
    ev = Events()
    lc.cluster.submit_job(running, [(str(tmp_path), i) for i in range(1000)], ev, chunksize=1)
    lc.cluster.close()
    last = ev.wait()[-1]
    assert isinstance(last, JobError) and isinstance(last.error, JobCancelled)


@pytest.mark.faults
def test_handle_survives_a_server_restart(make_cluster):
    """The server restarts while a handle's job runs: the event thread reconnects and
    resubmits what is unanswered; every result arrives exactly once, then JobDone."""
    lc = make_cluster(nodes=1, processes=2, reconnect_timeout=60)
    ev = Events()
    half = threading.Event()

    def on_event(event):
        ev(event)
        if len(ev.values()) >= 50:
            half.set()

    lc.cluster.submit_job(delayed, [0.01] * 300, on_event, chunksize=2)
    assert half.wait(60)
    lc.restart_server(down_for=0.5)
    assert ev.wait(90)[-1] == JobDone(300)
    assert sorted(ev.values()) == list(range(300))


@pytest.mark.faults
def test_handle_gets_connection_lost_past_the_deadline(make_cluster):
    """If the server stays away past the reconnect deadline, the handle ends with
    JobError(ConnectionLost) instead of hanging."""
    from achilles.core.errors import ConnectionLost

    lc = make_cluster(nodes=1, processes=1, reconnect_timeout=1.0)
    ev = Events()
    lc.cluster.submit_job(delayed, [0.01] * 1000, ev, chunksize=1)
    lc.server.kill()
    last = ev.wait(60)[-1]
    assert isinstance(last, JobError) and isinstance(last.error, ConnectionLost)
