"""The server's pure scheduling logic, driven directly with peers that record what they are sent."""

from __future__ import annotations

import collections
import json
import pickle
import random

import pytest

from achilles.core import wire
from achilles.server.scheduler import INITIAL_CREDIT, JOB_DONE_BATCH, JOB_DONE_DELAY, Scheduler

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
    """A scheduler on a test clock (so no timer ever reaches the real reactor)."""
    from twisted.internet.task import Clock

    kw.setdefault("clock", Clock())
    return Scheduler(prefetch=prefetch, **kw)


def settle(sched):
    """Let the scheduler's short timers (the batched JOB_DONE) fire."""
    sched.clock.advance(JOB_DONE_DELAY)


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
            sched.check_invariants()
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


def test_idle_nodes_take_turns_when_chunks_trickle_in():
    """Among nodes with equally much free credit, the one that has waited longest gets the
    next chunk: when chunks arrive one at a time and each is answered at once, five nodes
    take them in turn, and a node that just answered does not jump ahead of one that never
    got any."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    nodes = [node(sched, processes=1, name=f"n{i}") for i in range(5)]
    submit(sched, ctrl, "j")
    order = []
    for cid in range(15):
        chunks(sched, ctrl, "j", [cid])
        (who,) = [(peer, n) for peer, n in nodes if (("j", cid) in tasks(peer))]
        order.append(who[1].name)
        ok(sched, who[1], "j", cid)
    assert sorted(order[:5]) == [f"n{i}" for i in range(5)]
    assert order[5:10] == order[:5] and order[10:] == order[:5]


def test_free_slots_hand_out_the_longest_waiting_node_first():
    """FreeSlots.best() is the node that reached the top free-credit level first, whichever
    nodes moved through other levels since, for base and fast credit alike."""
    from achilles.server.dispatch import FreeSlots, NodeState, fast_free

    for level_of in ("base", "fast"):
        slots = FreeSlots() if level_of == "base" else FreeSlots(fast_free)
        ns = [NodeState(Recorder(), i, f"n{i}", "", processes=2, prefetch=1, depth=1)
              for i in range(4)]
        for n in ns:
            slots.add(n)

        def hold(n, k):
            if level_of == "base":
                n.held += k
            else:
                n.fast_held += k
            slots.update(n)

        assert slots.best() is ns[0]
        hold(ns[0], 1)  # n0 drops a level, then comes back: behind n1, n2, n3
        hold(ns[0], -1)
        got = []
        for _ in range(4):
            best = slots.best()
            got.append(best.name)
            hold(best, 2)
        assert got == ["n1", "n2", "n3", "n0"]
        assert slots.best() is None
        for name in ("n2", "n0", "n3", "n1"):
            hold(ns[int(name[1])], -2)
        assert slots.best() is ns[2]
        slots.discard(ns[2])
        assert slots.best() is ns[0]
        slots.check({n.node_id: n for n in ns if n is not ns[2]})


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
    settle(sched)
    assert apeer.of(wire.JOB_DONE) == [(wire.JOB_DONE, ["j"])]
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
    settle(sched)
    assert npeer.of(wire.JOB_DONE) == [(wire.JOB_DONE, ["j"])]


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


def test_duplicate_job_id_on_one_connection_is_refused():
    """The same controller submitting a job id it already runs gets JOB_FAILED; the first
    job is kept."""
    sched = make()
    p1, c1 = controller(sched, "c1:1")
    submit(sched, c1, "j", function="first")
    submit(sched, c1, "j", function="second")
    assert p1.of(wire.JOB_FAILED) and p1.of(wire.JOB_FAILED)[0][1] == "j"
    assert sched.jobs["j"].function == "first"
    sched.check_invariants()


def test_job_id_resubmitted_from_a_new_connection_resumes_there():
    """A job id resubmitted on another connection (its controller reconnected before the
    server noticed the old link died) moves there: the old copy is cancelled on the nodes,
    its late results are dropped, and only the new copy's results reach the controller."""
    sched = make(prefetch=1)
    p1, c1 = controller(sched, "c1:1")
    npeer, n = node(sched, processes=1)
    submit(sched, c1, "j", function="first")
    chunks(sched, c1, "j", range(1))
    [task] = npeer.of(wire.TASK)
    p2, c2 = controller(sched, "c1:2")
    submit(sched, c2, "j", function="first")
    assert sched.jobs["j"].owner is c2
    assert [m[1] for m in npeer.of(wire.CANCEL)] == ["j"]
    sched.result(n, "j", task[2], wire.OK, b"late", 0.1)  # the old copy's result: dropped
    assert not p1.of(wire.RESULT) and not p2.of(wire.RESULT)
    chunks(sched, c2, "j", range(1))
    sched.check_invariants()
    [task] = npeer.of(wire.TASK)[1:]
    sched.result(n, "j", task[2], wire.OK, b"fresh", 0.1)
    assert [bytes(m[-1]) for m in p2.of(wire.RESULT)] == [b"fresh"]
    sched.check_invariants()


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


