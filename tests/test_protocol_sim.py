"""The Twisted protocols in memory: a ServerFactory connection talking to a ControllerProtocol
(and a minimal node) over iosim/StringTransport, including hostile pre-auth input."""

from __future__ import annotations

import functools
import json
import os
import pickle
import queue

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock

from achilles.server.scheduler import JOB_DONE_DELAY
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connectedServerAndClient

from achilles.core import wire
from achilles.controller.client import ControllerProtocol
from achilles.controller.events import ChunkResult, Reply
from achilles.core.errors import AuthenticationError, ConnectionFailed
from achilles.core.handshake import PeerHandshake, derive_key
from achilles.core.protocol import REFUSED_LINGER, PeerSideProtocol, handles
from achilles.core.session import TAG_SIZE, FrameOpener, FrameSealer
from achilles.server.service import ServerFactory
from conftest import MarkerPickle

pytestmark = pytest.mark.timeout(60)

USER = "tester"
SECRET = "protocol-sim-secret-0123456789abcdef"
key_for = functools.lru_cache(maxsize=None)(derive_key)  # scrypt is deliberately slow
KEY = key_for(USER, SECRET)
PEER = IPv4Address("TCP", "10.0.0.7", 40000)


class RecordingTransport(FakeTransport):
    """An iosim transport that also keeps every byte its protocol wrote."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.written = b""

    def write(self, data):
        if not self.disconnecting:
            self.written += data
        super().write(data)


class SimNode(PeerSideProtocol):
    """A minimal node: announces itself and records what the server sends it."""

    local_role = "node"

    def __init__(self, username, secret_key, name="sim-node", processes=1):
        super().__init__()
        self.username = username
        self.auth_key = key_for(username, secret_key)
        self.name = name
        self.processes = processes
        self.heartbeat = 0
        self.got = []

    def on_authenticated(self):
        self.send(wire.NODE_READY, self.name, self.processes, "sim-host", 4242, {})

    @handles(wire.JOB_CODE)
    def job_code(self, *fields):
        self.got.append((wire.JOB_CODE,) + fields)

    @handles(wire.TASK)
    def task(self, *fields):
        self.got.append((wire.TASK,) + fields[:-1] + (bytes(fields[-1]),))

    @handles(wire.JOB_DONE)
    def job_done(self, *fields):
        self.got.append((wire.JOB_DONE,) + fields)

    @handles(wire.CANCEL)
    def cancel(self, *fields):
        self.got.append((wire.CANCEL,) + fields)

    @handles(wire.SHUTDOWN)
    def shutdown(self, *fields):
        self.got.append((wire.SHUTDOWN,) + fields)


@pytest.fixture
def protos():
    """Collects every protocol a test creates; at teardown, fails if any of them left a
    handshake timer or heartbeat scheduled in the reactor (and cancels it)."""
    made = []
    yield made
    leftovers = []
    for p in made:
        if p._timer is not None and p._timer.active():
            leftovers.append((p, "handshake timer"))
            p._timer.cancel()
        if p._beat is not None and p._beat.running:
            leftovers.append((p, "heartbeat"))
            p._beat.stop()
    for call in reactor.getDelayedCalls():
        owner = getattr(getattr(call, "func", None), "__self__", None)
        if owner is not None and owner in made and call.active():
            leftovers.append((owner, repr(call)))
            call.cancel()
    assert not leftovers, leftovers


@pytest.fixture
def factory():
    """A server factory with heartbeats off, on a test clock (no timer in the global reactor)."""
    return ServerFactory(USER, SECRET, prefetch=1, heartbeat=0, clock=Clock())


def connect(factory, client, protos):
    """Connect ``client`` to a fresh server protocol in memory and run the handshake."""
    server_holder = []

    def make_server():
        proto = factory.buildProtocol(PEER)
        server_holder.append(proto)
        protos.append(proto)
        return proto

    protos.append(client)
    c, s, pump = connectedServerAndClient(
        make_server, lambda: client,
        clientTransportFactory=lambda p: RecordingTransport(p, isServer=False),
        serverTransportFactory=lambda p: RecordingTransport(p, isServer=True, peerAddress=PEER),
    )
    assert s is server_holder[0]
    return s, pump


def controller(username=USER, secret=SECRET):
    client = ControllerProtocol(username, key_for(username, secret), "sim-server:1")
    client.heartbeat = 0
    return client


def close(client, pump):
    client.transport.loseConnection()
    pump.flush()


def frames_of(data: bytes):
    """Every frame in ``data`` as (code, body), post-auth bodies without their session tag
    (not checked here: the protocols under test check them)."""
    decoder = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME, wire.ALL_CODES)
    return [(code, body if code in wire.PREAUTH_CODES else body[:-TAG_SIZE])
            for code, body in decoder.frames(data)]


def sealed(sealer, code, *fields):
    """One post-auth frame, tagged for its session."""
    return b"".join(sealer.seal(wire.encode_message(code, fields)))


def outcome(d):
    """The result or Failure a fired Deferred holds (consuming a Failure)."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def raw_server(factory, protos):
    """A server protocol on a StringTransport; returns (proto, transport, HELLO frame)."""
    proto = factory.buildProtocol(PEER)
    protos.append(proto)
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    [hello] = wire.FrameDecoder().frames(transport.value())
    assert hello[0] == wire.HELLO
    transport.clear()
    return proto, transport, hello


