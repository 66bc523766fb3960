"""``achilles status`` (tables, ``--json``) and ``achilles top`` as real subprocesses."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from achilles.tables import render
from conftest import ROOT, sigint_as_on_a_terminal, stop_group, wait_for

pytestmark = pytest.mark.timeout(90)


def _env(lc) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in sys.path if p])
    env["ACHILLES_SECRET_KEY"] = lc._secret
    env["ACHILLES_USERNAME"] = "local"
    env.pop("ACHILLES_ENV_FILE", None)
    return env


def _achilles(lc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "achilles", *args, "--port", str(lc.port)],
                          env=_env(lc), capture_output=True, text=True, timeout=60)


def test_status_prints_tables_and_json(make_cluster):
    """``achilles status`` prints a table of nodes (name, processes, items done, load...) and
    one of jobs; ``--json`` prints exactly the status() structure."""
    lc = make_cluster(nodes=2, processes=1)
    assert lc.cluster.map(abs, range(-20, 20)) == [abs(x) for x in range(-20, 20)]
    out = _achilles(lc, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"achilles 127.0.0.1:{lc.port}  2 node(s), 2 process(es)")
    header = next(line for line in lines if line.startswith("NODE"))
    assert header.split()[:5] == ["NODE", "HOST", "PROCS", "BUSY", "DONE"]
    rows = [line.split() for line in lines if line.startswith("local-")]
    assert sorted(r[0] for r in rows) == ["local-0", "local-1"]
    assert sum(int(r[4].replace(",", "")) for r in rows) == 40
    assert "no jobs running" in lines
    out = _achilles(lc, "status", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert sorted(n["name"] for n in data["nodes"]) == ["local-0", "local-1"]
    assert data["jobs"] == []


def test_top_refreshes_until_ctrl_c(make_cluster):
    """``achilles top`` on a terminal (a pseudo-terminal here) clears the screen and redraws
    the tables every interval, with a RATE/s column, until Ctrl-C (SIGINT) ends it with
    exit code 0."""
    lc = make_cluster(nodes=1, processes=1)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "achilles", "top", "--port", str(lc.port),
                             "--interval", "0.2"], env=_env(lc), stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True,
                            preexec_fn=sigint_as_on_a_terminal)
    os.close(slave)
    seen = b""
    try:
        def two_refreshes() -> bool:
            nonlocal seen
            while select.select([master], [], [], 0)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the terminal closed: the process ended
                    break
            return seen.count(b"\x1b[H\x1b[2J") >= 2 and seen.count(b"RATE/s") >= 2
        wait_for(two_refreshes, timeout=30, what="two refreshes of achilles top")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            stop_group(proc)
        os.close(master)
    text = seen.decode(errors="replace")
    assert "local-0" in text and "NODE" in text and "no jobs running" in text
    assert "Traceback" not in text


def test_render_rates_and_escapes():
    """Rates are items per second between two status snapshots; text from peers is escaped,
    so a name cannot move the cursor or forge a line."""
    node = {"name": "n\x1b[2Jevil", "hostname": "h", "processes": 2, "busy": 1, "done": 100,
            "connected_since": 1000.0, "load": {"load1": 0.5, "cpus": 2, "mem_available": 3 << 30},
            "resources": {"gpu": 1}}
    job = {"id": "abcd1234", "kind": "map", "function": "f\nforged", "owner": "o", "sent": 10,
           "done": 4, "failed": 0, "queued": 2, "running": 2}
    before = {"nodes": [node], "jobs": [job]}
    after = {"nodes": [dict(node, done=300)], "jobs": [dict(job, done=10)]}
    text = render(after, "x:1", before, 2.0, now=1065.0)
    assert "\x1b" not in text and "\nforged" not in text
    node_row = next(line for line in text.splitlines() if line.startswith("n"))
    assert "100.0" in node_row.split() and "0:01:05" in node_row and "3.0 GiB" in node_row
    job_row = next(line for line in text.splitlines() if line.startswith("abcd1234"))
    assert job_row.split()[-1] == "3.0"
