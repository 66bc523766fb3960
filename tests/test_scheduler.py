"""The server's pure scheduling logic, driven directly with peers that record what they are sent."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from achilles import wire
from achilles.server.scheduler import INITIAL_CREDIT, Scheduler

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A peer handle: the scheduler has no I/O, it only calls ``send(code, *fields)``."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.sent = []

    def send(self, code, *fields):
        self.sent.append((code,) + fields)

    def of(self, code):
        return [m for m in self.sent if m[0] == code]

    def codes(self):
        return [m[0] for m in self.sent]

    def clear(self):
        self.sent.clear()


def make(prefetch=2, **kw):
    return Scheduler(prefetch=prefetch, **kw)


def controller(sched, address="10.0.0.1:5000"):
    peer = Recorder("ctrl")
    return peer, sched.add_controller(peer, address)


def node(sched, processes=1, name="n"):
    peer = Recorder(name)
    return peer, sched.add_node(peer, name, f"{name}:1", processes)


def submit(sched, ctrl, job_id, function="f", options=None):
    sched.submit(ctrl, job_id, function, b"F:" + job_id.encode(), b"C:" + job_id.encode(),
                 options or {"chunksize": 1})


def chunks(sched, ctrl, job_id, ids, n_items=1):
    for cid in ids:
        sched.add_chunk(ctrl, job_id, cid, n_items, f"{job_id}:{cid}".encode())


def tasks(peer):
    return [(m[1], m[2]) for m in peer.of(wire.TASK)]


def ok(sched, node_state, job_id, chunk_id, status=wire.OK):
    sched.result(node_state, job_id, chunk_id, status, b"R:%d" % chunk_id, 0.01)


# --- credit -----------------------------------------------------------------------------------

def test_node_credit_is_processes_times_prefetch():
    """A node is handed at most processes x prefetch chunks; each result frees one slot."""
    sched = make(prefetch=3)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", range(20))
    npeer, n = node(sched, processes=2)
    assert n.capacity == 6
    assert len(tasks(npeer)) == 6
    assert len(n.inflight) == 6
    for step in range(14):
        job_id, chunk_id = tasks(npeer)[step]
        ok(sched, n, job_id, chunk_id)
        assert len(n.inflight) <= n.capacity
        assert len(tasks(npeer)) == min(20, 7 + step)
    assert [c for _, c in tasks(npeer)] == list(range(20))


def test_credit_never_exceeded_under_random_events():
    """Under a random mix of chunks, results, joins and departures, no node ever holds more
    chunks than its credit, every chunk is in exactly one place, and the controller gets
    each chunk's RESULT exactly once."""
    for seed in range(40):
        rng = random.Random(seed)
        sched = make(prefetch=rng.randint(1, 3))
        cpeer, ctrl = controller(sched)
        submit(sched, ctrl, "j")
        nodes = {}
        next_chunk = 0
        for step in range(300):
            op = rng.random()
            if op < 0.3:
                chunks(sched, ctrl, "j", [next_chunk])
                next_chunk += 1
            elif op < 0.75:
                live = [n for n in nodes.values() if n[1].inflight]
                if live:
                    _, n = rng.choice(live)
                    job_id, cid = rng.choice(sorted(n.inflight))
                    ok(sched, n, job_id, cid)
            elif op < 0.88 or not nodes:
                peer, n = node(sched, processes=rng.randint(1, 3), name=f"n{step}")
                nodes[n.node_id] = (peer, n)
            else:
                _, n = nodes.pop(rng.choice(sorted(nodes)))
                sched.remove_node(n)
            job = sched.jobs["j"]
            located = [c.chunk_id for c in job.queue]
            for peer, n in nodes.values():
                assert len(n.inflight) <= n.capacity, f"seed {seed} step {step}"
                located += [cid for (_, cid) in n.inflight]
            results = [m[2] for m in cpeer.of(wire.RESULT)]
            assert len(results) == len(set(results)), f"duplicate RESULT, seed {seed}"
            assert sorted(located + results) == list(range(next_chunk)), f"seed {seed} step {step}"


