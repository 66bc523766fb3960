"""Hostile input against a live server: floods, slowloris, random bytes, a cut network link."""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import uuid

import pytest

from achilles.core import wire
from achilles.core.config import Config
from achilles.controller.cluster import Cluster
from achilles.server.guard import FREE_FAILURES, MAX_DELAY, HandshakeGuard
from conftest import Reader, busy_on, wait_for
from tasks import sleepy, square

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def test_guard_delays_only_repeat_offenders():
    """The guard lets an address fail FREE_FAILURES times freely, then delays it more with
    each failure (capped), forgets after the window, and leaves other addresses alone."""
    g = HandshakeGuard()
    for _ in range(FREE_FAILURES - 1):
        g.record_failure("10.0.0.1", 100.0)
    assert g.delay("10.0.0.1", 100.0) == 0.0
    g.record_failure("10.0.0.1", 100.0)
    first = g.delay("10.0.0.1", 100.0)
    g.record_failure("10.0.0.1", 100.0)
    assert 0 < first < g.delay("10.0.0.1", 100.0) <= MAX_DELAY
    for _ in range(50):
        g.record_failure("10.0.0.1", 100.0)
    assert g.delay("10.0.0.1", 100.0) == MAX_DELAY
    assert g.delay("10.0.0.2", 100.0) == 0.0
    assert g.delay("10.0.0.1", 1000.0) == 0.0


def test_flood_of_bad_handshakes_is_slowed_and_jobs_go_on(make_cluster):
    """Many failed handshakes from one address are slowed down (logged), while a job that is
    already running completes untouched."""
    lc = make_cluster(nodes=1, processes=2, log_level="INFO")
    it = lc.cluster.imap(sleepy, range(200), chunksize=2)
    assert next(it) == 0
    for _ in range(FREE_FAILURES + 3):
        with socket.create_connection(("127.0.0.1", lc.port), timeout=10) as s:
            s.sendall(b"\xff" * 64)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
    wait_for(lambda: "slowing down handshakes from 127.0.0.1" in lc.log_text("server"),
             what="the slow-down to be logged")
    assert list(it) == list(range(1, 200))


def test_slowloris_is_closed(make_cluster, monkeypatch):
    """A connection that never finishes the handshake is closed by the server (aborted, so
    possibly with a reset, after the handshake timeout), and the server keeps serving meanwhile."""
    # A shorter handshake timeout than the default 10 s, still ample for the real handshakes.
    monkeypatch.setenv("ACHILLES_HANDSHAKE_TIMEOUT", "2")
    lc = make_cluster(nodes=1, processes=1)
    s = socket.create_connection(("127.0.0.1", lc.port))
    with s:
        s.settimeout(30)
        header = s.recv(5)
        assert header[0] == wire.HELLO
        s.sendall(struct.pack("!BI", wire.AUTH, 100))  # announce a body, never send it
        assert lc.cluster.map(square, [7]) == [49]
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass


def test_random_bytes_do_not_disturb_the_server(make_cluster):
    """Hundreds of connections sending random and mutated bytes never break the server: it
    keeps serving jobs afterwards. (The flood guard delays HELLO for this address after a few
    failures, so the bytes are sent without waiting for it.)"""
    lc = make_cluster(nodes=1, processes=1)
    rng = random.Random(1234)
    valid = wire.encode_json(wire.AUTH, {"proto": 1, "role": "node", "user": "x",
                                         "nonce": "ab" * 32, "proof": "cd" * 32})
    for i in range(200):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 600)))
        else:
            data = bytearray(valid)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data)
        try:
            with socket.create_connection(("127.0.0.1", lc.port), timeout=5) as s:
                s.sendall(data)
        except OSError:
            pass
    assert lc.cluster.map(square, range(10)) == [x * x for x in range(10)]


def _have_netns() -> str:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"achprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"ip netns does not work here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True)


@pytest.fixture
def netns_host():
    """A 'host' in its own network namespace, joined to this one by a veth pair:
    yields (namespace, host-side interface, our address, its address)."""
    reason = _have_netns()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"ach{tag}", f"va{tag}", f"vb{tag}"
    subnet = random.randint(1, 250)
    ours, theirs = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        sh("ip", "link", "set", there, "netns", ns)
        sh("ip", "addr", "add", f"{ours}/30", "dev", here)
        sh("ip", "link", "set", here, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{theirs}/30", "dev", there)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, here, ours, theirs
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_cut_link_is_detected(daemons, secret, netns_host):
    """A node on another 'host' (network namespace) whose link is cut is detected by
    heartbeats; its work is re-queued and the job completes with each result once."""
    ns, here, ours, theirs = netns_host
    port_file = daemons.tmp_path / "port"
    server = daemons.start("server", "--host", ours, "--port", "0", "--port-file", str(port_file),
                           "--heartbeat", "1", secret=secret)
    wait_for(lambda: port_file.exists() or server.poll() is not None, what="server port")
    port = int(port_file.read_text())
    daemons.start("node", "--host", ours, "--port", str(port), "--processes", "1",
                           "--name", "remote", "--heartbeat", "1", secret=secret,
                           netns=ns)
    daemons.start("node", "--host", ours, "--port", str(port), "--processes", "1",
                          "--name", "local", "--heartbeat", "1", secret=secret)
    c = Cluster(Config(host=ours, port=port, username="tester", secret_key=secret, heartbeat=1))
    try:
        wait_for(lambda: len(c.status()["nodes"]) == 2, what="both nodes")
        reader = Reader(c.imap_unordered(sleepy, range(300), chunksize=2))
        wait_for(lambda: len(reader.got) >= 30, what="the first 30 results")
        wait_for(lambda: busy_on(c, "remote") > 0, what="chunks on the remote node")
        sh("ip", "link", "set", here, "down")
        assert sorted(reader.result()) == list(range(300))
        assert [n["name"] for n in c.status()["nodes"]] == ["local"]
        assert "no heartbeat from" in daemons.log(server)
    finally:
        c.close()
