"""Authentication with real daemons and raw sockets: wrong secrets, fake servers, pre-auth pickles."""

from __future__ import annotations

import json
import pickle
import re
import socket
import struct
import threading

import pytest

from achilles.core import wire
from achilles.core.config import Config
from achilles.controller.cluster import Cluster
from achilles.core.errors import AuthenticationError, ConnectionFailed
from achilles.core.handshake import derive_key
from achilles.core.protocol import HANDSHAKE_TIMEOUT
from conftest import MarkerPickle, read_frame, wait_for

pytestmark = pytest.mark.timeout(60)


#: Seconds to wait for a peer to close a connection: well under the handshake deadline (10 s
#: from the connect), so a close seen in time answers what the test sent, never the deadline.
CLOSE_WAIT = HANDSHAKE_TIMEOUT / 3


def closed_by_peer(sock, timeout=CLOSE_WAIT):
    """Whether the other end closes ``sock`` within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def refused_for(lc, sock) -> str:
    """The reason the server's log gives for refusing or closing ``sock``'s connection
    (never its handshake deadline)."""
    host, port = sock.getsockname()[:2]
    line = re.compile(r"(?:refused|closing connection from) %s: (.*)" % re.escape(f"{host}:{port}"))
    wait_for(lambda: line.search(lc.log_text("server")), 10, what="the server's reason")
    reason = line.search(lc.log_text("server")).group(1)
    assert "handshake not finished" not in reason
    return reason


def test_controller_with_wrong_secret_is_refused(daemons, secret):
    """A controller with the wrong secret gets AuthenticationError saying what to check."""
    port = daemons.server(secret)
    with pytest.raises(AuthenticationError, match="ACHILLES_SECRET_KEY"):
        Cluster(Config(host="127.0.0.1", port=port, username="tester", secret_key="wrong-" + secret))
    with pytest.raises(AuthenticationError):
        Cluster(Config(host="127.0.0.1", port=port, username="someone", secret_key=secret))


def test_node_with_wrong_secret_is_refused(daemons, secret):
    """A node with the wrong secret is refused and never joins; it keeps running and retrying,
    logging an ERROR for each refusal that says which settings to check."""
    port = daemons.server(secret)
    node = daemons.start("node", "--host", "127.0.0.1", "--port", str(port), "--processes", "1",
                         secret="not-the-" + secret)
    wait_for(lambda: daemons.log(node).count(" ERROR handshake with the server") >= 2
             or node.poll() is not None, what="two refusals")
    assert node.poll() is None, daemons.log(node)
    assert "refused this node" in daemons.log(node)
    assert "ACHILLES_SECRET_KEY" in daemons.log(node)
    with Cluster(Config(host="127.0.0.1", port=port, username="tester", secret_key=secret)) as c:
        assert c.status()["nodes"] == []


def test_unreachable_server_says_what_to_fix(secret):
    """Connecting to a port nobody listens on raises ConnectionFailed naming the address."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port}.*ACHILLES_HOST"):
        Cluster(Config(host="127.0.0.1", port=port, secret_key=secret))


def test_node_refuses_fake_server(daemons, secret, tmp_path):
    """A node refuses a server that cannot prove the secret, unpickles nothing from it, and
    keeps running (it will retry) instead of exiting."""
    marker = tmp_path / "pwned"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    seen = {}

    def fake_server():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(wire.encode_json(wire.HELLO, {"achilles": 1, "proto": wire.PROTOCOL_VERSION,
                                                       "nonce": "ab" * 32}))
            seen["auth"] = read_frame(conn)
            conn.sendall(wire.encode_json(wire.AUTH_OK, {"proof": "00" * 32}))
            payload = pickle.dumps((MarkerPickle(str(marker)),))
            try:
                conn.sendall(wire.frame(wire.JOB_CODE, payload) + wire.frame(wire.TASK, payload))
            except (ConnectionResetError, BrokenPipeError):  # the node hung up at AUTH_OK
                seen["closed"] = True
                return
            seen["closed"] = closed_by_peer(conn)

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    try:
        node = daemons.start("node", "--host", "127.0.0.1", "--port", str(port), "--processes",
                             "1", secret=secret)
        t.join(30)
        assert not t.is_alive(), "the node never finished the fake server's exchange"
        wait_for(lambda: "ERROR handshake with the server" in daemons.log(node)
                 or node.poll() is not None, what="the refusal to be logged")
    finally:
        listener.close()
    assert node.poll() is None, daemons.log(node)
    assert seen["auth"][0] == wire.AUTH
    assert seen.get("closed") is True
    assert not marker.exists()
    assert "failed to prove the shared secret" in daemons.log(node)
    assert secret not in daemons.log(node)