def test_busiest_node_is_not_preferred():
    """Chunks go to the node with the most free credit, so two equal nodes share the load."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, processes=2, name="a")
    bpeer, b = node(sched, processes=2, name="b")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", range(4))
    assert len(tasks(apeer)) == 2 and len(tasks(bpeer)) == 2


# --- job code ---------------------------------------------------------------------------------

def test_job_code_sent_once_before_first_task():
    """A node gets JOB_CODE once per job, before that job's first TASK, with the job's fields."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched, processes=2)
    submit(sched, ctrl, "a", options={"x": 1})
    submit(sched, ctrl, "b")
    chunks(sched, ctrl, "a", range(3))
    chunks(sched, ctrl, "b", range(3))
    for _ in range(10):
        if not n.inflight:
            break
        job_id, cid = sorted(n.inflight)[0]
        ok(sched, n, job_id, cid)
    codes = npeer.of(wire.JOB_CODE)
    assert sorted(m[1] for m in codes) == ["a", "b"]
    assert (wire.JOB_CODE, "a", b"F:a", b"C:a", {"x": 1}) in codes
    for job_id in ("a", "b"):
        first_code = next(i for i, m in enumerate(npeer.sent)
                          if m[0] == wire.JOB_CODE and m[1] == job_id)
        first_task = next(i for i, m in enumerate(npeer.sent)
                          if m[0] == wire.TASK and m[1] == job_id)
        assert first_code < first_task
    assert len(tasks(npeer)) == 6


def test_task_fields():
    """TASK carries job id, chunk id, the controller's opaque payload, careful=False and no timeout."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    sched.add_chunk(ctrl, "j", 5, 3, b"\x80opaque")
    assert npeer.of(wire.TASK) == [(wire.TASK, "j", 5, False, None, b"\x80opaque")]


def test_each_node_gets_job_code_separately():
    """A second node gets its own JOB_CODE before running chunks of a job it has not seen."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, name="a")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", range(3))
    bpeer, b = node(sched, name="b")
    assert apeer.codes()[:2] == [wire.JOB_CODE, wire.TASK]
    assert bpeer.codes()[:2] == [wire.JOB_CODE, wire.TASK]
    assert len(apeer.of(wire.JOB_CODE)) == len(bpeer.of(wire.JOB_CODE)) == 1


# --- fairness ---------------------------------------------------------------------------------

def test_round_robin_between_two_jobs():
    """With one node of capacity 1, TASKs alternate between two jobs with queued chunks."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "a")
    submit(sched, ctrl, "b")
    chunks(sched, ctrl, "a", range(4))
    chunks(sched, ctrl, "b", range(4))
    npeer, n = node(sched, processes=1)
    order = []
    for _ in range(8):
        assert len(n.inflight) == 1
        (job_id, cid), = n.inflight
        order.append(job_id)
        ok(sched, n, job_id, cid)
    assert order == ["a", "b"] * 4
    assert [cid for j, cid in tasks(npeer) if j == "a"] == [0, 1, 2, 3]
    assert [cid for j, cid in tasks(npeer) if j == "b"] == [0, 1, 2, 3]


def test_round_robin_across_controllers():
    """Jobs of different controllers share a node fairly too."""
    sched = make(prefetch=1)
    p1, c1 = controller(sched, "c1:1")
    p2, c2 = controller(sched, "c2:1")
    submit(sched, c1, "a")
    submit(sched, c2, "b")
    chunks(sched, c1, "a", range(3))
    chunks(sched, c2, "b", range(3))
    npeer, n = node(sched)
    for _ in range(6):
        (job_id, cid), = n.inflight
        ok(sched, n, job_id, cid)
    assert [j for j, _ in tasks(npeer)] == ["a", "b"] * 3
    assert [m[2] for m in p1.of(wire.RESULT)] == [0, 1, 2]
    assert [m[2] for m in p2.of(wire.RESULT)] == [0, 1, 2]


# --- WANT -------------------------------------------------------------------------------------

def test_want_sent_when_queue_runs_low():
    """A new job is asked for input (WANT) up to the cluster's capacity, asked again whenever
    its queue runs dry, and never asked for more than the capacity still uncovered; WANT
    carries the count, the cluster's processes and its capacity."""
    sched = make(prefetch=2)
    npeer, n = node(sched, processes=2)  # capacity 4
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    job = sched.jobs["j"]
    assert cpeer.of(wire.WANT) == [(wire.WANT, "j", 4 - INITIAL_CREDIT, 2, 4)]
    for cid in range(4):
        before = len(cpeer.of(wire.WANT))
        chunks(sched, ctrl, "j", [cid])
        # the chunk went straight to the node, leaving the queue empty: ask again
        assert not job.queue
        assert len(cpeer.of(wire.WANT)) == before + 1
        assert cpeer.of(wire.WANT)[-1][2:] == (1, 2, 4)
    wanted = sum(m[2] for m in cpeer.of(wire.WANT))
    assert job.credit == INITIAL_CREDIT + wanted - 4 == 4
    # the outstanding credit already covers the target: finishing work asks for nothing more
    cpeer.clear()
    for key in sorted(n.inflight):
        ok(sched, n, *key)
    assert len(cpeer.of(wire.RESULT)) == 4
    assert cpeer.of(wire.WANT) == []


