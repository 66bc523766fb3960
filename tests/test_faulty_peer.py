"""An authenticated but faulty peer cannot lose work: a real server, a real node and a real
controller run a map while a scripted node or controller (tests/rawpeer.py, correctly
authenticated) sends messages of every type with wrong shapes. The faulty peer is dropped,
and the map still returns every result exactly once."""

from __future__ import annotations

import pickle
import re
import secrets
import threading
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from achilles.core import wire
from achilles.core.config import Config
from achilles.controller.cluster import Cluster
from conftest import Daemons, group_members, wait_for
from rawpeer import RawPeer

pytestmark = [pytest.mark.timeout(120), pytest.mark.faults]

ITEMS = list(range(-40, 0))

#: Seconds a rogue waits for the server to close its connection: well under the servers'
#: heartbeat (10 s of silence, counted from the rogue's last message), so a close seen in
#: time is the server's answer to that message, never a heartbeat timeout.
CLOSE_WAIT = wire.DEFAULT_HEARTBEAT / 3


def dropped_for(rogue: RawPeer, server_log: Callable[[], str]) -> str:
    """Check the server closed ``rogue``'s connection at once and say why: the reason its
    log gives for closing that connection (a protocol error, not a missed heartbeat)."""
    assert rogue.closed_by_server(CLOSE_WAIT), "the server kept a peer that sent a malformed message"
    line = re.compile(r"closing connection from %s: (.*)" % re.escape(rogue.address))
    wait_for(lambda: line.search(server_log()), 10, what="the server's reason for the close")
    assert f"no heartbeat from {rogue.address}" not in server_log()
    return line.search(server_log()).group(1)

# (code, fields, raw payload or None): every message a node may send, in wrong shapes.
BAD_FROM_NODE = {
    "result-wrong-types": (wire.RESULT, ("JOB", "zero", "ok", "fast", 7), b"x"),
    "result-too-few-fields": (wire.RESULT, ("JOB", 0), b"x"),
    "result-not-a-tuple": (wire.RESULT, ["JOB", 0, 0, 0.1, "rogue"], b"x"),
    "result-unknown-status": (wire.RESULT, ("JOB", "CHUNK", 99, 0.1, "rogue"), b"x"),
    "crashed-garbage-record": (wire.RESULT, ("JOB", "CHUNK", wire.CRASHED, 0.1, "rogue"),
                               b"not a crash record"),
    "crashed-wrong-record": (wire.RESULT, ("JOB", "CHUNK", wire.CRASHED, 0.1, "rogue"),
                             pickle.dumps(("one", "two", "three", "four"))),
    "node-ready-again-bad": (wire.NODE_READY, ("rogue", "many"), None),
    "controller-message": (wire.SUBMIT, ("j", "f", b"", b"", {}), None),
    "ping-wrong-token": (wire.PING, ("token",), None),
}

#: What the server's log says when it drops the rogue of each case (a regular expression).
WHY = {
    "result-wrong-types": r"malformed RESULT",
    "result-too-few-fields": r"malformed RESULT",
    "result-not-a-tuple": r"malformed RESULT",
    "result-unknown-status": r"unknown status 99",
    "crashed-garbage-record": r"CRASHED result .* does not carry",
    "crashed-wrong-record": r"CRASHED result .* does not carry",
    "node-ready-again-bad": r"malformed NODE_READY",
    "controller-message": r"unexpected message code \d+ \(SUBMIT\)",
    "ping-wrong-token": r"malformed PING",
    "submit-wrong-types": r"malformed SUBMIT",
    "chunk-wrong-types": r"malformed CHUNK",
    "end-wrong-types": r"malformed END",
    "cancel-too-many": r"malformed CANCEL",
    "graph-wrong-types": r"malformed GRAPH",
    "status-wrong-type": r"malformed STATUS",
    "node-message": r"unexpected message code \d+ \(NODE_READY\)",
    "result-from-controller": r"unexpected message code \d+ \(RESULT\)",
}


def run_map(cluster: Cluster, out: List[Any]) -> threading.Thread:
    def work() -> None:
        try:
            out.append(cluster.map(abs, ITEMS, chunksize=1))
        except BaseException as exc:  # reported by the test
            out.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def fill(template: tuple, job_id: str, chunk_id: int) -> Any:
    def sub(v: Any) -> Any:
        return job_id if v == "JOB" else chunk_id if v == "CHUNK" else v
    return type(template)(sub(v) for v in template)