def lose(proto):
    proto.connectionLost(Failure(ConnectionDone()))


# --- happy path -------------------------------------------------------------------------------

def test_controller_handshake_and_status(factory, protos):
    """A controller authenticates in memory, is registered, and STATUS gets a STATUS_REPLY
    with the scheduler's status; closing unregisters it and cancels the handshake timers."""
    client = controller()
    server, pump = connect(factory, client, protos)
    assert client.state == "ready" and server.state == "ready"
    assert server.role == "controller"
    assert outcome(client.ready) is client
    assert client.auth_error is None
    assert client._timer is None and server._timer is None
    [ctrl] = factory.scheduler.controllers.values()
    assert ctrl.address == "10.0.0.7:40000"

    replies = queue.Queue()
    client.start_request(7, replies, wire.encode_message(wire.STATUS, (7,)))
    pump.flush()
    reply = replies.get_nowait()
    assert isinstance(reply, Reply)
    assert reply.value == factory.scheduler.status() == {"nodes": [], "jobs": []}
    assert 7 not in client.requests
    assert [c for c, _ in frames_of(server.transport.written)] == \
        [wire.HELLO, wire.AUTH_OK, wire.STATUS_REPLY]

    close(client, pump)
    assert client.state == "closed" and server.state == "closed"
    assert factory.scheduler.controllers == {}
    assert client.closed.called


def test_ping_is_answered(factory, protos):
    """A PING from the controller is answered with a PONG carrying the same token."""
    client = controller()
    server, pump = connect(factory, client, protos)
    client.send(wire.PING, 12345)
    pump.flush()
    assert frames_of(server.transport.written)[-1][0] == wire.PONG
    assert wire.decode_message(frames_of(server.transport.written)[-1][1], wire.PONG) == (12345,)
    close(client, pump)


def test_job_runs_through_server_to_node(factory, protos):
    """A job submitted by a controller reaches a node as JOB_CODE then TASK; the node's
    RESULT reaches the controller; END finishes the job and the node gets JOB_DONE."""
    node = SimNode(USER, SECRET)
    nserver, npump = connect(factory, node, protos)
    assert node.state == "ready" and nserver.role == "node"
    [nstate] = factory.scheduler.nodes.values()
    assert (nstate.name, nstate.processes, nstate.hostname) == ("sim-node", 1, "sim-host")

    client = controller()
    cserver, cpump = connect(factory, client, protos)
    jobq = queue.Queue()
    client.add_job("j1", jobq)
    client.send(wire.SUBMIT, "j1", "mod.fn", b"FUNC", b"CB", {"chunksize": 2})
    client.send(wire.CHUNK, "j1", 0, 2, b"PAYLOAD")
    cpump.flush()
    npump.flush()
    assert node.got == [(wire.JOB_CODE, "j1", b"FUNC", b"CB", {"chunksize": 2}),
                        (wire.TASK, "j1", 0, False, None, b"PAYLOAD")]

    node.send(wire.RESULT, "j1", 0, wire.OK, 0.5, "sim-node", b"RES")
    npump.flush()
    cpump.flush()
    got = []
    while not jobq.empty():
        got.append(jobq.get_nowait())
    assert [(e.chunk_id, e.status, bytes(e.payload), e.elapsed, e.node)
            for e in got if isinstance(e, ChunkResult)] == [(0, wire.OK, b"RES", 0.5, "sim-node")]

    client.send(wire.END, "j1", 1)
    cpump.flush()
    factory.clock.advance(JOB_DONE_DELAY)  # finished jobs are told to nodes in batches
    npump.flush()
    assert node.got[-1] == (wire.JOB_DONE, ["j1"])
    assert factory.scheduler.jobs == {}

    replies = queue.Queue()
    client.start_request(1, replies, wire.encode_message(wire.STATUS, (1,)))
    cpump.flush()
    status = replies.get_nowait().value
    assert [n["name"] for n in status["nodes"]] == ["sim-node"]
    assert status["nodes"][0]["done"] == 2
    json.dumps(status)

    close(node, npump)
    assert factory.scheduler.nodes == {}
    close(client, cpump)


