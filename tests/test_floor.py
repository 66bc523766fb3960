"""The latency-floor benchmark (bench/floor.py) run small, so the tool cannot rot: every route
answers each call through real processes and sockets, and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, bench_module, poll, proc_stats

FLOOR = os.path.join(ROOT, "bench", "floor.py")
floor = bench_module("floor")

pytestmark = pytest.mark.timeout(180)


def _helpers() -> "list[int]":
    """PIDs of live processes running a route's helper (relay, node or a node's worker)."""
    found = []
    for pid, fields in proc_stats():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if fields[0] != "Z" and FLOOR.encode() in argv and b"--role" in argv:
            found.append(pid)
    return found


@pytest.mark.parametrize("route", floor.ROUTES)
def test_each_route_answers_every_call_and_leaves_no_process(route: str) -> None:
    """A route times as many round trips as asked, each a positive time, and its relay, node
    and worker processes are gone once it returns."""
    times = floor.route(route, 30, 5)
    assert len(times) == 30 and all(t > 0 for t in times)
    assert poll(lambda: not _helpers(), 10), f"helpers outlived the route: {_helpers()}"


def test_a_run_prints_one_line_per_row() -> None:
    """``python bench/floor.py`` prints Pool's row, one per route and Achilles' row, each with
    a p50 and a p90, and exits 0 leaving no helper behind."""
    out = subprocess.run([sys.executable, FLOOR, "--calls", "20", "--warmup", "5",
                          "--rounds", "2"], capture_output=True, text=True, timeout=150,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    labels = ["Pool(2).apply"] + [f"route {r}" for r in floor.ROUTES] + ["Achilles one-item map"]
    assert [line.split(" p50 ")[0].strip() for line in lines] == labels
    assert all(" p90 " in line and "(40 calls)" in line for line in lines)
    assert poll(lambda: not _helpers(), 10), f"helpers outlived the run: {_helpers()}"
