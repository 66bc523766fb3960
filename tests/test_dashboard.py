"""The server's web dashboard over HTTP: /api/status, /metrics, the event stream, failures with
their remote traceback, and who may read it (loopback, or the token off loopback)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import urllib.parse
from typing import Dict, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tasks
from achilles import TaskTimeout, WorkerCrashed, task
from conftest import ROOT, alive, group_members, wait_for
from achilles.server.webauth import derive_token

pytestmark = pytest.mark.timeout(120)


def get(url: str, path: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    """``GET path`` on the dashboard at ``url``: (status, headers, body)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        conn.close()


def metrics(url: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client's own parser: {(sample name, labels): value}."""
    status, headers, body = get(url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_status_and_metrics_follow_a_run(make_cluster):
    """/api/status carries the same data as status(), and /metrics (parsed with
    prometheus_client) counts the nodes, processes, items done and failed, ended jobs and
    their durations, and the bytes relayed of a run."""
    lc = make_cluster(nodes=2, processes=1)
    cluster = lc.cluster
    assert lc.dashboard_url and lc.dashboard_url.startswith("http://127.0.0.1:")
    assert cluster.map(tasks.square, range(30), chunksize=3) == [x * x for x in range(30)]
    with pytest.raises(tasks.TaskFailure):
        cluster.map(tasks.fail_on_three, [3])

    status, headers, body = get(lc.dashboard_url, "/api/status")
    assert status == 200 and headers["content-type"] == "application/json"
    api = json.loads(body)
    direct = cluster.status()
    assert sorted(n["name"] for n in api["nodes"]) == sorted(n["name"] for n in direct["nodes"])
    assert set(api) == set(direct) and set(api["nodes"][0]) == set(direct["nodes"][0])

    def ended() -> float:
        m = metrics(lc.dashboard_url)
        return sum(m[("achilles_jobs_ended_total", (("state", s),))] for s in ("done", "cancelled"))

    # The failing map may end either way: finished by its last result, or cancelled by the
    # caller that raised first.
    wait_for(lambda: ended() == 2, what="both jobs counted as ended")
    m = metrics(lc.dashboard_url)
    finished = m[("achilles_jobs_ended_total", (("state", "done"),))]
    assert finished >= 1
    assert m[("achilles_nodes", ())] == 2
    assert m[("achilles_processes", ())] == 2
    assert m[("achilles_tasks_total", (("state", "done"),))] == 30
    assert m[("achilles_tasks_total", (("state", "failed"),))] == 1
    assert m[("achilles_job_duration_seconds_count", ())] == finished
    assert m[("achilles_job_duration_seconds_bucket", (("le", "+Inf"),))] == finished
    assert m[("achilles_chunks_in_flight", ())] == 0
    assert m[("achilles_relayed_bytes_total", (("direction", "to_nodes"),))] > 0
    assert m[("achilles_relayed_bytes_total", (("direction", "to_controllers"),))] > 0
    per_node = [v for (name, _), v in m.items() if name == "achilles_node_tasks_done_total"]
    assert len(per_node) == 2 and sum(per_node) == 30


def test_failure_shows_its_remote_traceback(make_cluster):
    """A task's exception reaches /api/dashboard as plain text: type, message, the remote
    traceback, the function and the node; no pickled data, and the event log names it."""
    lc = make_cluster(nodes=1, processes=1)
    with pytest.raises(tasks.TaskFailure):
        lc.cluster.map(tasks.fail_on_three, range(5), chunksize=1)
    status, _, body = get(lc.dashboard_url, "/api/dashboard")
    view = json.loads(body)
    assert status == 200
    [failure] = view["failures"]
    assert failure["type"] == "tasks.TaskFailure" and failure["message"] == "item 3 is bad"
    assert "fail_on_three" in failure["traceback"] and "raise TaskFailure" in failure["traceback"]
    assert failure["function"] == "tasks.fail_on_three" and failure["node"] == "local-0"
    assert any(e["kind"] == "task failed" for e in view["events"])
    status, _, body = get(lc.dashboard_url, f"/api/dashboard?since={view['seq']}")
    assert json.loads(body)["failures"] == []  # only what the viewer has not seen


def read_events(resp: http.client.HTTPResponse, count: int) -> list:
    """The next ``count`` Server-Sent Events of a stream: [(event name, parsed data)]."""
    events = []
    name, data = None, []
    while len(events) < count:
        line = resp.fp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and name:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


def test_event_stream_is_coalesced(make_cluster):
    """/api/events is a text/event-stream that opens with the history and an update, then
    sends updates while a job runs: fewer of them than the job has chunks (coalesced), up to
    the one that lists the job as ended with all its items done."""
    lc = make_cluster(nodes=1, processes=2)
    parts = urllib.parse.urlsplit(lc.dashboard_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", "/api/events")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
        (first, history), (second, update) = read_events(resp, 2)
        assert first == "history" and set(history) == {"now", "cluster", "nodes"}
        assert second == "update" and update["state"]["summary"]["nodes"] == 1
        chunks = 400
        assert lc.cluster.map(tasks.square, range(chunks), chunksize=1)[-1] == (chunks - 1) ** 2
        updates = 0
        while not any(j["function"] == "tasks.square" for j in update["state"]["finished"]):
            [(name, update)] = read_events(resp, 1)
            assert name == "update"
            updates += 1
        assert updates < chunks
        assert update["state"]["summary"]["done"] == chunks
    finally:
        conn.close()


def start_server(daemons, secret, *args: str) -> Tuple[subprocess.Popen, str]:
    """A server with dashboard options ``args``; returns it and the dashboard URL it wrote."""
    url_file = daemons.tmp_path / f"url-{len(daemons.procs)}"
    port_file = daemons.tmp_path / f"port-{len(daemons.procs)}"
    proc = daemons.start("server", "--host", "127.0.0.1", "--port", "0", "--port-file",
                         str(port_file), "--dashboard-url-file", str(url_file), *args,
                         secret=secret)
    wait_for(lambda: port_file.exists() or proc.poll() is not None, what="server start")
    assert proc.poll() is None, daemons.log(proc)
    return proc, url_file.read_text()


def test_token_is_required_off_loopback(daemons, secret):
    """Bound to every interface, the dashboard refuses requests with no token, a wrong one
    (query, cookie or bearer), answers the right ?token= with an HttpOnly SameSite=Strict
    cookie and a redirect that drops it from the address, then serves that cookie; the token
    is derived from the secret and never equals it, and the log prints the ?token= URL."""
    proc, url = start_server(daemons, secret, "--dashboard", "0.0.0.0:0")
    token = derive_token(secret)
    assert url.endswith(f"/?token={token}") and secret not in url and token != secret
    assert f"?token={token}" in daemons.log(proc)
    port = urllib.parse.urlsplit(url).port
    local = f"http://127.0.0.1:{port}"
    for path in ("/", "/api/status", "/api/events", "/metrics", "/static/dashboard.js"):
        status, _, body = get(local, path)
        assert status == 403 and b"token" in body, path
    wrong = "0" * len(token)
    assert get(local, f"/api/status?token={wrong}")[0] == 403
    assert get(local, "/api/status", {"Cookie": f"achilles_dashboard={wrong}"})[0] == 403
    assert get(local, "/api/status", {"Authorization": f"Bearer {wrong}"})[0] == 403
    assert get(local, "/api/status", {"Authorization": f"Bearer {token}"})[0] == 200

    status, headers, _ = get(local, f"/?token={token}")
    assert status in (302, 303) and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"achilles_dashboard={token}")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    status, _, body = get(local, "/api/status", {"Cookie": f"achilles_dashboard={token}"})
    assert status == 200 and json.loads(body)["nodes"] == []


def test_loopback_needs_no_token_but_a_local_host_name(daemons, secret):
    """On loopback the page and APIs need no token, but a request naming a foreign Host
    (a DNS-rebinding page) is refused; every answer carries the security headers."""
    _, url = start_server(daemons, secret, "--dashboard", "127.0.0.1:0")
    assert "token" not in url
    status, headers, body = get(url, "/")
    assert status == 200 and b"Achilles dashboard" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert get(url, "/api/status", {"Host": "evil.example:80"})[0] == 403
    assert get(url, "/api/status", {"Host": "localhost"})[0] == 200
    assert get(url, "/static/nothing.js")[0] == 404


def test_dashboard_off_and_a_taken_port(daemons, secret):
    """--dashboard off serves nothing; an explicitly asked-for port that is taken stops the
    server with an error saying so."""
    _, url = start_server(daemons, secret, "--dashboard", "off")
    assert url == ""
    _, taken = start_server(daemons, secret, "--dashboard", "127.0.0.1:0")
    port = urllib.parse.urlsplit(taken).port
    proc = daemons.start("server", "--host", "127.0.0.1", "--port", "0", "--dashboard",
                         f"127.0.0.1:{port}", secret=secret)
    assert proc.wait(30) == 2
    assert "cannot serve the dashboard" in daemons.log(proc)


def test_demo_keep_serves_a_live_dashboard_until_enter(tmp_path):
    """`achilles demo --keep` prints the dashboard URL, keeps the cluster up with a job running
    (seen through /api/status) until Enter, then stops everything and exits 0."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "achilles", "demo", "--processes", "1",
                             "--keep"], cwd=str(tmp_path), env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines = []
        while not lines or "press Enter" not in lines[-1]:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = next(l.split("dashboard: ", 1)[1].strip() for l in lines if l.startswith("dashboard: "))
        assert url.startswith("http://127.0.0.1:") and url in lines[-1]

        def running() -> bool:
            status = json.loads(get(url, "/api/status")[2])
            return len(status["nodes"]) == 1 and any(
                j["function"] == "achilles.demo.count_primes" for j in status["jobs"])

        wait_for(running, what="the kept cluster's job")
        daemons = children(proc.pid)
        assert len(daemons) >= 2  # the server and the node
        out, _ = proc.communicate("\n", timeout=60)
        assert proc.returncode == 0 and "demo finished" in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    assert not group_members(proc.pid)
    for pid in daemons:
        wait_for(lambda pid=pid: not alive(pid) and not group_members(pid), what="daemons to exit")


def children(pid: int) -> list:
    """Pids of the processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as fh:
                if f"PPid:\t{pid}\n" in fh.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def test_graph_view_counts_states_and_draws_small_graphs():
    """A graph is shown as its tasks counted by state; up to SMALL_GRAPH tasks also task by
    task with their inputs, beyond that only the counts."""
    from achilles.server.graphs import GraphState
    from achilles.server.monitor import SMALL_GRAPH, graph_view

    small = GraphState([(1, "load", [], {}, "k", b""), (2, "fit", [1], {}, "k", b""),
                        (3, "score", [1, 2], {}, "k", b"")], [3])
    small.tasks[1].state = "done"
    view = graph_view(small)
    assert view["states"] == {"done": 1, "waiting": 2}
    assert [(t["id"], t["name"], t["deps"], t["state"]) for t in view["tasks"]] == [
        (1, "load", [], "done"), (2, "fit", [1], "waiting"), (3, "score", [1, 2], "waiting")]
    big = GraphState([(i, "t", [], {}, "k", b"") for i in range(SMALL_GRAPH + 1)], [])
    assert graph_view(big) == {"states": {"waiting": SMALL_GRAPH + 1}}


def test_dashboard_uses_tls_when_the_server_has_a_certificate(make_cluster):
    """With a server certificate the dashboard is served over HTTPS with that certificate (a
    client verifying against the cluster's CA gets the page), and not over plain HTTP."""
    import ssl

    lc = make_cluster(nodes=1, processes=1, tls=True)
    assert lc.dashboard_url.startswith("https://127.0.0.1:")
    parts = urllib.parse.urlsplit(lc.dashboard_url)
    context = ssl.create_default_context(cafile=lc.tls["tls_ca"])
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
    try:
        conn.request("GET", "/api/status")
        res = conn.getresponse()
        assert res.status == 200 and len(json.loads(res.read())["nodes"]) == 1
    finally:
        conn.close()
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        get(f"http://{parts.hostname}:{parts.port}", "/api/status")


@task(timeout=0.5)
def spin_forever() -> None:
    """Never returns: runs into its timeout."""
    while True:
        pass


def test_crashes_timeouts_and_refused_handshakes_are_counted(make_cluster):
    """A task that kills its worker, a graph task past its timeout and a connection that
    fails the handshake each show in /metrics (parsed), in the failure list and in the event
    log."""
    lc = make_cluster(nodes=1, processes=1, max_crashes=1)
    with pytest.raises(WorkerCrashed):
        lc.cluster.map(tasks.always_exit, range(8), chunksize=1)
    with pytest.raises(TaskTimeout):
        lc.cluster.compute(spin_forever())
    with socket.create_connection(("127.0.0.1", lc.port), timeout=10) as sock:
        sock.sendall(b"\x02\x00\x00\x00\x05hello")  # not the handshake the server expects
        try:
            while sock.recv(1024):
                pass
        except ConnectionResetError:
            pass  # the server dropped us

    wait_for(lambda: metrics(lc.dashboard_url)[("achilles_handshake_failures_total", ())] >= 1,
             what="the refused handshake counted")
    m = metrics(lc.dashboard_url)
    assert m[("achilles_worker_crashes_total", ())] == 1
    assert m[("achilles_task_timeouts_total", ())] == 1
    assert m[("achilles_tasks_total", (("state", "failed"),))] == 2
    view = json.loads(get(lc.dashboard_url, "/api/dashboard")[2])
    assert sorted(f["type"] for f in view["failures"]) == ["TaskTimeout", "WorkerCrashed"]
    kinds = {e["kind"] for e in view["events"]}
    assert {"worker crashed", "timeout", "job started", "job finished"} <= kinds