def test_controller_disconnect_cancels_job_on_node(factory, protos):
    """When a controller's connection closes, its running job is cancelled on the node."""
    node = SimNode(USER, SECRET)
    nserver, npump = connect(factory, node, protos)
    client = controller()
    cserver, cpump = connect(factory, client, protos)
    client.send(wire.SUBMIT, "j2", "f", b"F", b"C", {})
    client.send(wire.CHUNK, "j2", 0, 1, b"P")
    cpump.flush()
    npump.flush()
    close(client, cpump)
    npump.flush()
    assert node.got[-1][:2] == (wire.CANCEL, "j2")
    assert factory.scheduler.jobs == {}
    close(node, npump)


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("username,secret", [(USER, "wrong-" + SECRET), ("mallory", SECRET)])
def test_wrong_credentials_are_refused(factory, protos, username, secret):
    """A controller with a wrong secret or user name gets AUTH_FAIL and is disconnected;
    it records an AuthenticationError, its ready Deferred fails, nothing is registered,
    and no secret material crosses the wire."""
    client = controller(username, secret)
    server, pump = connect(factory, client, protos)
    assert server.state == "closed" and client.state == "closed"
    assert isinstance(client.auth_error, AuthenticationError)
    assert "refused" in str(client.auth_error)
    failure = outcome(client.ready)
    assert isinstance(failure, Failure) and failure.check(AuthenticationError)
    assert client.closed.called
    assert factory.scheduler.controllers == {}
    assert server.handshake.state == "failed"
    sent = server.transport.written
    assert [c for c, _ in frames_of(sent)] == [wire.HELLO, wire.AUTH_FAIL]
    for s in (SECRET, secret):
        assert s.encode() not in sent and s.encode() not in client.transport.written
    assert server._timer is None and client._timer is None


def test_controller_against_server_with_other_secret(protos):
    """Against a server configured with another secret the controller never becomes ready:
    it ends closed, with an AuthenticationError both recorded and on its ready Deferred."""
    other = ServerFactory(USER, "some-other-secret", heartbeat=0)
    client = controller()
    server, pump = connect(other, client, protos)
    assert client.state == "closed"
    assert isinstance(client.auth_error, AuthenticationError)
    assert outcome(client.ready).check(AuthenticationError)


def test_postauth_code_before_auth_closes(factory, protos):
    """A post-auth message sent as the first frame closes the connection unanswered."""
    proto, transport, _ = raw_server(factory, protos)
    proto.dataReceived(b"".join(wire.encode_message(wire.STATUS, (1,))))
    assert proto.state == "closed"
    assert transport.disconnecting
    assert transport.value() == b""
    assert factory.scheduler.controllers == {}
    lose(proto)
    assert proto._timer is None


def test_oversized_preauth_frame_closes_at_once(factory, protos):
    """A pre-auth header announcing a huge body closes the connection before the body."""
    proto, transport, _ = raw_server(factory, protos)
    proto.dataReceived(wire.HEADER.pack(wire.AUTH, 50 * 1024 * 1024))
    assert proto.state == "closed" and transport.disconnecting
    assert proto.decoder.buffered == 0
    lose(proto)


