"""The handshake key: scrypt of the secret salted with the user name, derived once per process,
and secrets too short to resist offline guessing refused with a clear ConfigError."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from achilles.core import wire
from achilles.core.config import MIN_SECRET_LENGTH, Config, gen_config
from achilles.controller.cluster import Cluster
from achilles.core.errors import ConfigError
from achilles.core.handshake import PeerHandshake, ServerHandshake, derive_key
from achilles.server.service import ServerFactory
from conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(120)

USER = "tester"
SECRET = "keys-test-secret-0123456789abcdef"
SHORT = "x" * (MIN_SECRET_LENGTH - 1)


@pytest.fixture
def scrypt_calls(monkeypatch):
    """Counts hashlib.scrypt calls made in this process from now on (the real scrypt runs)."""
    calls = []
    real = hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(kwargs.get("salt"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


def run(args, cwd, env):
    return subprocess.run(args, cwd=str(cwd), capture_output=True, text=True, timeout=90,
                          env=env, stdin=subprocess.DEVNULL)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_key_is_scrypt_salted_with_the_user_name():
    """derive_key is scrypt (n=2**14, r=8, p=1) of the secret, salted with a fixed label and
    the user name: memory-hard, unlike the single SHA-256 it replaces."""
    expected = hashlib.scrypt(SECRET.encode(), salt=b"achilles-v2 scrypt\0" + USER.encode(),
                              n=2 ** 14, r=8, p=1, dklen=32)
    assert derive_key(USER, SECRET) == expected
    assert derive_key(USER, SECRET) != hashlib.sha256(SECRET.encode()).digest()


def test_short_secret_is_refused_in_the_library(tmp_path):
    """A secret shorter than 16 characters raises ConfigError naming `achilles config` from
    derive_key, Cluster (before connecting) and gen_config (which writes nothing); 16 are enough."""
    with pytest.raises(ConfigError, match="achilles config") as info:
        derive_key(USER, SHORT)
    assert SHORT not in str(info.value) and str(MIN_SECRET_LENGTH) in str(info.value)
    with pytest.raises(ConfigError, match="too short.*achilles config"):
        Cluster(Config(host="127.0.0.1", port=free_port(), username=USER, secret_key=SHORT))
    with pytest.raises(ConfigError, match="too short"):
        gen_config(str(tmp_path / ".env"), secret_key=SHORT)
    assert not os.path.lexists(tmp_path / ".env")
    assert len(derive_key(USER, "y" * MIN_SECRET_LENGTH)) == 32


@pytest.mark.parametrize("role", ["achilles.server", "achilles.node"])
def test_short_secret_is_refused_by_the_daemons(tmp_path, role):
    """A server or node given a 15-character secret exits 2 with one line saying how to
    generate a secret, without echoing the secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    env.update(PYTHONPATH=ROOT, ACHILLES_SECRET_KEY=SHORT, ACHILLES_PORT=str(free_port()))
    out = run([sys.executable, "-m", role], tmp_path, env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "too short" in out.stderr and "achilles config" in out.stderr
    assert SHORT not in out.stderr + out.stdout


def test_daemons_accept_a_sixteen_character_secret(daemons):
    """A secret of exactly 16 characters is accepted: server and node start and authenticate."""
    secret = "0123456789abcdef"
    port = daemons.server(secret)
    daemons.start("node", "--host", "127.0.0.1", "--port", str(port), "--processes", "1",
                  secret=secret)
    with Cluster(Config(host="127.0.0.1", port=port, username="tester", secret_key=secret)) as c:
        wait_for(lambda: len(c.status()["nodes"]) == 1, what="the node to join")
        assert c.map(abs, [-4]) == [4]


def test_handshakes_take_the_derived_key_not_the_secret():
    """Passing the secret string where the derived key belongs is a TypeError, not a silent
    per-connection derivation."""
    with pytest.raises(TypeError, match="derive_key"):
        ServerHandshake(USER, SECRET)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="derive_key"):
        PeerHandshake("node", USER, SECRET)  # type: ignore[arg-type]


def test_server_derives_the_key_once_for_many_handshakes(scrypt_calls):
    """The server factory derives the key when built; each of several connections then
    authenticates a controller without running scrypt again."""
    factory = ServerFactory(USER, SECRET, heartbeat=0)
    assert len(scrypt_calls) == 1
    peer_key = derive_key(USER, SECRET)
    assert len(scrypt_calls) == 2
    for i in range(5):
        proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 40000 + i))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000 + i))
        proto.makeConnection(transport)
        [hello] = wire.FrameDecoder().frames(transport.value())
        transport.clear()
        peer = PeerHandshake("controller", USER, peer_key)
        [auth] = peer.receive(*hello)
        proto.dataReceived(auth)
        [ok] = wire.FrameDecoder().frames(transport.value())
        assert ok[0] == wire.AUTH_OK and proto.state == "ready"
        proto.transport.loseConnection()
        proto.connectionLost()
    assert len(scrypt_calls) == 2


def test_cluster_derives_the_key_once_across_reconnects(make_cluster, scrypt_calls):
    """A controller derives the key once when the Cluster is built; reconnecting after the
    connection closed reuses it."""
    lc = make_cluster(nodes=0)
    scrypt_calls.clear()
    cfg = Config(host="127.0.0.1", port=lc.port, username="local", secret_key=lc._secret)
    with Cluster(cfg) as c:
        first = c._proto
        assert c.status()["nodes"] == []
        c.close()
        assert c.status()["nodes"] == []
        assert c._proto is not first and c._proto is not None
    assert scrypt_calls == [b"achilles-v2 scrypt\0local"]
