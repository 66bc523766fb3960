"""The controller's typed events, its one failure-to-exception function, routing done on the
reactor thread, the JobLink hook (ObservedLink), and one reconnect policy for new and running
calls (a call started while the server restarts waits for it like a running one)."""

from __future__ import annotations

import logging
import pickle
import socket
import threading

import pytest

from achilles.core import wire
from achilles.core.config import Config
from achilles.controller import reactor_thread
from achilles.controller.cluster import Cluster
from achilles.controller.events import ChunkResult, ObservedLink, Want
from achilles.controller.failures import failure_exception
from achilles.controller.job import JobRun
from achilles.core.errors import AchillesError, ConnectionFailed, TaskTimeout, WorkerCrashed
from achilles.core.serialization import dumps_data, error_record
from conftest import wait_for
from tasks import square

pytestmark = pytest.mark.timeout(120)


# --- failure records ----------------------------------------------------------------------------

def test_item_error_record_becomes_the_task_exception():
    """An ITEM_ERROR record gives back the task's own exception, its index in the chunk and the
    results before it."""
    exc, index, partial = failure_exception(
        wire.ITEM_ERROR, error_record(2, ValueError("bad 7"), [1, 4]), "mod.fn", "n1", 5, 4)
    assert isinstance(exc, ValueError) and str(exc) == "bad 7"
    assert (index, partial) == (2, [1, 4])


def test_crash_record_names_the_input_item_of_a_map_chunk():
    """A CRASHED record of a map chunk names the failing item by its input position and the
    node; without a known item it names the chunk's span; the old 2-field record counts once."""
    exc, index, partial = failure_exception(wire.CRASHED, pickle.dumps((-11, 1, 3)), "mod.fn",
                                            "n1", 10, 4)
    assert isinstance(exc, WorkerCrashed) and exc.item == 11 and index == 1 and partial == []
    assert str(exc) == ("item 11 of mod.fn killed its worker process 3 times "
                        "(last: killed by SIGSEGV on node n1)")
    exc, _, _ = failure_exception(wire.CRASHED, pickle.dumps((3, None)), "mod.fn", "n1", 10, 4)
    assert isinstance(exc, WorkerCrashed) and exc.item is None
    assert str(exc).startswith("items 10..13 of mod.fn killed its worker process 1 times")


def test_graph_task_records_name_the_task():
    """For a graph task (no input span) crash and timeout messages name the task."""
    exc, _, _ = failure_exception(wire.CRASHED, pickle.dumps((-9, None, 2)), "task f#3")
    assert str(exc) == "task f#3 killed its worker process 2 times (last: killed by SIGKILL)"
    exc, _, _ = failure_exception(wire.TIMED_OUT, pickle.dumps(1.5), "task f#3")
    assert isinstance(exc, TaskTimeout)
    assert str(exc).startswith("task f#3 ran past its 1.5 s timeout")


def test_unknown_status_is_a_clear_error():
    """A status this controller does not know becomes an AchillesError saying what to do."""
    exc, _, _ = failure_exception(99, b"", "mod.fn")
    assert isinstance(exc, AchillesError) and "upgrade Achilles" in str(exc)


class ScriptedLink:
    """A JobLink that records what a run sends and delivers the events a test scripts."""

    def __init__(self) -> None:
        self.sent = []
        self.sinks = {}

    def register(self, job_id, sink):
        self.sinks[job_id] = sink
        return 1

    def unregister(self, job_id):
        self.sinks.pop(job_id, None)

    def send(self, messages):
        self.sent.extend(wire.HEADER.unpack_from(b"".join(m[:1]))[0] for m in messages)

    def reconnect(self, job_id, sink):
        raise AssertionError("no reconnect expected")


def test_input_found_exhausted_after_the_last_result_still_finishes():
    """When the credit to probe the input's end only comes after the last result (a WANT
    after the final RESULT), the run sends END and finishes instead of waiting forever."""
    link = ScriptedLink()
    run = JobRun(link, square, range(4), 2, None, True)
    assert link.sent == [wire.SUBMIT, wire.CHUNK, wire.CHUNK]
    [sink] = link.sinks.values()
    sink.put(ChunkResult(0, wire.OK, dumps_data([0, 1]), 0.01, "n"))
    sink.put(ChunkResult(1, wire.OK, dumps_data([4, 9]), 0.01, "n"))
    sink.put(Want(1, 2, 2))
    box = {}
    consumer = threading.Thread(target=lambda: box.update(out=list(run.chunks())), daemon=True)
    consumer.start()
    consumer.join(20)
    assert not consumer.is_alive(), "the run waits for an event that never comes"
    assert box["out"] == [[0, 1], [4, 9]]
    assert link.sent[-1] == wire.END and wire.CANCEL not in link.sent