def test_data_after_close_is_ignored(factory, protos):
    """Once a connection failed, further bytes are not processed at all."""
    proto, transport, _ = raw_server(factory, protos)
    proto.dataReceived(b"\xff" * 5)
    assert proto.state == "closed"
    proto.dataReceived(b"anything")  # no exception, no output
    assert transport.value() == b""
    lose(proto)


def test_handshake_timeout_closes_silent_peer(protos):
    """A peer that never answers HELLO is dropped exactly when the handshake deadline passes
    (on a test clock: still open 1 ms before, closed 1 ms after)."""
    clock = Clock()
    factory = ServerFactory(USER, SECRET, prefetch=1, heartbeat=0, clock=clock)
    proto, transport, _ = raw_server(factory, protos)
    clock.advance(proto.handshake_timeout - 0.001)
    assert proto.state == "handshake" and not transport.disconnecting
    clock.advance(0.002)
    assert proto.state == "closed" and transport.disconnecting
    lose(proto)


def test_refused_peer_that_never_closes_is_aborted_after_the_linger(protos):
    """A peer refused with AUTH_FAIL gets a graceful close first and, if it never completes it
    (a TLS peer that withholds close_notify), is aborted REFUSED_LINGER seconds later, long
    before the handshake deadline (on a test clock: not aborted 1 ms before, aborted 1 ms after)."""
    clock = Clock()
    factory = ServerFactory(USER, SECRET, prefetch=1, heartbeat=0, clock=clock)
    proto, transport, hello = raw_server(factory, protos)
    [auth] = PeerHandshake("controller", USER, derive_key(USER, "wrong-" + SECRET)).receive(*hello)
    proto.dataReceived(auth)
    assert proto.state == "closed" and transport.disconnecting and not transport.disconnected
    assert [c for c, _ in wire.FrameDecoder().frames(transport.value())] == [wire.AUTH_FAIL]
    assert REFUSED_LINGER < proto.handshake_timeout
    clock.advance(REFUSED_LINGER - 0.001)
    assert not transport.disconnected
    clock.advance(0.002)
    assert transport.disconnected  # StringTransport marks abortConnection so
    lose(proto)


def test_authenticated_peer_is_not_timed_out(protos):
    """Once authenticated, the handshake deadline no longer applies."""
    clock = Clock()
    factory = ServerFactory(USER, SECRET, prefetch=1, heartbeat=0, clock=clock)
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, KEY)
    [auth] = peer.receive(*hello)
    proto.dataReceived(auth)
    clock.advance(10 * proto.handshake_timeout)
    assert proto.state == "ready" and not transport.disconnecting
    lose(proto)


def test_silent_peer_is_dropped_after_heartbeat(protos):
    """An authenticated peer that sends nothing for longer than the heartbeat is aborted;
    one that keeps talking is not (test clock, heartbeat 1 s)."""
    clock = Clock()
    factory = ServerFactory(USER, SECRET, prefetch=1, heartbeat=1.0, clock=clock)
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, KEY)
    [auth] = peer.receive(*hello)
    proto.dataReceived(auth)
    peer.receive(*wire.FrameDecoder().frames(transport.value())[0])
    transport.clear()
    sealer = FrameSealer(peer.session_keys()[0])
    for _ in range(8):  # 2 s of pings every 0.25 s: alive
        clock.advance(0.25)
        proto.dataReceived(sealed(sealer, wire.PING, 1))
    assert proto.state == "ready"
    pings = [c for c, _ in frames_of(transport.value())].count(wire.PING)
    assert pings >= 4  # the server pings 4 times per heartbeat period
    for _ in range(4):  # 1 s of silence: not yet more than the heartbeat
        clock.advance(0.25)
    assert proto.state == "ready"
    clock.advance(0.3)
    assert proto.state == "closed" and transport.disconnected
    lose(proto)