# --- invariants under random events -----------------------------------------------------------

def graph_tasks(rng, n):
    """A random DAG of ``n`` tasks in GRAPH's wire form, some with retries or resource needs."""
    out = []
    for tid in range(n):
        deps = sorted(rng.sample(range(tid), rng.randint(0, min(2, tid))))
        options = {}
        if rng.random() < 0.3:
            options["retries"] = rng.randint(1, 2)
            options["retry_delay"] = rng.choice([0.0, 0.25, 1.0])
        if rng.random() < 0.15:
            options["resources"] = {"gpu": 1}
        out.append((tid, f"t{tid}", deps, options, "f", b""))
    return out


CRASH = pickle.dumps((-9, None))


def test_invariants_hold_under_random_events():
    """Random joins and departures of nodes and controllers, map and graph jobs, chunks, END,
    results (OK, ITEM_ERROR, TIMED_OUT, CRASHED), retry timers, cancels and malformed results:
    check_invariants holds after every step, no chunk's result reaches its controller twice,
    and once the input ends and nodes answer, every job completes with every chunk settled."""
    from twisted.internet.task import Clock

    from achilles.core.errors import ProtocolError

    stats = collections.Counter()
    for seed in range(30):
        rng = random.Random(seed)
        clock = Clock()
        sched = make(prefetch=rng.randint(1, 3), max_crashes=2, clock=clock)
        ctrls = []  # (peer, state)
        nodes = []  # (peer, state)
        maps = {}  # job id -> [owner peer, next chunk id, ended]
        graphs = {}  # job id -> (owner peer, number of tasks)
        counter = iter(range(10**6))
        dropped = set()  # jobs cancelled or whose controller left

        def new_node():
            res = {"gpu": 1.0} if rng.random() < 0.4 else {}
            peer = Recorder()
            name = f"n{next(counter)}"
            nodes.append((peer, sched.add_node(peer, name, f"{name}:1", rng.randint(1, 3),
                                               resources=res)))

        def settle_one(status=None):
            live = [n for _, n in nodes if n.inflight]
            if not live:
                return
            n = rng.choice(live)
            job_id, cid = rng.choice(sorted(n.inflight))
            status = status if status is not None else rng.choice(
                [wire.OK] * 6 + [wire.ITEM_ERROR, wire.TIMED_OUT, wire.CRASHED])
            payload = CRASH if status == wire.CRASHED else pickle.dumps(cid)
            sched.result(n, job_id, cid, status, payload, 0.01)

        for step in range(250):
            op = rng.random()
            live_ctrls = [c for c in ctrls if c[1].controller_id in sched.controllers]
            running_maps = [j for j in maps if j in sched.jobs and not maps[j][2]]
            if op < 0.06 or not live_ctrls:
                peer = Recorder("ctrl")
                ctrls.append((peer, sched.add_controller(peer, f"c{step}:1")))
            elif op < 0.14:
                new_node()
            elif op < 0.18 and nodes:
                _, n = nodes.pop(rng.randrange(len(nodes)))
                sched.remove_node(n)
            elif op < 0.24:
                peer, c = rng.choice(live_ctrls)
                job_id = f"m{step}"
                submit(sched, c, job_id)
                maps[job_id] = [peer, 0, False]
            elif op < 0.28:
                peer, c = rng.choice(live_ctrls)
                job_id = f"g{step}"
                n_tasks = rng.randint(1, 6)
                sched.submit_graph(c, job_id, b"FUNCS", graph_tasks(rng, n_tasks),
                                   list(range(n_tasks)))
                graphs[job_id] = (peer, n_tasks)
            elif op < 0.45 and running_maps:
                job_id = rng.choice(running_maps)
                c = sched.jobs[job_id].owner
                chunks(sched, c, job_id, [maps[job_id][1]], n_items=rng.randint(1, 4))
                maps[job_id][1] += 1
            elif op < 0.5 and running_maps:
                job_id = rng.choice(running_maps)
                sched.end(sched.jobs[job_id].owner, job_id, maps[job_id][1])
                maps[job_id][2] = True
            elif op < 0.78:
                settle_one()
            elif op < 0.84:
                clock.advance(rng.choice([0.001, 0.1, 0.3, 1.0]))
            elif op < 0.87 and sched.jobs:
                job = sched.jobs[rng.choice(sorted(sched.jobs))]
                dropped.add(job.job_id)
                sched.cancel(job.owner, job.job_id, "test")
            elif op < 0.89 and len(live_ctrls) > 1:
                c = rng.choice(live_ctrls)[1]
                dropped.update(c.jobs)
                sched.remove_controller(c)
            elif op < 0.92:
                live = [(p, n) for p, n in nodes if n.inflight]
                if live:
                    pair = rng.choice(live)
                    key = sorted(pair[1].inflight)[0]
                    with pytest.raises(ProtocolError):
                        sched.result(pair[1], *key, wire.CRASHED, b"not a pickle", 0.1)
                    assert sched.where(*key) is pair[1]
                    sched.check_invariants()
                    nodes.remove(pair)
                    sched.remove_node(pair[1])  # what the connection layer does next
            sched.check_invariants()

        # the input ends, a node that offers everything joins, and every chunk is answered
        for job_id, (peer, n_sent, ended) in maps.items():
            if job_id in sched.jobs and not ended:
                sched.end(sched.jobs[job_id].owner, job_id, n_sent)
        peer = Recorder()
        nodes.append((peer, sched.add_node(peer, "big", "big:1", 2, resources={"gpu": 9.0})))
        for _ in range(5000):
            if not sched.jobs:
                break
            if any(n.inflight for _, n in nodes):
                settle_one(wire.OK)
            else:
                clock.advance(1.0)
            sched.check_invariants()
        assert not sched.jobs, f"seed {seed}: jobs never finished: {sorted(sched.jobs)}"
        clock.advance(JOB_DONE_DELAY)  # the last batched JOB_DONEs go out
        assert not clock.getDelayedCalls(), f"seed {seed}: timers left behind"
        for _, n in nodes:
            assert not n.done_pending, f"seed {seed}: node {n.name} never told of finished jobs"
        for job_id, (cpeer, n_sent, _) in maps.items():
            got = [m[2] for m in cpeer.of(wire.RESULT) if m[1] == job_id]
            assert len(got) == len(set(got)), f"seed {seed}: duplicate RESULT in {job_id}"
            if job_id not in dropped:
                assert sorted(got) == list(range(n_sent)), f"seed {seed}: {job_id} lost chunks"
        for job_id, (cpeer, n_tasks) in graphs.items():
            got = [m[2] for m in cpeer.of(wire.TASK_DONE) if m[1] == job_id]
            assert len(got) == len(set(got)), f"seed {seed}: duplicate TASK_DONE in {job_id}"
            if job_id not in dropped:
                assert [m[1] for m in cpeer.of(wire.GRAPH_DONE)].count(job_id) == 1, \
                    f"seed {seed}: {job_id} did not finish once"
        stats["results"] += sum(len(p.of(wire.RESULT)) for p, _ in ctrls)
        stats["graphs"] += sum(len(p.of(wire.GRAPH_DONE)) for p, _ in ctrls)
        stats["dropped"] += len(dropped)
    assert min(stats.values()) > 20, stats  # the random walk did reach these paths


