"""Faults injected for real: kill -9, dead workers, frozen nodes, vanished controllers,
restarted servers, slow consumers. Every result must arrive exactly once."""

from __future__ import annotations

import collections
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from achilles.core.errors import ConnectionLost, WorkerCrashed
from conftest import ROOT, Reader, busy_on, poll, wait_for
from tasks import always_exit, crash_once, oom_killed, segfault, sleepy, square

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def exactly_once(results, n):
    counts = collections.Counter(results)
    assert sorted(counts) == list(range(n)), "missing or extra results"
    assert max(counts.values()) == 1, "a result arrived twice"


def test_node_killed_mid_job(make_cluster):
    """kill -9 of a node daemon mid-job: its in-flight chunks are re-run on the other node and
    every result arrives exactly once."""
    lc = make_cluster(nodes=2, processes=1)
    reader = Reader(lc.cluster.imap_unordered(sleepy, range(400), chunksize=2))
    wait_for(lambda: len(reader.got) >= 40, what="the first 40 results")
    wait_for(lambda: busy_on(lc.cluster, "local-0") > 0, what="chunks on local-0")
    os.kill(lc.nodes[0].pid, signal.SIGKILL)
    exactly_once(reader.result(), 400)
    names = [n["name"] for n in lc.cluster.status()["nodes"]]
    assert names == ["local-1"]


def test_worker_crash_is_retried(make_cluster, tmp_path):
    """A worker that dies under a task (os._exit) is replaced, the chunk re-runs, every result
    arrives once and the node keeps serving."""
    lc = make_cluster(nodes=1, processes=2)
    node_pid = lc.nodes[0].pid
    out = lc.cluster.map(crash_once, [(x, str(tmp_path)) for x in range(300)], chunksize=10)
    assert out == list(range(300))
    assert len(list(tmp_path.glob("crashed-*"))) == 6
    assert lc.nodes[0].poll() is None and lc.nodes[0].pid == node_pid
    assert lc.cluster.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_item_that_always_kills_its_worker(make_cluster):
    """An item that kills its worker 3 times fails with WorkerCrashed naming that item (not its
    chunk-mates), instead of looping forever."""
    lc = make_cluster(nodes=1, processes=2)
    with pytest.raises(WorkerCrashed) as info:
        lc.cluster.map(always_exit, range(20), chunksize=4)
    assert info.value.item == 5
    assert "item 5" in str(info.value) and "3 times" in str(info.value)
    assert "exit code 7" in str(info.value)
    assert lc.cluster.map(square, [3]) == [9]


def test_segfault_is_named(make_cluster):
    """A segfault in a task (ctypes) is reported as WorkerCrashed with SIGSEGV."""
    lc = make_cluster(nodes=1, processes=1, max_crashes=2)
    with pytest.raises(WorkerCrashed, match="SIGSEGV") as info:
        lc.cluster.map(segfault, range(4), chunksize=4)
    assert info.value.item == 2


def test_sigkilled_worker_is_named(make_cluster):
    """A worker killed with SIGKILL (what the OOM killer sends) is reported as such."""
    lc = make_cluster(nodes=1, processes=1, max_crashes=2)
    with pytest.raises(WorkerCrashed, match="SIGKILL") as info:
        lc.cluster.map(oom_killed, range(3), chunksize=3)
    assert info.value.item == 1


def test_frozen_node_is_detected(make_cluster):
    """A node frozen with SIGSTOP misses heartbeats; its work is re-queued and the job
    completes on the other node, each result once."""
    lc = make_cluster(nodes=2, processes=1, heartbeat=1.0)
    frozen = lc.nodes[0].pid
    results = []
    try:
        for x in lc.cluster.imap_unordered(sleepy, range(300), chunksize=2):
            results.append(x)
            if len(results) == 30:
                os.killpg(frozen, signal.SIGSTOP)
        exactly_once(results, 300)
        assert [n["name"] for n in lc.cluster.status()["nodes"]] == ["local-1"]
    finally:
        os.killpg(frozen, signal.SIGCONT)