def test_a_stalled_server_does_not_drop_its_peers(protos):
    """When the server itself did not run for longer than the heartbeat (stopped, starved: on
    the test clock, one jump of 5 s), its overdue tick does not judge the peer by that gap:
    the peer, whose messages were waiting unread, has a full heartbeat from then on; a peer
    that stays silent after it is dropped (heartbeat 1 s)."""
    clock = Clock()
    factory = ServerFactory(USER, SECRET, prefetch=1, heartbeat=1.0, clock=clock)
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, KEY)
    [auth] = peer.receive(*hello)
    proto.dataReceived(auth)
    peer.receive(*wire.FrameDecoder().frames(transport.value())[0])
    sealer = FrameSealer(peer.session_keys()[0])
    clock.advance(0.25)
    clock.advance(5.0)  # the stall: the overdue tick runs before the waiting PING is read
    assert proto.state == "ready"
    proto.dataReceived(sealed(sealer, wire.PING, 1))
    for _ in range(4):
        clock.advance(0.25)
    assert proto.state == "ready"
    clock.advance(0.5)  # 1.25 s without a word since the PING: dropped
    assert proto.state == "closed" and transport.disconnected
    lose(proto)


def test_pipelined_auth_and_status(factory, protos):
    """An AUTH and a STATUS in the same TCP segment both get handled: the frame limit is
    lifted between them, and the STATUS gets its reply."""
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, KEY)
    [auth] = peer.receive(*hello)
    # the peer may pipeline before it has AUTH_OK: its keys depend only on its own inputs
    peer_keys = _keys_before_auth_ok(peer, hello)
    proto.dataReceived(auth + sealed(FrameSealer(peer_keys[0]), wire.STATUS, 3))
    decoder = wire.FrameDecoder()
    decoder.feed(transport.value())
    code, body = decoder.next_frame()
    assert code == wire.AUTH_OK
    assert peer.receive(code, body) == [] and peer.state == "done"
    assert peer.session_keys() == peer_keys
    decoder.set_limit(wire.DEFAULT_MAX_FRAME, wire.POSTAUTH_CODES, FrameOpener(peer_keys[1]))
    [(code, body)] = decoder.frames(b"")
    assert code == wire.STATUS_REPLY
    assert wire.decode_message(body, code) == (3, {"nodes": [], "jobs": []})
    lose(proto)


def _authed_controller(factory, protos):
    """A server protocol with a controller authenticated by hand; returns (proto, transport,
    the controller's sealer, a decoder that opens the server's frames)."""
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, KEY)
    [auth] = peer.receive(*hello)
    keys = _keys_before_auth_ok(peer, hello)
    proto.dataReceived(auth)
    decoder = wire.FrameDecoder()
    decoder.feed(transport.value())
    assert decoder.next_frame()[0] == wire.AUTH_OK
    decoder.set_limit(wire.DEFAULT_MAX_FRAME, wire.POSTAUTH_CODES, FrameOpener(keys[1]))
    transport.clear()
    return proto, transport, FrameSealer(keys[0]), decoder


def test_batch_messages_are_each_handled_in_order(factory, protos):
    """A BATCH frame from a controller (one session tag over several messages) is handled
    message by message, in order: a STATUS and a PING get their STATUS_REPLY and PONG."""
    proto, transport, sealer, decoder = _authed_controller(factory, protos)
    batch = wire.encode_batch([wire.encode_message(wire.STATUS, (3,)),
                               wire.encode_message(wire.PING, (9,))])
    proto.dataReceived(b"".join(sealer.seal(batch)))
    replies = [(c, wire.decode_message(b, c)) for c, b in decoder.frames(transport.value())]
    assert replies == [(wire.STATUS_REPLY, (3, {"nodes": [], "jobs": []})), (wire.PONG, (9,))]
    assert proto.state == "ready"
    lose(proto)


@pytest.mark.parametrize("inner", ["node-message", "nested"])
def test_batch_cannot_smuggle_a_message(factory, protos, inner):
    """Inside a BATCH the same rules hold as outside: a message the peer's role may not send
    (a controller's NODE_READY) or a nested BATCH closes the connection, and nothing after it
    in the BATCH is handled."""
    proto, transport, sealer, decoder = _authed_controller(factory, protos)
    bad = (wire.encode_message(wire.NODE_READY, ("n", 1, "h", 1, {})) if inner == "node-message"
           else wire.encode_batch([wire.encode_message(wire.PING, (1,))]))
    batch = wire.encode_batch([bad, wire.encode_message(wire.STATUS, (3,))])
    proto.dataReceived(b"".join(sealer.seal(batch)))
    assert proto.state == "closed" and transport.disconnecting
    assert decoder.frames(transport.value()) == []
    assert factory.scheduler.nodes == {}
    lose(proto)