def test_every_chunk_answered_once_without_cancels():
    """With no cancels or disconnects, random node churn and crash retries still give each
    map chunk exactly one RESULT and each graph exactly one GRAPH_DONE with one TASK_DONE
    per task that ran or failed."""
    from twisted.internet.task import Clock

    for seed in range(20):
        rng = random.Random(1000 + seed)
        clock = Clock()
        sched = make(prefetch=rng.randint(1, 2), max_crashes=3, clock=clock)
        cpeer, ctrl = controller(sched)
        nodes = []
        for j in range(3):
            submit(sched, ctrl, f"m{j}")
        chunks_sent = {f"m{j}": 0 for j in range(3)}
        sched.submit_graph(ctrl, "g", b"FUNCS", graph_tasks(rng, 8), list(range(8)))
        for step in range(300):
            op = rng.random()
            if op < 0.1 or not nodes:
                peer = Recorder()
                nodes.append(sched.add_node(peer, f"n{step}", "x:1", rng.randint(1, 3),
                                            resources={"gpu": 1.0}))
            elif op < 0.15 and len(nodes) > 1:
                sched.remove_node(nodes.pop(rng.randrange(len(nodes))))
            elif op < 0.45:
                job_id = rng.choice(sorted(chunks_sent))
                chunks(sched, ctrl, job_id, [chunks_sent[job_id]])
                chunks_sent[job_id] += 1
            elif op < 0.95:
                live = [n for n in nodes if n.inflight]
                if live:
                    n = rng.choice(live)
                    key = rng.choice(sorted(n.inflight))
                    status = rng.choice([wire.OK] * 5 + [wire.CRASHED, wire.ITEM_ERROR])
                    sched.result(n, *key, status, CRASH if status == wire.CRASHED else b"v", 0.0)
            else:
                clock.advance(0.5)
            sched.check_invariants()
        for job_id, n in chunks_sent.items():
            sched.end(ctrl, job_id, n)
        for _ in range(5000):
            if not sched.jobs:
                break
            live = [n for n in nodes if n.inflight]
            if live:
                key = sorted(live[0].inflight)[0]
                sched.result(live[0], *key, wire.OK, b"v", 0.0)
            else:
                clock.advance(1.0)
            sched.check_invariants()
        assert not sched.jobs, f"seed {seed}"
        for job_id, n in chunks_sent.items():
            got = sorted(m[2] for m in cpeer.of(wire.RESULT) if m[1] == job_id)
            assert got == list(range(n)), f"seed {seed} {job_id}"
        assert len(cpeer.of(wire.GRAPH_DONE)) == 1
        report = cpeer.of(wire.GRAPH_DONE)[0][2]
        ran = sorted(t for t, r in report.items() if r["state"] in ("done", "failed"))
        assert sorted(m[2] for m in cpeer.of(wire.TASK_DONE)) == ran