@pytest.mark.parametrize("first_code", [wire.AUTH, wire.SUBMIT, wire.RESULT])
def test_preauth_pickle_never_loaded(shared_cluster, tmp_path, first_code):
    """A pickle sent before authentication is never unpickled; the server drops that
    connection at once for it (its log says why) and keeps serving."""
    lc = shared_cluster
    marker = tmp_path / "pwned"
    body = pickle.dumps((MarkerPickle(str(marker)),))
    s = socket.create_connection(("127.0.0.1", lc.port))
    with s:
        code, hello = read_frame(s)
        assert code == wire.HELLO and json.loads(hello)["achilles"] == 1
        s.sendall(wire.frame(first_code, body))
        assert closed_by_peer(s)
        assert re.search("not JSON|unexpected message code", refused_for(lc, s))
    assert not marker.exists()
    assert lc.cluster.map(abs, [-1, -2]) == [1, 2]


def test_replayed_handshake_fails(shared_cluster):
    """An AUTH frame recorded from a good handshake is refused when replayed."""
    lc = shared_cluster
    key = derive_key("local", lc._secret)
    import hmac
    import hashlib

    def auth_for(server_nonce):
        peer_nonce = "cd" * 32
        msg = "|".join(("peer", server_nonce, peer_nonce, "controller", "local")).encode()
        return {"proto": wire.PROTOCOL_VERSION, "role": "controller", "user": "local",
                "nonce": peer_nonce, "proof": hmac.new(key, msg, hashlib.sha256).hexdigest()}

    with socket.create_connection(("127.0.0.1", lc.port)) as s:
        _, hello = read_frame(s)
        recorded = auth_for(json.loads(hello)["nonce"])
        s.sendall(wire.encode_json(wire.AUTH, recorded))
        assert read_frame(s)[0] == wire.AUTH_OK
    with socket.create_connection(("127.0.0.1", lc.port)) as s:
        read_frame(s)
        s.sendall(wire.encode_json(wire.AUTH, recorded))
        code, body = read_frame(s)
        assert code == wire.AUTH_FAIL
        assert closed_by_peer(s)


def test_oversized_preauth_frame_closes(shared_cluster):
    """A pre-auth frame header announcing more than the pre-auth cap closes the connection
    at once, for that reason (the server's log)."""
    lc = shared_cluster
    with socket.create_connection(("127.0.0.1", lc.port)) as s:
        read_frame(s)
        s.sendall(struct.pack("!BI", wire.AUTH, 10_000_000))
        assert closed_by_peer(s)
        assert "exceeds the limit" in refused_for(lc, s)
    assert lc.cluster.map(abs, [-3]) == [3]


def test_secret_not_in_logs_or_repr(make_cluster):
    """The secret appears in no daemon log, status() or repr()."""
    lc = make_cluster(nodes=1, processes=1, log_level="DEBUG")
    lc.cluster.map(abs, range(10))
    secret = lc._secret
    assert secret not in repr(lc.cluster) and secret not in repr(lc.cluster.config)
    assert secret not in json.dumps(lc.cluster.status())
    assert secret not in lc.log_text("server") and secret not in lc.log_text("node-0")
