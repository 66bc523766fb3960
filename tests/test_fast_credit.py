"""Fast credit: nodes queue deeper for jobs whose chunks finish quickly, and only for those.

The scheduler's rules are driven directly (as in tests/test_scheduler.py); then real server
and node processes show the deep queue, the shallow one of a slow job, and a node killed while
holding a deep queue losing nothing.
"""

from __future__ import annotations

import os
import random
import re
import signal

import pytest

from achilles.core import wire
from achilles.node.pool import WorkerPool
from conftest import Reader, wait_for
from crash_tasks import chaos
from credit_tasks import gated, shout, slow_then_gated
from tasks import square
from test_crash_races import chunk, pools  # noqa: F401  (pools is a fixture)
from test_scheduler import chunks, controller, make, node, submit, tasks

pytestmark = pytest.mark.timeout(90)

FAST = 0.0001  # seconds: a chunk this quick costs one unit at the default window and depth
SLOW = 0.01  # past the default window of 5 ms: base credit only


def answer(sched, node_state, job_id, chunk_id, elapsed):
    sched.result(node_state, job_id, chunk_id, wire.OK, b"R:%d" % chunk_id, elapsed)


def oldest(node_state, job_id=None):
    """The in-flight chunk of ``node_state`` (of ``job_id``) with the lowest id."""
    return min(k for k in node_state.inflight if job_id is None or k[0] == job_id)


# --- the rule, on the bare scheduler ------------------------------------------------------------

def test_a_fast_job_fills_fast_credit_and_a_slow_one_does_not():
    """Before any chunk is timed, and for a job whose chunks take longer than window / depth,
    a node holds processes x prefetch chunks; once a job's chunks prove quick, the node also
    takes processes x depth of them on fast credit."""
    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "slow")
    submit(sched, ctrl, "fast")
    npeer, n = node(sched, processes=2)
    chunks(sched, ctrl, "slow", range(200))
    assert len(n.inflight) == 4
    for _ in range(10):
        answer(sched, n, *oldest(n), SLOW)
        sched.check_invariants()
        assert len(n.inflight) == 4 and n.fast_held == 0
    sched.cancel(ctrl, "slow")
    chunks(sched, ctrl, "fast", range(200))
    assert len(n.inflight) == 4  # not timed yet
    answer(sched, n, *oldest(n), FAST)
    sched.check_invariants()
    assert (n.held, n.fast_held, len(n.inflight)) == (4, 60, 64)
    assert sched.jobs["fast"].fast_cost == 1


def test_fast_credit_is_priced_by_service_time():
    """A chunk costs ceil(service / (window / depth)) units: chunks of 0.5 ms (3 units at 5 ms
    over 30) fill a 2-process node's 60 units with 20 chunks."""
    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    npeer, n = node(sched, processes=2)
    chunks(sched, ctrl, "j", range(100))
    answer(sched, n, *oldest(n), 0.0005)
    sched.check_invariants()
    assert sched.jobs["j"].fast_cost == 3
    assert (n.held, n.fast_held, len(n.inflight)) == (4, 60, 24)


def test_fast_credit_is_refilled_a_group_at_a_time():
    """A node answering a fast job's chunks one by one gets no new fast chunk for each answer:
    it is refilled once FAST_GROUP units are free, with that many chunks in one go (one frame
    to it carries them, and their results come back together)."""
    from achilles.server.scheduler import FAST_GROUP

    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    npeer, n = node(sched, processes=1)
    chunks(sched, ctrl, "j", range(500))
    answer(sched, n, *oldest(n), FAST)
    assert (n.held, n.fast_held) == (2, 30)
    for _ in range(3):
        sent = len(tasks(npeer))
        for i in range(FAST_GROUP):
            key = min(k for k, c in n.inflight.items() if c.fast)
            answer(sched, n, *key, FAST)
            sched.check_invariants()
            new = len(tasks(npeer)) - sent
            assert new == (0 if i < FAST_GROUP - 1 else FAST_GROUP), (i, new)
        assert n.fast_held == 30