def _keys_before_auth_ok(peer, hello):
    from achilles.core.handshake import session_keys

    server_nonce = json.loads(hello[1])["nonce"]
    to_peer, to_server = session_keys(KEY, server_nonce, peer.nonce,
                                      "controller", USER)
    return to_server, to_peer


@pytest.mark.parametrize("message", [(wire.NODE_READY, ("n", 1, "h", 1, {})), (wire.STATUS, ()),
                                     (wire.STATUS, (1, 2, 3)), (wire.STATUS, ("one",))])
def test_bad_postauth_message_closes(factory, protos, message):
    """After auth, a message not valid for the peer's role or with the wrong fields closes
    the connection (sent raw: encode_message itself refuses to build such messages)."""
    client = controller()
    server, pump = connect(factory, client, protos)
    code, fields = message
    body = pickle.dumps(fields)
    client.send_encoded([wire.HEADER.pack(code, len(body)), body])
    pump.flush()
    assert server.state == "closed" and client.state == "closed"
    assert frames_of(server.transport.written)[-1][0] == wire.AUTH_OK
    assert factory.scheduler.controllers == {}


# --- pickles before authentication ------------------------------------------------------------

def marker_body(path):
    body = pickle.dumps((MarkerPickle(str(path)),), protocol=wire.PICKLE_PROTOCOL)
    assert len(body) <= wire.PREAUTH_MAX_FRAME
    return body


def test_marker_pickle_is_live(tmp_path):
    """Control: unpickling the test payload does create the marker file."""
    control = tmp_path / "control"
    pickle.loads(marker_body(control))
    assert control.exists()


@pytest.mark.parametrize("code", [wire.SUBMIT, wire.CHUNK, wire.NODE_READY, wire.RESULT,
                                  wire.STATUS, wire.AUTH, wire.HELLO, wire.AUTH_OK])
def test_preauth_pickle_to_server_is_never_unpickled(factory, protos, tmp_path, code):
    """A pickle sent as the first frame, under a post-auth or a pre-auth code, is never
    unpickled by the server: the marker file does not appear and the connection closes."""
    marker = tmp_path / "pwned"
    proto, transport, _ = raw_server(factory, protos)
    proto.dataReceived(wire.frame(code, marker_body(marker)))
    assert not marker.exists()
    assert proto.state == "closed" and transport.disconnecting
    assert wire.AUTH_OK not in [c for c, _ in frames_of(transport.value())]
    assert factory.scheduler.controllers == {} and factory.scheduler.nodes == {}
    lose(proto)
    assert not marker.exists()


def test_pickle_behind_failed_auth_is_never_unpickled(factory, protos, tmp_path):
    """A pickled message pipelined behind an AUTH with a wrong secret is never unpickled."""
    marker = tmp_path / "pwned"
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, key_for(USER, "wrong-" + SECRET))
    [auth] = peer.receive(*hello)
    proto.dataReceived(auth + wire.frame(wire.SUBMIT, marker_body(marker)))
    assert not marker.exists()
    assert [c for c, _ in frames_of(transport.value())] == [wire.AUTH_FAIL]
    assert proto.state == "closed" and transport.disconnecting
    lose(proto)


def test_pickle_after_auth_reaches_unpickling(factory, protos, tmp_path):
    """Control: the very same frame after a successful handshake, tagged with the session
    key, is decoded (so the tests above would notice if pre-auth frames were unpickled)."""
    marker = tmp_path / "decoded"
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, KEY)
    [auth] = peer.receive(*hello)
    sealer = FrameSealer(_keys_before_auth_ok(peer, hello)[0])
    body = marker_body(marker)
    proto.dataReceived(auth + b"".join(sealer.seal([wire.HEADER.pack(wire.SUBMIT, len(body)),
                                                    body])))
    assert marker.exists()
    assert proto.state == "closed"  # SUBMIT with one field is malformed
    lose(proto)