def test_no_want_while_queue_is_full():
    """With no node connected, chunks queue up to the initial credit and no WANT is sent."""
    sched = make()
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    assert cpeer.of(wire.WANT) == []  # target 2 == INITIAL_CREDIT
    chunks(sched, ctrl, "j", range(INITIAL_CREDIT))
    assert cpeer.of(wire.WANT) == []
    assert len(sched.jobs["j"].queue) == INITIAL_CREDIT


def test_queue_bounded_when_controller_sends_what_is_wanted():
    """A controller that sends exactly what WANT asks for never has more than the target
    number of chunks queued at the server, however slow the nodes are."""
    sched = make(prefetch=2)
    npeer, n = node(sched, processes=1)  # capacity 2, target max(2, 2) = 2
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    owed = INITIAL_CREDIT
    seen = 0
    next_id = 0
    for _ in range(50):
        wants = cpeer.of(wire.WANT)
        owed += sum(m[2] for m in wants[seen:])
        seen = len(wants)
        while owed:
            chunks(sched, ctrl, "j", [next_id])
            next_id += 1
            owed -= 1
            assert len(sched.jobs["j"].queue) <= max(2, sched.capacity)
        wants = cpeer.of(wire.WANT)
        owed += sum(m[2] for m in wants[seen:])
        seen = len(wants)
        key = sorted(n.inflight)[0]
        ok(sched, n, *key)
    assert len(cpeer.of(wire.RESULT)) == 50


def test_no_want_after_end():
    """Once the controller sent END, the job is never asked for more input."""
    sched = make()
    npeer, n = node(sched, processes=2)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", range(2))
    sched.end(ctrl, "j", 2)
    cpeer.clear()
    for key in sorted(n.inflight):
        ok(sched, n, *key)
    assert wire.WANT not in cpeer.codes()


def test_job_waits_without_nodes():
    """Chunks queue while no node is connected and are dispatched when one joins."""
    sched = make()
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", range(2))
    assert len(sched.jobs["j"].queue) == 2
    npeer, n = node(sched, processes=1)
    assert [c for _, c in tasks(npeer)] == [0, 1]


# --- node loss --------------------------------------------------------------------------------

def test_remove_node_requeues_inflight_chunks_to_another_node():
    """Chunks in flight on a lost node go back to the queue and run on another node,
    which first gets the job's code; the controller sees one RESULT per chunk."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, processes=3, name="a")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", range(3))
    assert sorted(c for _, c in tasks(apeer)) == [0, 1, 2]
    bpeer, b = node(sched, processes=3, name="b")
    assert bpeer.sent == []  # nothing queued when b joined
    sched.remove_node(a)
    assert not a.inflight
    assert bpeer.codes()[0] == wire.JOB_CODE
    assert sorted(c for _, c in tasks(bpeer)) == [0, 1, 2]
    assert sorted(b.inflight) == [("j", 0), ("j", 1), ("j", 2)]
    for key in sorted(b.inflight):
        ok(sched, b, *key)
    assert sorted(m[2] for m in cpeer.of(wire.RESULT)) == [0, 1, 2]
    assert all(m[5] == "b" for m in cpeer.of(wire.RESULT))


def test_requeued_chunks_go_first():
    """Re-queued chunks run before chunks still waiting in the queue, in chunk order."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, processes=2, name="a")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", range(5))  # 0, 1 on a; 2, 3, 4 queued
    sched.remove_node(a)
    bpeer, b = node(sched, processes=1, name="b")
    order = []
    for _ in range(5):
        (job_id, cid), = b.inflight
        order.append(cid)
        ok(sched, b, job_id, cid)
    assert order == [0, 1, 2, 3, 4]


def test_late_result_from_removed_node_is_ignored():
    """A RESULT arriving from a node after it was removed is dropped; the re-run's RESULT
    is the only one the controller sees."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, name="a")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    bpeer, b = node(sched, name="b")
    sched.remove_node(a)
    assert tasks(bpeer) == [("j", 0)]
    ok(sched, a, "j", 0)  # late, from the dead node
    assert cpeer.of(wire.RESULT) == []
    assert sched.jobs["j"].done == 0
    ok(sched, b, "j", 0)
    assert len(cpeer.of(wire.RESULT)) == 1
    ok(sched, b, "j", 0)  # duplicate
    assert len(cpeer.of(wire.RESULT)) == 1
    assert sched.jobs["j"].done == 1


def test_result_for_unknown_chunk_is_ignored():
    """RESULTs for chunks a node was never given (or unknown jobs) are dropped."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    ok(sched, n, "j", 99)
    ok(sched, n, "nope", 0)
    assert cpeer.of(wire.RESULT) == []
    assert ("j", 0) in n.inflight
    assert sched.jobs["j"].done == 0