def test_a_fast_job_spreads_over_all_nodes_a_group_at_a_time():
    """Chunks of a timed fast job go to nodes at most FAST_GROUP units at a time, each to the
    node with the most fast credit free, so a job of a few chunks per node reaches every node
    instead of filling the first ones' deep queues."""
    from achilles.server.scheduler import FAST_GROUP

    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    nodes = [node(sched, processes=1)[1] for _ in range(4)]
    chunks(sched, ctrl, "j", range(4))
    first = next(n for n in nodes if n.inflight)
    answer(sched, first, *oldest(first), FAST)  # the job is now timed as fast
    assert sched.jobs["j"].fast_cost == 1
    chunks(sched, ctrl, "j", range(4, 4 + 4 * FAST_GROUP))
    sched.check_invariants()
    assert [n.fast_held for n in nodes] == [FAST_GROUP] * 4


def test_a_job_that_slows_down_stops_taking_fast_credit():
    """One slow chunk makes the job's estimate slow at once: no more of its chunks go on fast
    credit, and the node drains back to its base credit as the fast ones finish."""
    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    npeer, n = node(sched, processes=1)
    chunks(sched, ctrl, "j", range(300))
    answer(sched, n, *oldest(n), FAST)
    assert len(n.inflight) == 32
    answer(sched, n, *oldest(n), 0.05)
    assert sched.jobs["j"].fast_cost == 0
    sent = len(tasks(npeer))
    base_answered = 0
    while n.fast_held:
        key = oldest(n)
        base_answered += n.inflight[key].fast == 0
        answer(sched, n, *key, 0.05)
        sched.check_invariants()
    # only the base slots that slow answers freed were refilled, on base credit
    assert len(n.inflight) == 2 and all(c.fast == 0 for c in n.inflight.values())
    assert len(tasks(npeer)) == sent + base_answered


def test_a_slow_job_gets_its_share_of_a_node_full_of_fast_chunks():
    """A slow job submitted while a fast job fills a node gets base credit as it frees, in
    turn with the fast job (round robin), and never fast credit; the fast job keeps its fast
    credit."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "fast")
    npeer, n = node(sched, processes=2)
    chunks(sched, ctrl, "fast", range(500))
    answer(sched, n, *oldest(n), FAST)
    assert (n.held, n.fast_held) == (2, 60)
    submit(sched, ctrl, "slow")
    chunks(sched, ctrl, "slow", range(100))
    base_turns = []
    for _ in range(40):  # answer the oldest chunk on base credit, each at its job's speed
        key = min(k for k, c in n.inflight.items() if not c.fast)
        before = set(n.inflight)
        answer(sched, n, *key, FAST if key[0] == "fast" else SLOW)
        sched.check_invariants()
        base_turns += [k[0] for k in set(n.inflight) - before if not n.inflight[k].fast]
        assert all(c.fast == 0 for c in n.inflight.values() if c.job_id == "slow")
        assert n.fast_held == 60
    assert len(base_turns) == 40
    assert base_turns.count("slow") >= 19, base_turns


def test_a_lost_node_requeues_its_whole_deep_queue_once():
    """A node holding base and fast chunks is lost: every one of them goes back to the queue
    and then to the other node, and each chunk's RESULT reaches the controller exactly once."""
    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j")
    apeer, a = node(sched, processes=2, name="a")
    chunks(sched, ctrl, "j", range(150))
    answer(sched, a, *oldest(a), FAST)
    held = sorted(a.inflight)
    assert len(held) == 64
    bpeer, b = node(sched, processes=1, name="b")
    sched.remove_node(a)
    sched.check_invariants()
    assert set(held) <= set(b.inflight) | {("j", c.chunk_id) for c in sched.jobs["j"].queue}
    sched.end(ctrl, "j", 150)
    while b.inflight:
        answer(sched, b, *oldest(b), FAST)
        sched.check_invariants()
    results = [m[2] for m in cpeer.of(wire.RESULT)]
    assert sorted(results) == list(range(150))
    assert "j" not in sched.jobs


