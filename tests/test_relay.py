"""A man in the middle who relays a genuine handshake gains nothing: real server, node and
controller daemons talk through a relay on 127.0.0.1 that forwards their frames and then
injects its own (untagged, with a forged tag, replayed, or taken from another connection).
Every injected frame is refused before anything in it is unpickled, in all three directions:
as a controller towards the server, towards the server's unpickler, and posing as the server
towards a node."""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from typing import List

import pytest

from achilles.core import wire
from achilles.core.config import Config
from achilles.controller.cluster import Cluster
from achilles.core.session import TAG_SIZE
from conftest import MarkerPickle, poll, wait_for

pytestmark = [pytest.mark.timeout(90), pytest.mark.faults]

HEADER = struct.Struct("!BI")


def carries(frame: bytes, code: int) -> bool:
    """Whether a recorded frame is a ``code`` message or a BATCH holding one (small messages
    of one reactor turn travel together in a BATCH frame)."""
    if frame[0] == code:
        return True
    if frame[0] != wire.BATCH:
        return False
    body = frame[wire.HEADER.size:-TAG_SIZE]
    (fields,) = wire.META.unpack_from(body, 0)
    payload = body[wire.META.size + fields:]
    return any(inner == code for inner, _ in wire.split_batch(payload))


class Direction:
    """One direction of a relayed connection: forwards whole frames, records them, and lets
    the test inject frames between them."""

    def __init__(self, src: socket.socket, dst: socket.socket, on_frame) -> None:
        self.src, self.dst = src, dst
        self.lock = threading.Lock()
        self.frames: List[bytes] = []
        self.closed = threading.Event()
        self._on_frame = on_frame
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        buf = b""
        try:
            while True:
                data = self.src.recv(1 << 16)
                if not data:
                    break
                buf += data
                while len(buf) >= HEADER.size:
                    _, length = HEADER.unpack_from(buf)
                    if len(buf) < HEADER.size + length:
                        break
                    frame, buf = buf[:HEADER.size + length], buf[HEADER.size + length:]
                    with self.lock:
                        self.dst.sendall(frame)
                    self.frames.append(frame)
                    self._on_frame(frame)
        except OSError:
            pass
        finally:
            self.closed.set()
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def inject(self, data: bytes) -> None:
        """Send ``data`` to this direction's receiver, between two relayed frames."""
        with self.lock:
            self.dst.sendall(data)


class Link:
    """One relayed connection: ``up`` carries client -> server, ``down`` server -> client."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.authed = threading.Event()
        self.up = Direction(client, server, lambda f: None)
        self.down = Direction(server, client, self._seen_down)
        self.sockets = (client, server)
        self.up.thread.start()
        self.down.thread.start()

    def _seen_down(self, frame: bytes) -> None:
        if frame[0] == wire.AUTH_OK:
            self.authed.set()

    def close(self) -> None:
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the relay threads; close alone does not
            except OSError:
                pass
            s.close()


class Relay:
    """Accepts connections on 127.0.0.1 and relays each to the upstream server."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.links: List[Link] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # the server is gone (a node reconnecting after the test): refuse
                client.close()
                continue
            self.links.append(Link(client, server))

    def link(self, index: int = 0, timeout: float = 20.0) -> Link:
        """The ``index``-th relayed connection, once its handshake has gone through."""
        wait_for(lambda: len(self.links) > index, timeout, what="a relayed connection")
        link = self.links[index]
        assert link.authed.wait(timeout), "the relayed handshake did not finish"
        return link

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for link in self.links:
            link.close()


@pytest.fixture
def relay_to():
    made: List[Relay] = []

    def make(port: int) -> Relay:
        relay = Relay(port)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


def untagged(code: int, fields: tuple) -> bytes:
    """A post-auth frame as an attacker without the key can build it."""
    return b"".join(wire.encode_message(code, fields))


def forged(code: int, fields: tuple) -> bytes:
    """The same frame with a tag the attacker made up."""
    body = b"".join(wire.encode_message(code, fields)[1:])
    return HEADER.pack(code, len(body) + TAG_SIZE) + body + b"\x5a" * TAG_SIZE


def evil_job(marker) -> List[tuple]:
    """SUBMIT and CHUNK for a job whose function and input are marker pickles: whoever
    unpickles any of it creates the marker file."""
    bomb = pickle.dumps(MarkerPickle(str(marker)))
    return [(wire.SUBMIT, ("evil", "evil", bomb, b"", {})),
            (wire.CHUNK, ("evil", 0, 1, bomb))]


def still_absent(path, seconds: float = 1.5) -> bool:
    return not poll(path.exists, seconds, 0.05)


def server_with_node(daemons, secret: str, processes: int = 1) -> int:
    """Start a server and one node on it; return the server's port."""
    port = daemons.server(secret)
    daemons.start("node", "--host", "127.0.0.1", "--port", str(port), "--processes",
                  str(processes), secret=secret)
    return port