# --- dispatch cost ----------------------------------------------------------------------------

class Null:
    """A peer that drops what it is sent (counts TASKs only)."""

    def __init__(self):
        self.tasks = 0

    def send(self, code, *fields):
        if code == wire.TASK:
            self.tasks += 1


def test_dispatch_examines_constant_nodes_whatever_the_cluster_size():
    """Dispatching a chunk without resource needs examines the same small number of nodes
    (counted by the policy) with 10, 100 or 1,000 nodes: the free-credit index, not a scan."""
    per_dispatch = {}
    for n_nodes in (10, 100, 1000):
        sched = make(prefetch=2)
        cpeer = Null()
        ctrl = sched.add_controller(cpeer, "c:1")
        peers = [Null() for _ in range(n_nodes)]
        nodes = [sched.add_node(p, f"n{i}", "x:1", 4) for i, p in enumerate(peers)]
        submit(sched, ctrl, "j")
        before = sched.policy.examined
        dispatched = 0
        for cid in range(3000):
            sched.add_chunk(ctrl, "j", cid, 1, b"x")
            if cid % 3 == 2:  # keep some chunks in flight, free others
                for n in nodes[:5]:
                    for key in list(n.inflight)[:1]:
                        # slow chunks: the policy places each (fast ones go a group at a time)
                        sched.result(n, *key, wire.OK, b"r", 1.0)
        dispatched = sum(p.tasks for p in peers)
        per_dispatch[n_nodes] = (sched.policy.examined - before) / dispatched
        sched.check_invariants()
    assert per_dispatch[10] == per_dispatch[100] == per_dispatch[1000] == 1.0, per_dispatch


