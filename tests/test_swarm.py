"""The swarm benchmark (bench/swarm.py) run small, so the tool cannot rot: a real server process,
hundreds of simulated nodes speaking the real protocol, and the real controller."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import signal

import pytest

from conftest import ROOT, Reader, group_members, wait_for
from tasks import pause

spec = importlib.util.spec_from_file_location("swarm_bench", os.path.join(ROOT, "bench", "swarm.py"))
assert spec is not None and spec.loader is not None
swarm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(swarm)

pytestmark = pytest.mark.timeout(300)


def _gone(pids: "list[int]") -> None:
    for pid in pids:
        assert not group_members(pid), f"processes of group {pid} outlived the test"


def test_swarm_of_200_nodes_delivers_every_result_once() -> None:
    """200 simulated nodes register with a real server; a 3,000-chunk map at chunksize 1
    returns every result exactly once, every node got work, each TASK reached a node once,
    and the server's status lists all 200 nodes with the items they did."""
    sw = swarm.Swarm(200, window=32)
    with sw:
        report = sw.start_swarm()
        assert report["nodes"] == 200
        run = swarm.dispatch_run(sw, 3000)  # raises unless each result arrives exactly once
        assert run["chunks"] == 3000
        stats = sw.command("stats", "stats")
        assert stats["live"] == 200 and stats.get("lost", 0) == 0
        assert stats["tasks"] == stats["results"] == 3000
        assert stats["duplicate_tasks"] == 0
        assert stats.get("task_without_code", 0) == 0
        status = sw.cluster.status()
        assert len(status["nodes"]) == 200
        assert sum(n["done"] for n in status["nodes"]) == 3000
        assert all(n["done"] > 0 for n in status["nodes"])
        assert status["jobs"] == []
        pids = sw.pids()
    _gone(pids)


def test_nodes_dropped_mid_map_lose_nothing() -> None:
    """Simulated nodes that answer after 100 ms; 20 of them, each holding a chunk, drop their
    connection in the middle of a map: the server re-queues their chunks and every result
    still arrives exactly once, from the nodes that remain."""
    sw = swarm.Swarm(100, delay=0.1, window=32)
    with sw:
        sw.start_swarm()
        # The caller goes on reading while the nodes drop (a caller waiting for the drop's
        # reply would let every node run dry first).
        reader = Reader(sw.cluster.imap_unordered(swarm.identity, range(3000), chunksize=1))
        wait_for(lambda: len(reader.got) >= 300, what="the first 300 results")
        dropped = sw.command("drop 20", "dropped")
        got = reader.result(120)
        assert dropped["nodes"] == 20
        counts = collections.Counter(got)
        assert sorted(counts) == list(range(3000))
        assert max(counts.values()) == 1
        stats = sw.command("stats", "stats")
        assert stats["live"] == 80 and stats["lost"] == 20
        assert stats["duplicate_tasks"] > 0  # re-dispatched chunks: the drop cut work short
        assert len(sw.cluster.status()["nodes"]) == 80
        pids = sw.pids()
    _gone(pids)


def test_dashboard_history_is_bounded_with_many_nodes() -> None:
    """With 200 nodes the dashboard keeps throughput lines for the first 32 only (the server
    does not keep 5 minutes of samples per node); status and the dashboard's state still list
    all 200 nodes."""
    sw = swarm.Swarm(200, window=32)
    with sw:
        sw.start_swarm()
        swarm.dispatch_run(sw, 1000)

        def history() -> dict:
            return json.loads(sw.dashboard_get("/api/history"))

        # Samples taken before the nodes joined have no node lines: wait for one after.
        wait_for(lambda: len(history()["cluster"]) >= 3 and len(history()["nodes"]) >= 32,
                 what="three dashboard samples, one with the nodes")
        assert len(history()["nodes"]) == 32
        state = json.loads(sw.dashboard_get("/api/dashboard"))["state"]
        assert len(state["nodes"]) == 200
        assert len(state["sample"]["nodes"]) <= 32
        pids = sw.pids()
    _gone(pids)


def test_a_stopped_server_keeps_its_nodes() -> None:
    """The server process is stopped (SIGSTOP) for three times its heartbeat (2 s) while its
    50 nodes, whose own heartbeat is long, stay up. Resumed, it drops none of them (its
    overdue heartbeat timers run before it reads their answers), and they still take work."""
    sw = swarm.Swarm(50, window=32, heartbeat=2.0, node_heartbeat=60.0)
    with sw:
        sw.start_swarm()
        assert sw.server is not None
        os.kill(sw.server.pid, signal.SIGSTOP)
        try:
            pause(6.0)  # the stall itself: three of the server's heartbeats
        finally:
            os.kill(sw.server.pid, signal.SIGCONT)
        # the overdue timers run first on resume: a wrong verdict shows in the first status
        assert len(sw.cluster.status()["nodes"]) == 50
        swarm.dispatch_run(sw, 500)  # every result exactly once
        assert len(sw.cluster.status()["nodes"]) == 50
        stats = sw.command("stats", "stats")
        assert stats["live"] == 50 and stats.get("lost", 0) == 0
        assert "no heartbeat" not in sw.server_log()
        pids = sw.pids()
    _gone(pids)
