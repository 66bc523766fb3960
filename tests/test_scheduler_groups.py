"""The scheduler's max_active caps (per job, or shared by a group of one controller's jobs)
and its checks of job options, driven directly with recording peers."""

from __future__ import annotations

import random

import pytest

from achilles.core import wire
from test_scheduler import Recorder, chunks, controller, make, node, ok, submit, tasks

pytestmark = pytest.mark.timeout(60)


def placed(sched, *job_ids):
    return sum(len(sched.jobs[j].placed) for j in job_ids if j in sched.jobs)


def test_max_active_holds_chunks_on_the_server():
    """A job with max_active=2 has at most 2 chunks on nodes however much credit is free; each
    result releases the next, and every chunk's RESULT reaches the controller once."""
    sched = make()
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched, processes=4)
    submit(sched, ctrl, "j", options={"max_active": 2})
    chunks(sched, ctrl, "j", range(10))
    assert len(tasks(npeer)) == 2
    sched.check_invariants()
    done = 0
    while "j" in sched.jobs and sched.jobs["j"].placed:
        assert placed(sched, "j") <= 2
        ok(sched, n, "j", sorted(sched.jobs["j"].placed)[0])
        done += 1
        sched.check_invariants()
    sched.end(ctrl, "j", 10)
    assert done == 10
    assert sorted(m[2] for m in cpeer.of(wire.RESULT)) == list(range(10))
    assert sched.groups == {}


def test_a_group_caps_its_jobs_together_and_others_run_free():
    """Two jobs in group "g" (cap 2) share the cap; an uncapped job of the same controller
    fills the rest of the node."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched, processes=6)
    submit(sched, ctrl, "a", options={"max_active": 2, "group": "g"})
    submit(sched, ctrl, "b", options={"max_active": 2, "group": "g"})
    submit(sched, ctrl, "free")
    chunks(sched, ctrl, "a", range(5))
    chunks(sched, ctrl, "b", range(5))
    chunks(sched, ctrl, "free", range(5))
    sched.check_invariants()
    assert placed(sched, "a", "b") == 2
    assert placed(sched, "free") == 4
    for _ in range(12):  # results free slots; the grouped jobs never pass their cap together
        job_id, cid = next((j, c) for j in ("a", "b", "free") if j in sched.jobs
                           for c in sorted(sched.jobs[j].placed))
        ok(sched, n, job_id, cid)
        assert placed(sched, "a", "b") <= 2
        sched.check_invariants()
    assert sorted((m[1], m[2]) for m in cpeer.of(wire.RESULT) if m[1] != "free") == \
        [(j, c) for j in "ab" for c in range(5)]


def test_groups_are_per_controller():
    """The same group name from two controllers makes two caps."""
    sched = make(prefetch=1)
    p1, c1 = controller(sched, "10.0.0.1:1")
    p2, c2 = controller(sched, "10.0.0.2:1")
    npeer, n = node(sched, processes=8)
    submit(sched, c1, "x", options={"max_active": 2, "group": "g"})
    submit(sched, c2, "y", options={"max_active": 2, "group": "g"})
    chunks(sched, c1, "x", range(5))
    chunks(sched, c2, "y", range(5))
    assert placed(sched, "x") == 2 and placed(sched, "y") == 2
    assert len(sched.groups) == 2
    sched.check_invariants()


def test_lost_node_releases_the_cap():
    """Capped chunks on a node that dies go back to the queue, and the cap lets them run on
    another node."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    apeer, a = node(sched, processes=2, name="a")
    submit(sched, ctrl, "j", options={"max_active": 2})
    chunks(sched, ctrl, "j", range(4))
    assert len(a.inflight) == 2
    bpeer, b = node(sched, processes=2, name="b")
    assert len(b.inflight) == 0  # the cap, not the credit, holds the rest
    sched.remove_node(a)
    sched.check_invariants()
    assert sorted(cid for _, cid in b.inflight) == [0, 1]
    assert sched.groups[(ctrl.controller_id, "job:j")].active == 2