def test_running_totals_follow_joins_and_departures():
    """processes and capacity are kept as running totals that match the connected nodes."""
    sched = make(prefetch=3)
    a = sched.add_node(Null(), "a", "a:1", 2)
    b = sched.add_node(Null(), "b", "b:1", 5)
    assert (sched.processes, sched.capacity) == (7, 21)
    sched.remove_node(a)
    assert (sched.processes, sched.capacity) == (5, 15)
    sched.remove_node(a)
    sched.remove_node(b)
    assert (sched.processes, sched.capacity) == (0, 0)
    sched.check_invariants()


# --- clock ------------------------------------------------------------------------------------

def test_retry_delay_uses_the_injected_clock():
    """A failed graph task with retries waits retry_delay on the scheduler's clock (no real
    sleep) before it is queued and sent again; while it waits its node's credit serves others."""
    from twisted.internet.task import Clock

    clock = Clock()
    sched = make(prefetch=1, clock=clock)
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    sched.submit_graph(ctrl, "g", b"FUNCS",
                       [(0, "flaky", [], {"retries": 1, "retry_delay": 0.25}, "f", b"")], [0])
    assert tasks(npeer) == [("g", 0)]
    sched.result(n, "g", 0, wire.ITEM_ERROR, b"err", 0.01)
    sched.check_invariants()
    assert not n.inflight and sched.jobs["g"].retrying
    clock.advance(0.249)
    assert tasks(npeer) == [("g", 0)]
    clock.advance(0.001)
    assert tasks(npeer) == [("g", 0), ("g", 0)]
    sched.check_invariants()
    sched.result(n, "g", 0, wire.OK, b"v", 0.01)
    assert "g" not in sched.jobs
    assert cpeer.of(wire.GRAPH_DONE)[0][2][0]["attempts"] == 2


def test_cancel_stops_pending_retry_timer():
    """Cancelling a graph whose task waits for a retry cancels the timer; advancing the clock
    sends nothing more."""
    from twisted.internet.task import Clock

    clock = Clock()
    sched = make(prefetch=1, clock=clock)
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    sched.submit_graph(ctrl, "g", b"FUNCS",
                       [(0, "flaky", [], {"retries": 3, "retry_delay": 5}, "f", b"")], [0])
    sched.result(n, "g", 0, wire.TIMED_OUT, b"err", 0.01)
    assert len(clock.getDelayedCalls()) == 1
    sched.cancel(ctrl, "g")
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert len(tasks(npeer)) == 1
    sched.check_invariants()