@pytest.fixture
def relayed_controller(daemons, secret, relay_to):
    """A server with one node, and a controller connected through a relay; a map through
    the relay proves it forwards genuine traffic."""
    port = server_with_node(daemons, secret)
    relay = relay_to(port)
    cluster = Cluster(Config(host="127.0.0.1", port=relay.port, username="tester",
                             secret_key=secret, reconnect_timeout=0.5))
    assert cluster.map(abs, [-1, -2, -3]) == [1, 2, 3]
    yield relay, cluster, daemons
    cluster.close()


@pytest.mark.parametrize("make_frame", [untagged, forged], ids=["untagged", "forged-tag"])
def test_relay_cannot_submit_a_job_as_the_controller(relayed_controller, tmp_path, make_frame):
    """Frames a relay injects towards the server on a controller's authenticated connection
    are refused: the server closes that connection, logs why, and neither it nor the node
    unpickles anything of the injected job."""
    relay, cluster, daemons = relayed_controller
    link = relay.link()
    marker = tmp_path / "pwned"
    # in one write: the server may close the connection as soon as it sees the first frame
    link.up.inject(b"".join(make_frame(code, fields) for code, fields in evil_job(marker)))
    assert link.down.closed.wait(10), "the server kept the tampered connection open"
    assert still_absent(marker)
    server = daemons.procs[0]
    wait_for(lambda: "failed authentication" in daemons.log(server), 10,
             what="the server's log line")


def test_relay_cannot_replay_a_frame(relayed_controller):
    """A genuine frame the controller sent, replayed by the relay on the same connection, is
    refused (the server closes the connection): sequence numbers bind each frame to its
    place."""
    relay, cluster, daemons = relayed_controller
    link = relay.link()
    chunk = next(f for f in link.up.frames if carries(f, wire.CHUNK))
    link.up.inject(chunk)
    assert link.down.closed.wait(10), "the server accepted a replayed frame"


def test_relay_cannot_move_a_frame_to_another_connection(daemons, secret, relay_to, tmp_path):
    """A genuine frame taken from one controller's connection and injected into another's is
    refused: each connection has its own keys."""
    port = server_with_node(daemons, secret)
    relay = relay_to(port)
    config = Config(host="127.0.0.1", port=relay.port, username="tester", secret_key=secret,
                    reconnect_timeout=0.5)
    with Cluster(config) as first, Cluster(config) as second:
        assert first.map(abs, [-4]) == [4]
        a, b = relay.link(0), relay.link(1)
        assert second.status()["nodes"]
        frame = next(f for f in a.up.frames if carries(f, wire.SUBMIT))
        b.up.inject(frame)
        assert b.down.closed.wait(10), "the server accepted another connection's frame"
        assert not a.down.closed.is_set()
        assert first.map(abs, [-5]) == [5]


@pytest.mark.parametrize("make_frame", [untagged, forged], ids=["untagged", "forged-tag"])
def test_relay_cannot_make_a_node_run_code(daemons, secret, relay_to, tmp_path, make_frame):
    """Posing as the server on a node's relayed connection, the relay injects a job; the node
    refuses the frames before unpickling anything, drops the connection, logs why, and
    reconnects (it stays a working node)."""
    port = daemons.server(secret)
    relay = relay_to(port)
    node = daemons.start("node", "--host", "127.0.0.1", "--port", str(relay.port),
                         "--processes", "1", secret=secret)
    link = relay.link()
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(MarkerPickle(str(marker)))
    link.down.inject(make_frame(wire.JOB_CODE, ("evil", bomb, b"", {}))
                     + make_frame(wire.TASK, ("evil", 0, False, None, bomb)))
    assert link.up.closed.wait(10), "the node kept the tampered connection open"
    assert still_absent(marker)
    wait_for(lambda: "failed authentication" in daemons.log(node), 10, what="the node's log line")
    relay.link(1, timeout=30)  # it comes back through the relay with a fresh handshake
    assert node.poll() is None


def test_another_controller_cannot_take_over_a_resuming_job(daemons, secret, relay_to):
    """While a controller's link is down and it reconnects, another (authenticated)
    controller that read the cluster status cannot claim its job: status shows only a prefix
    of each job id, the full id is the job's capability, and the resumed map returns its own
    results in full."""
    from rawpeer import RawPeer
    from tasks import slow_square

    port = server_with_node(daemons, secret, processes=2)
    relay = relay_to(port)
    victim = Cluster(Config(host="127.0.0.1", port=relay.port, username="tester",
                            secret_key=secret, reconnect_timeout=20))
    attacker = RawPeer(port, "controller", secret)
    try:
        results = victim.imap(slow_square, range(60), chunksize=1)
        assert next(results) == 0
        attacker.send(wire.STATUS, 1)
        code, (_, status) = attacker.receive()
        [job] = status["jobs"]
        assert len(job["id"]) == 8, "status gives away the full job id"
        relay.links[0].close()  # the victim's link drops; it will reconnect and resume
        for guess in (job["id"], job["id"] + "0" * 24):
            attacker.send(wire.SUBMIT, guess, "evil", b"", b"", {})
        rest = list(results)
        assert rest == [x * x for x in range(1, 60)]
        assert len(relay.links) >= 2, "the victim did not reconnect through the relay"
    finally:
        attacker.close()
        victim.close()