@pytest.fixture(scope="module")
def node_case_server(tmp_path_factory) -> Iterator[Tuple[int, str, Callable[[], str]]]:
    """One server ``(port, secret, its log so far)`` for every faulty-node case (each case starts and stops
    its own real node, and checks the server drops its rogue and still serves)."""
    server = Daemons(tmp_path_factory.mktemp("faulty-node-server"))
    secret = secrets.token_urlsafe(24)
    port = server.server(secret)
    yield port, secret, lambda: server.log(server.procs[0])
    server.stop_all()
    for proc in server.procs:
        assert not group_members(proc.pid), f"processes of group {proc.pid} outlived the module"


@pytest.mark.parametrize("case", sorted(BAD_FROM_NODE))
def test_faulty_node_loses_no_work(daemons, node_case_server, case):
    """A node that sends a malformed message while it holds chunks is dropped at once for
    that message (the server's log says which fault), its chunks run elsewhere, and the map
    completes with every result exactly once."""
    port, secret, server_log = node_case_server
    rogue = RawPeer(port, "node", secret)
    rogue.send(wire.NODE_READY, "rogue", 4, "rogue-host", 1, {})
    cluster = Cluster(Config(host="127.0.0.1", port=port, username="tester", secret_key=secret))
    try:
        out: List[Any] = []
        thread = run_map(cluster, out)
        tasks = []
        while not tasks:
            code, fields = rogue.receive()
            if code == wire.TASK:
                tasks.append(fields)
        job_id, chunk_id = tasks[0][0], tasks[0][1]
        daemons.start("node", "--host", "127.0.0.1", "--port", str(port), "--processes", "1",
                      secret=secret)
        code, fields, payload = BAD_FROM_NODE[case]
        rogue.send_raw(code, fill(fields, job_id, chunk_id), payload)
        assert re.search(WHY[case], dropped_for(rogue, server_log))
        thread.join(60)
        assert not thread.is_alive(), "the map hung: a chunk was lost"
        assert out == [[abs(x) for x in ITEMS]]
    finally:
        rogue.close()
        cluster.close()


BAD_FROM_CONTROLLER = {
    "submit-wrong-types": (wire.SUBMIT, ("j", 5, "code", None, []), None),
    "chunk-wrong-types": (wire.CHUNK, ("j", "zero", 1), b"x"),
    "end-wrong-types": (wire.END, ("j", "all")), 
    "cancel-too-many": (wire.CANCEL, ("j", "r", "extra"), None),
    "graph-wrong-types": (wire.GRAPH, ("g", b"", {"tasks": 1}, None), None),
    "status-wrong-type": (wire.STATUS, ("one",), None),
    "node-message": (wire.NODE_READY, ("x", 1, "h", 1, {}), None),
    "result-from-controller": (wire.RESULT, ("j", 0, 0, 0.1, "n"), b"x"),
}


@pytest.mark.parametrize("case", sorted(BAD_FROM_CONTROLLER))
def test_faulty_controller_harms_no_other_job(shared_cluster, case):
    """A controller that sends a malformed message is dropped at once for that message (the
    server's log says which fault); another controller's map running at the same time
    completes with every result exactly once."""
    # One cluster serves every case: a dropped controller must leave it serving the next.
    port, secret = shared_cluster.port, shared_cluster._secret
    cluster = Cluster(Config(host="127.0.0.1", port=port, username="local", secret_key=secret))
    rogue = RawPeer(port, "controller", secret, username="local")
    try:
        out: List[Any] = []
        thread = run_map(cluster, out)
        spec = BAD_FROM_CONTROLLER[case]
        code, fields, payload = spec if len(spec) == 3 else (*spec, None)
        rogue.send_raw(code, fields, payload)
        assert re.search(WHY[case], dropped_for(rogue, lambda: shared_cluster.log_text("server")))
        thread.join(60)
        assert not thread.is_alive(), "the map hung"
        assert out == [[abs(x) for x in ITEMS]]
    finally:
        rogue.close()
        cluster.close()