@pytest.mark.parametrize("tag", [None, b"\0" * TAG_SIZE, "other-connection"])
def test_untagged_frame_after_auth_is_never_unpickled(factory, protos, tmp_path, tag):
    """After a genuine handshake, a frame with no tag, a zero tag, or a tag from another
    connection's keys is refused before anything is unpickled (what a man in the middle who
    relayed the handshake would send)."""
    marker = tmp_path / "pwned"
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, KEY)
    [auth] = peer.receive(*hello)
    body = marker_body(marker)
    frame = wire.frame(wire.SUBMIT, body)
    if tag is not None:
        if tag == "other-connection":
            other = PeerHandshake("controller", USER, KEY)
            other.receive(wire.HELLO, hello[1])
            key = _keys_before_auth_ok(other, hello)[0]
            frame = b"".join(FrameSealer(key).seal([frame[:5], body]))
        else:
            frame = wire.HEADER.pack(wire.SUBMIT, len(body) + TAG_SIZE) + body + tag
    proto.dataReceived(auth + frame)
    assert not marker.exists()
    assert proto.state == "closed" and transport.disconnecting
    assert factory.scheduler.jobs == {}
    lose(proto)


@pytest.mark.parametrize("code", [wire.HELLO, wire.AUTH_OK, wire.RESULT, wire.WANT])
def test_preauth_pickle_to_controller_is_never_unpickled(protos, tmp_path, code):
    """A fake server sending a pickle before authenticating cannot make the controller
    unpickle it; the controller closes and its ready Deferred fails."""
    marker = tmp_path / "pwned"
    client = controller()
    protos.append(client)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(wire.frame(code, marker_body(marker)))
    assert not marker.exists()
    assert client.state == "closed" and transport.disconnecting
    lose(client)
    assert outcome(client.ready).check(AuthenticationError, ConnectionFailed)
    assert not os.path.exists(marker)


def test_pickle_after_hello_before_auth_ok_is_never_unpickled(protos, tmp_path):
    """Even after a genuine-looking HELLO, a controller does not unpickle anything until
    the server has proven the secret with AUTH_OK."""
    marker = tmp_path / "pwned"
    client = controller()
    protos.append(client)
    transport = StringTransport()
    client.makeConnection(transport)
    hello = wire.encode_json(wire.HELLO, {"achilles": 1, "proto": wire.PROTOCOL_VERSION,
                                          "nonce": "ab" * 32})
    client.dataReceived(hello + wire.frame(wire.RESULT, marker_body(marker)))
    assert not marker.exists()
    assert client.state == "closed"
    assert [c for c, _ in frames_of(transport.value())] == [wire.AUTH]
    lose(client)
    assert outcome(client.ready).check(AuthenticationError, ConnectionFailed)


# --- hostile handshake field values -----------------------------------------------------------

def test_non_ascii_proof_gets_clean_refusal(factory, protos):
    """An AUTH whose proof has non-ASCII characters is refused like any wrong proof: no
    exception escapes dataReceived, and the connection is closed."""
    proto, transport, hello = raw_server(factory, protos)
    peer = PeerHandshake("controller", USER, KEY)
    [auth] = peer.receive(*hello)
    obj = json.loads(wire.FrameDecoder().frames(auth)[0][1])
    obj["proof"] = "\u00e9" * 4  # JSON-escaped, so keep the frame under the pre-auth cap
    try:
        proto.dataReceived(wire.encode_json(wire.AUTH, obj))
        assert proto.state == "closed" and transport.disconnecting
        assert factory.scheduler.controllers == {}
    finally:
        lose(proto)


def test_controller_survives_non_ascii_server_proof(protos):
    """A fake server answering AUTH with a non-ASCII proof is treated as failing to prove
    the secret: no exception escapes dataReceived and the controller records an
    AuthenticationError."""
    client = controller()
    protos.append(client)
    transport = StringTransport()
    client.makeConnection(transport)
    hello = wire.encode_json(wire.HELLO, {"achilles": 1, "proto": wire.PROTOCOL_VERSION,
                                          "nonce": "ab" * 32})
    try:
        client.dataReceived(hello)
        assert client.handshake.state == "sent_auth"
        client.dataReceived(wire.encode_json(wire.AUTH_OK, {"proof": "\u00e9" * 64}))
        assert client.state == "closed" and transport.disconnecting
        assert isinstance(client.auth_error, AuthenticationError)
    finally:
        lose(client)
        outcome(client.ready)