def test_job_duration_uses_the_clock():
    """A job's start time comes from the injected clock (durations), not wall time."""
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1234.5)
    sched = make(clock=clock)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    assert sched.jobs["j"].started == 1234.5


# --- hardening --------------------------------------------------------------------------------

def test_huge_process_count_is_clamped_and_want_bounded():
    """A node claiming 10**9 processes counts as MAX_NODE_PROCESSES, and no WANT ever asks a
    controller for more than MAX_WANT chunks."""
    from achilles.server.scheduler import MAX_NODE_PROCESSES, MAX_WANT

    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    n = sched.add_node(Recorder(), "liar", "x:1", 10**9)
    assert n.processes == MAX_NODE_PROCESSES
    assert sched.capacity == MAX_NODE_PROCESSES * 2
    submit(sched, ctrl, "j")
    for cid in range(50):
        sched.add_chunk(ctrl, "j", cid, 1, b"x")
    wants = cpeer.of(wire.WANT)
    assert wants and all(0 < m[2] <= MAX_WANT for m in wants)
    sched.check_invariants()


def test_malformed_crash_payload_leaves_chunk_in_flight():
    """A CRASHED result whose payload is not (exitcode, item) raises ProtocolError with the
    chunk still in flight and the bookkeeping intact; removing the node (as the connection
    layer does) re-queues it and the job completes on another node."""
    from achilles.core.errors import ProtocolError

    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, name="a")
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    sched.end(ctrl, "j", 1)
    for bad in (b"garbage", pickle.dumps("text"), pickle.dumps((1, 2, 3, 4)),
                pickle.dumps(("x", None))):
        with pytest.raises(ProtocolError, match="CRASHED"):
            sched.result(a, "j", 0, wire.CRASHED, bad, 0.1)
        assert ("j", 0) in a.inflight and sched.where("j", 0) is a
        sched.check_invariants()
    bpeer, b = node(sched, name="b")
    sched.remove_node(a)
    sched.check_invariants()
    assert tasks(bpeer) == [("j", 0)]
    ok(sched, b, "j", 0)
    assert "j" not in sched.jobs
    assert [m[2] for m in cpeer.of(wire.RESULT)] == [0]


def test_unknown_status_or_bad_fields_raise_without_change():
    """A RESULT with an unknown status, a non-bytes payload or malformed ids raises
    ProtocolError and changes nothing."""
    from achilles.core.errors import ProtocolError

    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    with pytest.raises(ProtocolError, match="unknown status"):
        sched.result(n, "j", 0, 99, b"x", 0.1)
    with pytest.raises(ProtocolError):
        sched.result(n, "j", 0, wire.OK, ["not", "bytes"], 0.1)
    with pytest.raises(ProtocolError):
        sched.result(n, ["j"], 0, wire.OK, b"x", 0.1)
    with pytest.raises(ProtocolError):
        sched.result(n, "j", 0, wire.OK, b"x", "slow")
    assert ("j", 0) in n.inflight and cpeer.of(wire.RESULT) == []
    sched.check_invariants()


def test_duplicate_live_chunk_id_is_a_protocol_error():
    """A controller sending a chunk id that is still queued or in flight is refused with
    ProtocolError, and the first chunk is untouched."""
    from achilles.core.errors import ProtocolError

    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    with pytest.raises(ProtocolError, match="twice"):
        chunks(sched, ctrl, "j", [0])
    assert sched.jobs["j"].sent == 1
    sched.check_invariants()