def test_cancel_frees_the_group_for_its_other_job():
    """Cancelling one job of a group returns its slots to the group's other job."""
    sched = make(prefetch=1)
    cpeer, ctrl = controller(sched)
    npeer, n = node(sched, processes=4)
    submit(sched, ctrl, "a", options={"max_active": 2, "group": "g"})
    chunks(sched, ctrl, "a", range(4))
    submit(sched, ctrl, "b", options={"max_active": 2, "group": "g"})
    chunks(sched, ctrl, "b", range(4))
    assert placed(sched, "a") == 2 and placed(sched, "b") == 0
    sched.cancel(ctrl, "a")
    sched.check_invariants()
    assert placed(sched, "b") == 2
    sched.remove_controller(ctrl)
    assert sched.groups == {}
    sched.check_invariants()


def test_want_reports_the_capped_share_of_the_cluster():
    """A capped job's WANT gives processes and capacity within its cap, so the controller
    sizes chunks for the processes it may use."""
    sched = make(prefetch=2)
    cpeer, ctrl = controller(sched)
    node(sched, processes=8)
    submit(sched, ctrl, "j", options={"max_active": 3})
    chunks(sched, ctrl, "j", range(2))
    wants = cpeer.of(wire.WANT)
    assert wants and all(m[3] == 3 and m[4] == 6 for m in wants)


@pytest.mark.parametrize("options", [
    {"max_active": 0}, {"max_active": "2"}, {"max_active": True}, {"maxtasks": 0},
    {"maxtasks": 1.5}, {"init": "code"}, {"group": 5},
])
def test_bad_options_refuse_the_job(options):
    """Options of the wrong type or range refuse the job with a JOB_FAILED naming the option;
    nothing is started."""
    sched = make()
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j", options=options)
    [failed] = cpeer.of(wire.JOB_FAILED)
    assert failed[1] == "j" and repr(next(iter(options))) in failed[2]
    assert "j" not in sched.jobs and sched.groups == {}


def test_unknown_options_are_ignored():
    """An option the server does not know (from a newer controller) does not refuse the job."""
    sched = make()
    cpeer, ctrl = controller(sched)
    submit(sched, ctrl, "j", options={"future_option": 1, "init": b"x", "maxtasks": 2})
    assert "j" in sched.jobs and not cpeer.of(wire.JOB_FAILED)


def test_caps_hold_under_random_events():
    """Under random chunks, results, node joins and losses and cancels across capped groups,
    no group ever has more chunks in flight than its cap and the bookkeeping stays exact."""
    for seed in range(30):
        rng = random.Random(seed)
        sched = make(prefetch=rng.randint(1, 3))
        cpeer, ctrl = controller(sched)
        jobs = {}
        for i in range(4):
            job_id = f"j{i}"
            opts = {"max_active": rng.randint(1, 3)}
            if i < 3:
                opts["group"] = rng.choice(["g", "h"])
            submit(sched, ctrl, job_id, options=opts)
            jobs[job_id] = 0
        nodes = {}
        for step in range(300):
            op = rng.random()
            live = [j for j in jobs if j in sched.jobs]
            if op < 0.3 and live:
                j = rng.choice(live)
                chunks(sched, ctrl, j, [jobs[j]])
                jobs[j] += 1
            elif op < 0.7:
                busy = [n for _, n in nodes.values() if n.inflight]
                if busy:
                    n = rng.choice(busy)
                    job_id, cid = rng.choice(sorted(n.inflight))
                    ok(sched, n, job_id, cid)
            elif op < 0.85 or not nodes:
                peer, n = node(sched, processes=rng.randint(1, 3), name=f"n{step}")
                nodes[n.node_id] = (peer, n)
            elif op < 0.95:
                _, n = nodes.pop(rng.choice(sorted(nodes)))
                sched.remove_node(n)
            elif live:
                sched.cancel(ctrl, rng.choice(live))
            sched.check_invariants()
            for group in sched.groups.values():
                assert group.active <= group.limit, f"seed {seed} step {step}"
