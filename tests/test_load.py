"""Load: many controllers at once, and a 10-million-item map in constant memory."""

from __future__ import annotations

import collections
import os
import threading

import pytest

from achilles.controller.cluster import Cluster
from conftest import group_members, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (0 for a process that is gone, e.g. a worker that
    ended between listing its group and reading it)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def tree_rss_mib(pgid: int) -> float:
    """Resident memory of a daemon's whole process group (a node and its workers), MiB."""
    return sum(rss_mib(pid) for pid in group_members(pgid))


def test_fifty_controllers(make_cluster):
    """50 controllers at once, each mapping 2,000 items over 2 nodes: every map completes with
    each result once, and the server's memory afterwards is back near where it started."""
    lc = make_cluster(nodes=2, processes=1)
    lc.cluster.map(abs, range(1000))
    before = rss_mib(lc.server.pid)
    results = {}
    errors = []

    def run(i: int) -> None:
        try:
            with Cluster(lc.cluster.config) as c:
                results[i] = c.map(lambda x, i=i: (i, x), range(2000))
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert len(results) == 50
    for i, out in results.items():
        assert out == [(i, x) for x in range(2000)]
    wait_for(lambda: lc.cluster.status()["jobs"] == [], what="jobs to be released")
    after = rss_mib(lc.server.pid)
    assert after < before + 40, f"server RSS {before:.1f} MiB -> {after:.1f} MiB"


def test_ten_million_items_constant_memory(make_cluster):
    """imap_unordered over a 10-million-item generator runs with bounded memory in the
    controller, the server and the node (RSS sampled throughout)."""
    lc = make_cluster(nodes=1, processes=2)
    me = os.getpid()
    start = {"controller": rss_mib(me), "server": rss_mib(lc.server.pid),
             "node": tree_rss_mib(lc.nodes[0].pid)}
    peak = collections.Counter()

    def sample() -> None:
        peak["controller"] = max(peak["controller"], rss_mib(me))
        peak["server"] = max(peak["server"], rss_mib(lc.server.pid))
        peak["node"] = max(peak["node"], tree_rss_mib(lc.nodes[0].pid))

    n = 10_000_000
    total = 0
    count = 0
    for value in lc.cluster.imap_unordered(lambda x: x & 7, (i for i in range(n))):
        total += value
        count += 1
        if count % 500_000 == 0:
            sample()
    assert count == n
    assert total == sum(i & 7 for i in range(8)) * (n // 8)
    growth = {k: peak[k] - start[k] for k in start}
    print("rss start", start, "peak", dict(peak))
    # 10M results held at once would need ~300+ MiB in the controller alone.
    for role, limit in (("controller", 150), ("server", 150), ("node", 250)):
        assert growth[role] < limit, f"{role} RSS grew {growth[role]:.0f} MiB ({growth})"