def test_result_from_other_node_is_ignored():
    """A node cannot report a chunk that is in flight on a different node."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, name="a")
    bpeer, b = node(sched, name="b")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    holder, other = (a, b) if ("j", 0) in a.inflight else (b, a)
    ok(sched, other, "j", 0)
    assert cpeer.of(wire.RESULT) == []
    assert ("j", 0) in holder.inflight


def test_remove_unknown_node_is_harmless():
    """Removing a node twice is a no-op the second time."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    sched.remove_node(n)
    sched.remove_node(n)
    assert sched.nodes == {}


def test_crashed_chunk_is_retried_carefully_then_reported():
    """A chunk that kills its worker is re-sent with careful=True until max_crashes, then its
    CRASHED RESULT (with the crash count) goes to the controller."""
    sched = make(prefetch=1, max_crashes=3)
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    crash = pickle.dumps((-11, 4))
    for attempt in (1, 2):
        sched.result(n, "j", 0, wire.CRASHED, crash, 0.1)
        assert cpeer.of(wire.RESULT) == []
        assert npeer.of(wire.TASK)[-1] == (wire.TASK, "j", 0, True, None, b"j:0")
    assert len(npeer.of(wire.TASK)) == 3
    sched.result(n, "j", 0, wire.CRASHED, crash, 0.1)
    [res] = cpeer.of(wire.RESULT)
    assert res[1:4] == ("j", 0, wire.CRASHED)
    assert pickle.loads(res[6]) == (-11, 4, 3)
    assert sched.jobs["j"].failed == 1


# --- finishing --------------------------------------------------------------------------------

def test_job_finishes_after_end_and_all_results():
    """A job finishes only after END and every chunk's result; JOB_DONE goes only to nodes
    that got its code, and the job leaves the status."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, processes=2, name="a")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", range(2))
    bpeer, b = node(sched, name="b")  # joins with nothing queued: never gets the code
    keys = sorted(a.inflight)
    ok(sched, a, *keys[0])
    sched.end(ctrl, "j", 2)
    assert "j" in sched.jobs
    assert wire.JOB_DONE not in apeer.codes()
    ok(sched, a, *keys[1])
    assert "j" not in sched.jobs
    assert apeer.of(wire.JOB_DONE) == [(wire.JOB_DONE, "j")]
    assert bpeer.sent == []
    assert "j" not in ctrl.jobs
    assert sched.status()["jobs"] == []


def test_end_after_last_result_finishes_at_once():
    """END arriving after every result finishes the job immediately."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    ok(sched, n, "j", 0)
    assert "j" in sched.jobs
    sched.end(ctrl, "j", 1)
    assert "j" not in sched.jobs
    assert npeer.of(wire.JOB_DONE) == [(wire.JOB_DONE, "j")]


def test_results_without_end_do_not_finish():
    """All results in but no END: the job is still running (more input may come)."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0, 1])
    for key in sorted(n.inflight):
        ok(sched, n, *key)
    assert sched.jobs["j"].state == "running"
    assert wire.JOB_DONE not in npeer.codes()


def test_failed_chunks_count_towards_completion():
    """ITEM_ERROR results count as finished chunks: the job completes and counts a failure."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0, 1], n_items=5)
    sched.end(ctrl, "j", 2)
    ok(sched, n, "j", 0, status=wire.ITEM_ERROR)
    assert sched.jobs["j"].failed == 1
    ok(sched, n, "j", 1)
    assert "j" not in sched.jobs
    assert n.done == 5
    assert [m[3] for m in cpeer.of(wire.RESULT)] == [wire.ITEM_ERROR, wire.OK]


def test_result_is_forwarded_verbatim():
    """The controller receives RESULT (job, chunk, status, elapsed, node name, payload)."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched, name="worker-1")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [3])
    sched.result(n, "j", 3, wire.OK, b"\x00payload", 1.5)
    assert cpeer.of(wire.RESULT) == [(wire.RESULT, "j", 3, wire.OK, 1.5, "worker-1",
                                      b"\x00payload")]


# --- cancelling -------------------------------------------------------------------------------

def test_cancel_drops_queue_and_tells_nodes():
    """cancel discards queued chunks, sends CANCEL to nodes holding the job's code, frees
    their credit for other jobs, and drops later results of the cancelled job."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched, processes=1)
    submit(sched, ctrl, "a")
    chunks(sched, ctrl, "a", range(5))
    submit(sched, ctrl, "b")
    chunks(sched, ctrl, "b", [0])
    assert list(n.inflight) == [("a", 0)]
    sched.cancel(ctrl, "a", "user asked")
    assert "a" not in sched.jobs
    assert npeer.of(wire.CANCEL) == [(wire.CANCEL, "a", "user asked")]
    assert list(n.inflight) == [("b", 0)]  # freed credit went to the other job
    ok(sched, n, "a", 0)
    assert all(m[1] != "a" for m in cpeer.of(wire.RESULT))
    assert [c for j, c in tasks(npeer) if j == "a"] == [0]
    assert [j["id"] for j in sched.status()["jobs"]] == ["b"]