# --- routing and the JobLink hook ---------------------------------------------------------------

def test_observed_link_sees_each_chunk_result(cluster):
    """An ObservedLink around a Cluster sees every event of a job on the way to the run: one OK
    ChunkResult per chunk, WANTs included, and the results are unchanged."""
    seen = []
    link = ObservedLink(cluster, lambda job_id, event: seen.append((job_id, event)))
    run = JobRun(link, square, range(20), 5, None, True)
    out = [x for chunk in run.chunks() for x in chunk]
    assert out == [x * x for x in range(20)]
    results = [e for j, e in seen if isinstance(e, ChunkResult)]
    assert {j for j, _ in seen} == {run.job_id}
    assert sorted(e.chunk_id for e in results) == [0, 1, 2, 3]
    assert all(e.status == wire.OK for e in results)
    assert any(isinstance(e, Want) for _, e in seen)


def test_failing_observer_does_not_break_the_job(cluster):
    """An observer that raises is logged; the job still gets every event and completes."""
    def broken(job_id, event):
        raise RuntimeError("observer bug")

    run = JobRun(ObservedLink(cluster, broken), square, range(6), 2, None, False)
    assert sorted(x for chunk in run.chunks() for x in chunk) == [x * x for x in range(6)]


def test_routing_tables_change_only_on_the_reactor_thread(cluster):
    """Events are put from the reactor thread, and a finished job leaves no routing entry
    behind (unregistering is posted to the reactor thread)."""
    threads = set()

    def observe(job_id, event):
        threads.add(threading.current_thread().name)

    run = JobRun(ObservedLink(cluster, observe), square, range(4), 2, None, True)
    assert [x for chunk in run.chunks() for x in chunk] == [0, 1, 4, 9]
    assert threads == {"achilles-reactor"}
    proto = cluster._protocol()
    wait_for(lambda: reactor_thread.call(lambda: run.job_id not in proto.jobs, timeout=10),
             what="the job's routing entry to go")


# --- one reconnect policy -----------------------------------------------------------------------

def test_call_started_while_server_restarts_waits_and_completes(make_cluster, caplog):
    """A map started while the server is down (on a Cluster that was connected) waits for the
    server like a running call does, and completes once it is back on the same port."""
    caplog.set_level(logging.WARNING, logger="achilles.controller")
    lc = make_cluster(nodes=1, processes=2, reconnect_timeout=60)
    lc.server.kill()
    lc.server.wait(10)
    box = {}

    def run():
        try:
            box["out"] = lc.cluster.map(square, range(30), chunksize=3)
        except BaseException as exc:
            box["error"] = exc

    caller = threading.Thread(target=run)
    caller.start()
    wait_for(lambda: any("retrying for up to" in r.getMessage() for r in caplog.records)
             or not caller.is_alive(), what="the call to wait for the server")
    assert "error" not in box, box.get("error")
    lc.restart_server()
    caller.join(90)
    assert not caller.is_alive()
    assert box.get("out") == [x * x for x in range(30)], box.get("error")


def test_new_call_fails_after_the_reconnect_timeout(make_cluster):
    """If the server stays away past ACHILLES_RECONNECT_TIMEOUT, a new call fails with a
    ConnectionFailed naming that setting."""
    lc = make_cluster(nodes=1, processes=1, reconnect_timeout=0.5)
    proto = lc.cluster._proto
    lc.server.kill()
    lc.server.wait(10)
    # A call made before the reactor thread has seen the close starts on the old connection
    # and fails as a running call (ConnectionLost); this test is about a new call.
    wait_for(lambda: proto.state == "closed", what="the controller to see the server go")
    with pytest.raises(ConnectionFailed, match="ACHILLES_RECONNECT_TIMEOUT"):
        lc.cluster.map(square, range(3))


@pytest.mark.timeout(30)
def test_server_never_reached_fails_fast():
    """A Cluster whose server never existed fails at once with the clear ConnectionFailed, even
    with a long reconnect timeout (it never waits for a server it has not reached)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = Config(host="127.0.0.1", port=port, username="tester", secret_key="x" * 32)
    cfg.reconnect_timeout = 600
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port}.*connection refused"):
        Cluster(cfg)