def test_invariants_hold_with_fast_and_slow_jobs_under_random_events():
    """Random chunks, results with random service times (fast, middling, slow), node joins
    and losses and cancels over three jobs: the invariants (both kinds of credit, the index,
    the fast rule) hold after every step, and no RESULT reaches a controller twice."""
    for seed in range(30):
        rng = random.Random(seed)
        sched = make(prefetch=rng.randint(1, 3), depth=rng.choice([0, 4, 30]))
        cpeer, ctrl = controller(sched)
        jobs = ["a", "b", "c"]
        next_chunk = dict.fromkeys(jobs, 0)
        for j in jobs:
            submit(sched, ctrl, j)
        nodes = {}
        for step in range(250):
            op = rng.random()
            if op < 0.3:
                j = rng.choice([j for j in jobs if j in sched.jobs] or ["a"])
                if j in sched.jobs:
                    chunks(sched, ctrl, j, [next_chunk[j]])
                    next_chunk[j] += 1
            elif op < 0.8:
                live = [n for n in nodes.values() if n.inflight]
                if live:
                    n = rng.choice(live)
                    answer(sched, n, *rng.choice(sorted(n.inflight)),
                           rng.choice([FAST, 0.0004, 0.003, SLOW]))
            elif op < 0.9 or not nodes:
                _, n = node(sched, processes=rng.randint(1, 3), name=f"n{step}")
                nodes[n.node_id] = n
            elif op < 0.98:
                sched.remove_node(nodes.pop(rng.choice(sorted(nodes))))
            else:
                sched.cancel(ctrl, rng.choice(jobs))
            sched.check_invariants()
        results = [(m[1], m[2]) for m in cpeer.of(wire.RESULT)]
        assert len(results) == len(set(results)), f"duplicate RESULT, seed {seed}"


# --- real server and node processes ------------------------------------------------------------

def node_busy(lc) -> int:
    return sum(n["busy"] for n in lc.cluster.status()["nodes"])


def queued(lc) -> int:
    return sum(j["queued"] for j in lc.cluster.status()["jobs"])


def test_a_fast_job_queues_deep_on_a_real_node(make_cluster, monkeypatch, tmp_path):
    """On a real server and node (2 processes), a job of quick chunks whose workers are then
    held up is given more than processes x prefetch chunks at once (the node queues them); the
    results all arrive, in order, once the workers run again. (The window is 1 s here so that a
    worker preempted for a few ms cannot make the job look slow.)"""
    monkeypatch.setenv("ACHILLES_FAST_WINDOW", "1")
    lc = make_cluster(nodes=1, processes=2)
    items = [(x, str(tmp_path), 100) for x in range(400)]
    reader = Reader(lc.cluster.imap(gated, items, chunksize=1))
    wait_for(lambda: len(reader.got) == 100, what="the ungated results")
    wait_for(lambda: node_busy(lc) > 4 and queued(lc) > 0, what="a deep queue on the node")
    assert 4 < node_busy(lc) <= 2 * (2 + 30)
    (tmp_path / "open").touch()
    assert reader.result() == [x * x for x in range(400)]


def test_a_slow_job_keeps_the_base_depth_on_a_real_node(make_cluster, tmp_path):
    """On a real server and node (2 processes), a job whose chunks take 20 ms (past the default
    5 ms window) holds exactly processes x prefetch = 4 chunks on the node while the server
    still has more of them queued."""
    lc = make_cluster(nodes=1, processes=2)
    items = [(x, str(tmp_path), 6) for x in range(100)]
    reader = Reader(lc.cluster.imap(slow_then_gated, items, chunksize=1))
    wait_for(lambda: len(reader.got) == 6, what="the ungated results")
    # Every result before the gate is in, so the server has dispatched all it will.
    wait_for(lambda: queued(lc) > 0, what="chunks held on the server")
    assert node_busy(lc) == 4
    (tmp_path / "open").touch()
    assert reader.result() == [x * x for x in range(100)]