CONTROLLER_SCRIPT = textwrap.dedent("""
    import sys, achilles
    sys.path.insert(0, {tests!r})
    from tasks import long_sleep
    with achilles.connect() as c:
        print("started", flush=True)
        c.map(long_sleep, [(i, {folder!r}) for i in range(8)], chunksize=1)
""")


def test_controller_killed(make_cluster, tmp_path):
    """When a controller dies, its jobs are cancelled on the server and the nodes stop their
    running tasks at once (the next job gets every process)."""
    lc = make_cluster(nodes=1, processes=2)
    cfg = lc.cluster.config
    env = dict(os.environ, PYTHONPATH=ROOT, ACHILLES_HOST="127.0.0.1", ACHILLES_PORT=str(lc.port),
               ACHILLES_USERNAME=cfg.username, ACHILLES_SECRET_KEY=cfg.secret_key)
    script = tmp_path / "ctl.py"
    script.write_text(CONTROLLER_SCRIPT.format(tests=os.path.dirname(__file__), folder=str(tmp_path)))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            cwd=str(tmp_path))
    try:
        assert proc.stdout.readline().strip() == b"started"
        wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2,
                 what="both workers to start their 60 s tasks")
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    wait_for(lambda: lc.cluster.status()["jobs"] == [], what="job to be cancelled")
    start = time.monotonic()
    assert lc.cluster.map(square, range(4), chunksize=1) == [0, 1, 4, 9]
    assert time.monotonic() - start < 30  # not stuck behind the 60 s sleeps


def test_server_restart_resumes_map(make_cluster):
    """The server is killed and restarted mid-map: the node reconnects by itself, the controller
    reconnects and resubmits what it lacks, and the map completes with each result once."""
    lc = make_cluster(nodes=1, processes=2, reconnect_timeout=60)
    results = []
    for x in lc.cluster.imap_unordered(sleepy, range(300), chunksize=2):
        results.append(x)
        if len(results) == 50:
            lc.restart_server(down_for=0.5)
    exactly_once(results, 300)
    assert lc.cluster.map(square, [4]) == [16]


def test_server_restart_resumes_graph(make_cluster):
    """A call graph running when the server restarts is resubmitted and completes."""
    from achilles import task

    lc = make_cluster(nodes=1, processes=2, reconnect_timeout=60)
    leaves = [task(sleepy)(i) for i in range(150)]
    future = lc.cluster.submit_graph(task(sum)(leaves))
    wait_for(lambda: any(j["done"] >= 20 for j in lc.cluster.status()["jobs"]),
             what="part of the graph to run")
    lc.restart_server(down_for=0.5)
    assert future.result(timeout=60) == sum(range(150))


def test_server_gone_past_deadline(make_cluster):
    """If the server stays down past the reconnect deadline, the caller gets ConnectionLost
    saying how many items were done."""
    lc = make_cluster(nodes=1, processes=1, reconnect_timeout=1.0)
    it = lc.cluster.imap(sleepy, range(1000), chunksize=1)
    done = [next(it) for _ in range(5)]
    lc.server.kill()
    with pytest.raises(ConnectionLost) as info:
        for x in it:
            done.append(x)
    assert info.value.done >= 5
    assert f"{info.value.done} of" in str(info.value)


def test_slow_consumer_is_bounded(make_cluster):
    """An imap whose caller stops reading pauses the job: the items sent stay bounded."""
    lc = make_cluster(nodes=1, processes=2)
    it = lc.cluster.imap(square, itertools.count(), chunksize=1)
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    def job() -> dict:
        return lc.cluster.status()["jobs"][0]

    # paused: everything sent has been answered and nothing more comes
    wait_for(lambda: job()["sent"] == job()["done"], timeout=30, what="the job to pause")
    sent = job()["sent"]
    # The caller's window bounds the chunks it holds unread (sent, not yet taken): twice what
    # the nodes may hold for a fast job (2 processes x (prefetch 2 + fast depth 30)), plus the
    # initial credit. The 5 items already taken no longer count against it.
    assert sent <= 2 * 2 * (2 + 30) + 2 + 5
    assert not poll(lambda: job()["sent"] != sent, 1.0), "input kept coming with no reader"
    assert next(it) == 25
    it.close()
