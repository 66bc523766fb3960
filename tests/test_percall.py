"""The per-call CPU benchmark (bench/percall.py) run small, so the tool cannot rot: it finds
every process of each side by its role, charges each one CPU, and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, bench_module, poll, proc_stats

PERCALL = os.path.join(ROOT, "bench", "percall.py")
percall = bench_module("percall")

pytestmark = pytest.mark.timeout(180)


def _live_children() -> "list[int]":
    """PIDs of this process's children that have not exited."""
    me = os.getpid()
    return [pid for pid, fields in proc_stats() if int(fields[2]) == me and fields[0] != "Z"]


@pytest.mark.parametrize("shape", percall.SHAPES)
def test_achilles_side_charges_every_role(shape: str) -> None:
    """On a LocalCluster the controller, server, node and worker processes are each found and
    each ran for the calls (the server and node only for them); the cluster's processes are
    gone once the run returns."""
    p50, roles = percall.achilles_run(shape, 100, 10)
    assert p50 > 0
    assert {"controller", "server", "node", "workers"} <= set(roles)
    for role in ("controller", "server", "node", "workers"):
        assert roles[role][0] > 0, (role, roles[role])
    assert poll(lambda: not _live_children(), 15), f"left behind: {_live_children()}"


@pytest.mark.parametrize("shape", percall.SHAPES)
def test_pool_side_charges_caller_and_workers(shape: str) -> None:
    """On multiprocessing.Pool(2) the caller's process and its two workers are charged."""
    p50, roles = percall.pool_run(shape, 100, 10)
    assert p50 > 0 and set(roles) == {"caller", "workers"}
    assert roles["caller"][0] > 0 and roles["workers"][0] > 0
    assert poll(lambda: not _live_children(), 15), f"left behind: {_live_children()}"


def test_a_run_prints_a_line_per_shape_and_side() -> None:
    """``python bench/percall.py`` prints Pool's and Achilles' line for each shape, each with
    a p50 and the CPU per call or item split by role, and exits 0."""
    out = subprocess.run([sys.executable, PERCALL, "--calls", "100", "--warmup", "10",
                          "--rounds", "1"], capture_output=True, text=True, timeout=150,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(" p50 ")[0].strip() for line in lines] == [
        "single Pool(2)", "single Achilles", "dispatch Pool(2)", "dispatch Achilles"]
    assert all(" CPU per call " in line for line in lines[:2])
    assert all(" CPU per item " in line for line in lines[2:])
    for line in lines[1::2]:
        assert all(f"{role} " in line for role in ("controller", "server", "node", "workers"))