def test_counters_are_items_and_failed_chunks():
    """done and sent count items; failed counts chunks; status shows both kinds of figure."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched, processes=2)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0, 1], n_items=5)
    ok(sched, n, "j", 0)
    ok(sched, n, "j", 1, status=wire.ITEM_ERROR)
    job = sched.jobs["j"]
    assert (job.items_sent, job.items_done, job.chunks_done, job.chunks_failed) == (10, 5, 2, 1)
    [st] = sched.status()["jobs"]
    assert (st["sent"], st["done"], st["failed"], st["chunks_done"], st["kind"]) == \
        (10, 5, 1, 2, "map")


# --- batches ----------------------------------------------------------------------------------

def test_a_batch_holds_dispatch_and_input_requests_until_it_ends():
    """SUBMIT, CHUNK and END applied in one batch (one read from the controller) dispatch the
    chunk when the batch ends and never ask for input: the whole input is already there."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    with sched.batch():
        submit(sched, ctrl, "j")
        chunks(sched, ctrl, "j", [0])
        assert npeer.of(wire.TASK) == []
        sched.end(ctrl, "j", 1)
    assert tasks(npeer) == [("j", 0)]
    assert cpeer.of(wire.WANT) == []
    sched.check_invariants()


def test_outside_a_batch_each_message_acts_at_once():
    """Without a batch, a chunk is dispatched as it arrives, and the job, its queue drained
    with no END yet, is asked for more input (the WANT a batch saves)."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    assert tasks(npeer) == [("j", 0)]
    assert len(cpeer.of(wire.WANT)) == 1


def test_nested_batches_flush_once_at_the_outermost_end():
    """Only the outermost end of nested batches dispatches what was held."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    sched.begin_batch()
    with sched.batch():
        submit(sched, ctrl, "j")
        chunks(sched, ctrl, "j", [0])
    assert tasks(npeer) == []
    sched.end_batch()
    assert tasks(npeer) == [("j", 0)]


def test_finished_jobs_share_one_job_done_per_node():
    """Jobs finishing close together are forgotten on a node with one JOB_DONE naming them
    all, sent after JOB_DONE_DELAY."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    for job_id in ("a", "b"):
        submit(sched, ctrl, job_id)
        chunks(sched, ctrl, job_id, [0])
        sched.end(ctrl, job_id, 1)
        ok(sched, n, job_id, 0)
    assert npeer.of(wire.JOB_DONE) == []
    sched.check_invariants()
    settle(sched)
    assert npeer.of(wire.JOB_DONE) == [(wire.JOB_DONE, ["a", "b"])]
    assert not sched.clock.getDelayedCalls()


def test_a_full_job_done_batch_goes_out_at_once():
    """JOB_DONE_BATCH finished jobs waiting for one node are sent without waiting."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    for i in range(JOB_DONE_BATCH):
        job_id = f"j{i}"
        submit(sched, ctrl, job_id)
        chunks(sched, ctrl, job_id, [0])
        sched.end(ctrl, job_id, 1)
        ok(sched, n, job_id, 0)
    done = npeer.of(wire.JOB_DONE)
    assert done == [(wire.JOB_DONE, [f"j{i}" for i in range(JOB_DONE_BATCH)])]
    assert not sched.clock.getDelayedCalls()


def test_a_job_id_shipped_again_is_not_forgotten():
    """A job id that finished and was started again (its controller resubmitted it) before the
    batched JOB_DONE went out is left out of it: the node keeps the new job's code."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    sched.end(ctrl, "j", 1)
    ok(sched, n, "j", 0)
    assert "j" not in sched.jobs
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    assert len(npeer.of(wire.JOB_CODE)) == 2
    sched.check_invariants()
    settle(sched)
    assert all("j" not in m[1] for m in npeer.of(wire.JOB_DONE))


def test_a_lost_node_drops_its_waiting_job_done():
    """A node that leaves with JOB_DONEs waiting takes them (and their timer) with it."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched)
    submit(sched, ctrl, "j")
    chunks(sched, ctrl, "j", [0])
    sched.end(ctrl, "j", 1)
    ok(sched, n, "j", 0)
    sched.remove_node(n)
    assert not sched.clock.getDelayedCalls()
    settle(sched)
    assert npeer.of(wire.JOB_DONE) == []