def test_a_node_killed_with_a_deep_queue_loses_nothing(make_cluster, monkeypatch, tmp_path):
    """A node is killed (SIGKILL) while it holds a deep queue of a fast job: the server re-queues
    every chunk it held (its log names the number), a new node runs them, and the caller gets
    every result once, in order."""
    monkeypatch.setenv("ACHILLES_FAST_WINDOW", "1")
    lc = make_cluster(nodes=1, processes=2)
    items = [(x, str(tmp_path), 100) for x in range(300)]
    reader = Reader(lc.cluster.imap(gated, items, chunksize=1))
    wait_for(lambda: len(reader.got) == 100, what="the ungated results")
    wait_for(lambda: node_busy(lc) > 4 and queued(lc) > 0, what="a deep queue on the node")
    held = node_busy(lc)
    os.killpg(lc.nodes[0].pid, signal.SIGKILL)
    lc.nodes[0].wait(10)
    wait_for(lambda: re.search(r"node local-0 lost; (\d+) chunk", lc.log_text("server")),
             what="the server noticing the lost node")
    lost = re.search(r"node local-0 lost; (\d+) chunk", lc.log_text("server"))
    assert int(lost.group(1)) == held
    (tmp_path / "open").touch()
    lc.add_node()
    assert reader.result() == [x * x for x in range(300)]


# --- the node's worker pool: quick chunks go to a worker several at a time ------------------------

def held_batch(pool, out, tmp_path, tasks_):
    """Make one worker (of a 1-process pool) take ``tasks_`` as one batch: chunks of the
    same job prove the job quick (the first on a fresh worker is not: it loads the code), a
    chunk of another job holds the worker while ``tasks_`` are queued behind it, then lets it
    go."""
    for warm in range(-1, -100, -1):
        pool.submit(chunk(warm, square, [2]))
        assert out.wait({warm})
        if pool.is_quick(1, "job"):
            break
    assert pool.is_quick(1, "job")
    pool.submit(chunk(1000, gated, [(0, str(tmp_path), 0)], job="gate"))
    for t in tasks_:
        pool.submit(t)
    (tmp_path / "open").touch()
    assert out.wait({t.chunk_id for t in tasks_})


def test_a_batch_whose_worker_dies_blames_one_chunk_and_reruns_the_rest(pools, tmp_path):
    """Ten quick chunks of one job go to the worker in one message; the worker dies running
    the fifth: that chunk alone is reported CRASHED, the four before it and the five after
    it each get exactly one OK outcome (those after it ran again, on the new worker)."""
    out, pool = pools(1)
    plan = ("now", "exit", 0.0, None)
    batch = [chunk(c, chaos, [(c, plan if c == 5 else None)]) for c in range(1, 11)]
    held_batch(pool, out, tmp_path, batch)
    assert pool.batched == 10
    for c in range(1, 11):
        assert len(out.got[c]) == 1, (c, out.got[c])
        status, payload = out.got[c][0]
        assert status == (wire.CRASHED if c == 5 else wire.OK), (c, status)


def test_each_chunk_of_a_batch_keeps_its_own_output(tmp_path):
    """Chunks that print, sent to the worker as one batch, each get their own lines (and
    their result after them), as when they go one by one."""
    from test_crash_races import Outcomes

    out = Outcomes()
    lines: dict = {}
    order: list = []

    def on_output(task, got, dropped):
        lines.setdefault(task.chunk_id, []).extend(line[2] for line in got)
        order.append(("out", task.chunk_id))

    def on_result(task, status, payload, elapsed):
        order.append(("result", task.chunk_id))
        out(task, status, payload, elapsed)

    pool = WorkerPool(1, on_result, on_output)
    try:
        batch = [chunk(c, shout, [c]) for c in range(1, 9)]
        for t in batch:
            t.forward = True
        held_batch(pool, out, tmp_path, batch)
        assert pool.batched == 8
        for c in range(1, 9):
            assert lines[c] == [f"line of item {c}"], lines
            assert order.index(("out", c)) < order.index(("result", c))
    finally:
        pool.close()
