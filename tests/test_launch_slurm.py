"""SlurmCluster and ``achilles up --slurm`` against a real one-host SLURM (slurmctld, slurmd and
munged started by the fixture, see tests/slurmhost.py)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from typing import Iterator

import pytest

import achilles
from achilles.core.config import cpu_count
from achilles.core.errors import AchillesError
from achilles.launch.slurm import SlurmCluster
from tests.conftest import wait_for
from tests.slurmhost import SlurmHost, unavailable
from tests.upcli import Up

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[SlurmHost]:
    """A running one-host SLURM; at the end no job and no job process is left."""
    why = unavailable()
    if why:
        pytest.skip(why)
    host = SlurmHost(str(tmp_path_factory.mktemp("slurm")))
    try:
        yield host.start()
    finally:
        leftovers = host.stop()
    assert not leftovers, f"SLURM job processes left behind: {leftovers}"


@pytest.fixture
def slurm_env(slurm, monkeypatch, tmp_path) -> SlurmHost:
    """SLURM's commands here talk to the test SLURM; node folders go under tmp_path."""
    for name, value in slurm.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    return slurm


def test_slurm_cluster_uses_slurm_cpus_and_scales(slurm_env) -> None:
    """SlurmCluster submits its nodes as one job array and waits until they join; each node
    runs as many processes as CPUs SLURM gave it (not the host's count); the secret is only in
    the private folder's 0600 .env (not in the batch script or a job's environment); scale(n)
    adds and removes nodes, a map runs at each size, and leaving the block cancels everything."""
    assert cpu_count() != 3
    launcher = SlurmCluster(nodes=2, processes=3, time="10:00", start_timeout=90, on_log=None)
    with launcher as cluster:
        assert len(launcher.job_ids) == 1
        nodes = cluster.status()["nodes"]
        assert sorted(n["name"] for n in nodes) == sorted(f"slurm-{launcher.job_ids[0]}_{i}"
                                                          for i in range(2))
        assert [n["processes"] for n in nodes] == [3, 3]
        assert cluster.map(lambda x: -x, range(30)) == [-x for x in range(30)]
        secret = launcher.settings.secret_key
        assert secret and stat.S_IMODE(os.stat(launcher.directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(launcher.directory, ".env")).st_mode) == 0o600
        with open(os.path.join(launcher.directory, "node.sh")) as fh:
            assert secret not in fh.read()
        for pid in slurm_env.job_processes():
            with open(f"/proc/{pid}/environ", "rb") as fh:
                assert secret.encode() not in fh.read(), "the secret is in a job's environment"
        launcher.scale(3, timeout=90)
        assert len(cluster.status()["nodes"]) == 3 and len(launcher.job_ids) == 2
        assert len(slurm_env.squeue()) == 3
        assert sum(cluster.map(lambda x: x, range(100), chunksize=5)) == 4950
        launcher.scale(1, timeout=90)
        assert [n["name"] for n in cluster.status()["nodes"]] == [f"slurm-{launcher.job_ids[0]}_0"]
        wait_for(lambda: len(slurm_env.squeue()) == 1, timeout=30, what="cancelled tasks to end")
        assert cluster.map(lambda x: x + 1, [1, 2, 3]) == [2, 3, 4]
        folder = launcher.directory
    assert slurm_env.squeue() == []
    assert not os.path.exists(folder)
    wait_for(lambda: not slurm_env.job_processes(), timeout=30, what="job processes to end")


def test_a_job_that_fails_is_an_error_with_its_log(slurm_env) -> None:
    """When the array's tasks end before their nodes join (here: no such Python), start()
    raises an AchillesError quoting the task's log instead of waiting forever, and cleans up."""
    launcher = SlurmCluster(nodes=1, python="/nonexistent/python3", start_timeout=90, on_log=None)
    with pytest.raises(AchillesError, match="ended") as info:
        launcher.start()
    assert "/nonexistent/python3" in str(info.value)
    assert not launcher.server.alive()
    assert slurm_env.squeue() == []


def test_achilles_up_slurm_serves_until_down(slurm_env, tmp_path) -> None:
    """``achilles up --slurm --nodes 2 --processes 3`` submits the nodes, serves a script that
    uses the folder's .env, and ``achilles down`` cancels the job and stops `up` (exit 0)."""
    achilles.gen_config(str(tmp_path / ".env"), port=0)
    up = Up(str(tmp_path), ["--slurm", "--nodes", "2", "--processes", "3", "--time", "10:00"])
    try:
        state = up.wait_ready(90)
        assert len(state["slurm_jobs"]) == 1
        env = dict(up.env, ACHILLES_PORT=str(state["port"]))
        script = ("import achilles\n"
                  "with achilles.connect() as c:\n"
                  "    print(sum(c.map(abs, range(-50, 50))),"
                  " sorted(n['processes'] for n in c.status()['nodes']))\n")
        run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.stdout.strip() == "2500 [3, 3]", run.stdout + run.stderr
        down = up.achilles("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.proc.wait(30) == 0
        assert slurm_env.squeue() == []
    finally:
        up.close()


def test_down_cancels_the_job_of_a_killed_up(slurm_env, tmp_path) -> None:
    """When ``achilles up --slurm`` was killed (SIGKILL: no cleanup), its job would keep its
    nodes; ``achilles down`` cancels the job named in the state file."""
    achilles.gen_config(str(tmp_path / ".env"), port=0)
    up = Up(str(tmp_path), ["--slurm", "--nodes", "1"])
    try:
        state = up.wait_ready(90)
        assert [line.split()[0].split("_")[0] for line in slurm_env.squeue()] == state["slurm_jobs"]
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait(10)
        down = up.achilles("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "cancelled SLURM job(s) " + state["slurm_jobs"][0] in down.stdout
        wait_for(lambda: slurm_env.squeue() == [], timeout=30, what="the job to end")
    finally:
        up.close()