def test_cancel_skips_nodes_without_the_code():
    """Only nodes that received the job's code are told to CANCEL it."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, name="a")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    bpeer, b = node(sched, name="b")
    sched.cancel(ctrl, "j")
    assert len(apeer.of(wire.CANCEL)) == 1
    assert bpeer.of(wire.CANCEL) == []


def test_cancel_by_other_controller_is_ignored():
    """A controller cannot cancel, feed or end another controller's job."""
    sched = make()
    p1, c1 = controller(sched, "c1:1")
    p2, c2 = controller(sched, "c2:1")
    npeer, n = node(sched)
    submit(sched, c1, "j")
    sched.cancel(c2, "j")
    sched.add_chunk(c2, "j", 0, 1, b"evil")
    sched.end(c2, "j", 0)
    assert sched.jobs["j"].state == "running"
    assert sched.jobs["j"].sent == 0
    assert npeer.sent == []


def test_duplicate_job_id_is_refused():
    """Submitting a job id already in use answers JOB_FAILED and keeps the first job."""
    sched = make()
    p1, c1 = controller(sched, "c1:1")
    p2, c2 = controller(sched, "c2:1")
    submit(sched, c1, "j", function="first")
    submit(sched, c2, "j", function="second")
    assert p2.of(wire.JOB_FAILED) and p2.of(wire.JOB_FAILED)[0][1] == "j"
    assert sched.jobs["j"].function == "first"
    assert sched.jobs["j"].owner is c1


def test_remove_controller_cancels_its_jobs():
    """A departing controller's jobs are cancelled on the nodes; other jobs keep running."""
    sched = make(prefetch=1)
    p1, c1 = controller(sched, "c1:1")
    p2, c2 = controller(sched, "c2:1")
    npeer, n = node(sched, processes=2)
    submit(sched, c1, "a")
    submit(sched, c2, "b")
    chunks(sched, c1, "a", range(3))
    chunks(sched, c2, "b", range(3))
    sched.remove_controller(c1)
    assert "a" not in sched.jobs and "b" in sched.jobs
    assert c1.controller_id not in sched.controllers
    cancels = npeer.of(wire.CANCEL)
    assert [m[1] for m in cancels] == ["a"]
    assert "disconnect" in cancels[0][2]
    assert all(j == "b" for j, _ in n.inflight)
    sched.remove_controller(c1)  # twice is harmless
    assert len(npeer.of(wire.CANCEL)) == 1


# --- status -----------------------------------------------------------------------------------

def test_status_is_json_with_documented_keys():
    """status() is JSON-serializable and lists nodes (name, address, processes, busy, done)
    and jobs (id, owner, function, sent, done, failed) with current numbers."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched, "10.1.2.3:4567")
    npeer = Recorder()
    n = sched.add_node(npeer, "alpha", "10.9.9.9:1", 2, "host-a", 1234, {"gpu": 1.0})
    submit(sched, ctrl, "j", function="mymod.square")
    chunks(sched, ctrl, "j", range(3), n_items=4)
    ok(sched, n, "j", 0)
    status = json.loads(json.dumps(sched.status()))
    [nd] = status["nodes"]
    assert {"name", "address", "processes", "busy", "done"} <= set(nd)
    assert (nd["name"], nd["address"], nd["processes"], nd["busy"], nd["done"]) == \
        ("alpha", "10.9.9.9:1", 2, 2, 4)
    [jb] = status["jobs"]
    assert {"id", "owner", "function", "sent", "done", "failed"} <= set(jb)
    assert (jb["id"], jb["owner"], jb["function"], jb["sent"], jb["done"], jb["failed"]) == \
        ("j", "10.1.2.3:4567", "mymod.square", 12, 4, 0)


def test_status_empty_cluster():
    """An empty scheduler reports no nodes and no jobs."""
    assert json.loads(json.dumps(make().status())) == {"nodes": [], "jobs": []}
