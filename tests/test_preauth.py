"""Pre-auth connections against a live server over real sockets: idle floods beyond the caps
(plain TCP and TLS), the handshake deadline over TLS, and the server's start-up warnings."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import List

import pytest

from achilles.core import wire
from achilles.core.config import Config
from achilles.controller.cluster import Cluster
from achilles.core.handshake import PeerHandshake, derive_key
from achilles.core.tls import generate_certs
from conftest import wait_for
from tasks import square

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

#: Hang guard for waits on the server; not a timing assertion.
PATIENCE = 30.0


def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the server on 127.0.0.1 from the loopback address ``source``
    (127.0.0.2 and so on are other sources to the server, 127.0.0.1 is the legitimate one)."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (reads and discards whatever it sent)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def closed_within(sock: socket.socket, timeout: float = PATIENCE) -> bool:
    """Whether the server closes ``sock`` at the TCP level within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
    return False


def count_closed(socks: List[socket.socket], closed: set) -> int:
    """Add the newly closed sockets of ``socks`` to ``closed``; return how many are closed."""
    for s in socks:
        if s not in closed and closed_now(s):
            closed.add(s)
    return sum(1 for s in socks if s in closed)


class RawTLS:
    """A TLS client over a plain socket through memory BIOs, so that TCP-level closes stay
    visible and nothing is sent unless the test says so (no close_notify, ever)."""

    def __init__(self, sock: socket.socket, ca: str) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = ssl.create_default_context(cafile=ca)
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        sock.settimeout(PATIENCE)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._pull()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _pull(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError("the server closed the connection during the TLS handshake")
        self.incoming.write(data)

    def read_frame(self) -> tuple:
        """One frame of the Achilles protocol, decrypted."""
        buf = b""
        while True:
            frames = wire.FrameDecoder().frames(buf) if len(buf) >= 5 else []
            if frames:
                return frames[0]
            try:
                buf += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._pull()

    def write(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()


def start_server(daemons, secret: str, *extra: str) -> tuple:
    """An ``achilles-server`` daemon on 127.0.0.1 with an OS-picked port: (process, port)."""
    port_file = daemons.tmp_path / f"port-{len(daemons.procs)}"
    proc = daemons.start("server", "--port", "0", "--port-file", str(port_file), *extra,
                         secret=secret)
    wait_for(lambda: port_file.exists() or proc.poll() is not None, what="server port")
    assert proc.poll() is None, daemons.log(proc)
    return proc, int(port_file.read_text())


@pytest.mark.parametrize("how", ["plain-silent", "tls-no-handshake", "tls-idle-after-handshake",
                                 "tls-refused-no-close-notify"])
def test_idle_preauth_socket_is_closed_after_the_deadline(daemons, secret, tmp_path,
                                                          monkeypatch, how):
    """A connection that stays idle before auth is really closed by the server (TCP FIN or
    RST) after the handshake deadline (ACHILLES_HANDSHAKE_TIMEOUT), over plain TCP and over TLS;
    one that is refused and never answers the TLS close_notify is closed a moment after its
    AUTH_FAIL (REFUSED_LINGER), however long the deadline."""
    refused = how == "tls-refused-no-close-notify"
    # 3 s leaves a loaded machine time for the TLS handshake before the deadline cuts it.
    monkeypatch.setenv("ACHILLES_HANDSHAKE_TIMEOUT", "600" if refused else "3")
    args = ["--host", "127.0.0.1"]
    certs = {}
    if how.startswith("tls"):
        certs = generate_certs(str(tmp_path / "certs"))
        args += ["--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"]]
    server, port = start_server(daemons, secret, *args)
    with socket.create_connection(("127.0.0.1", port)) as s:
        if how == "tls-idle-after-handshake":
            RawTLS(s, certs["ca.pem"])
        elif how == "tls-refused-no-close-notify":
            tls = RawTLS(s, certs["ca.pem"])
            hello = tls.read_frame()
            [auth] = PeerHandshake("controller", "tester", derive_key("tester", "not-the-secret-0123456789")).receive(*hello)
            tls.write(auth)
            assert tls.read_frame()[0] == wire.AUTH_FAIL
        assert closed_within(s), f"the server kept the {how} connection open"
    log = daemons.log(server)
    if refused:
        assert "refused 127.0.0.1" in log
    else:
        assert "handshake not finished within 3 s" in log


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_idle_flood_over_the_cap_does_not_lock_out_nodes_and_controllers(make_cluster, monkeypatch,
                                                                         tls):
    """One source holding more idle pre-auth sockets than ACHILLES_MAX_PREAUTH_PER_SOURCE
    (default 32) gets the excess refused at connect (logged, naming the setting) while it keeps
    its share; a new node and a new controller from another address still get in and work."""
    monkeypatch.setenv("ACHILLES_HANDSHAKE_TIMEOUT", "100")  # the flood outlives the test body
    lc = make_cluster(nodes=1, processes=1, tls=tls, log_level="INFO")
    flood = [connect_from("127.0.0.2", lc.port) for _ in range(45)]
    try:
        closed: set = set()
        wait_for(lambda: count_closed(flood, closed) >= 13, timeout=PATIENCE,
                 what="the server to refuse the sockets over the cap")
        assert "refusing a connection from 127.0.0.2" in lc.log_text("server")
        assert "ACHILLES_MAX_PREAUTH_PER_SOURCE=32" in lc.log_text("server")

        lc.add_node(name="late")
        lc.wait_for_nodes(2)
        cfg = Config(host="127.0.0.1", port=lc.port, username="local",
                     secret_key=lc.cluster.config.secret_key, tls_ca=lc.tls.get("tls_ca"))
        with Cluster(cfg) as c:
            assert c.map(square, range(20), chunksize=1) == [x * x for x in range(20)]
            assert sorted(n["name"] for n in c.status()["nodes"]) == ["late", "local-0"]
        assert count_closed(flood, closed) == 13, "the server dropped sockets within the cap"
    finally:
        for s in flood:
            s.close()


def test_total_preauth_cap_refuses_beyond_it_and_frees_slots_on_close(make_cluster, monkeypatch):
    """With ACHILLES_MAX_PREAUTH=12, idle sockets from several sources are held up to 12 in
    all; the rest are refused (logged, naming the setting). Once the idle sockets close, their
    slots are free again and a controller gets in."""
    monkeypatch.setenv("ACHILLES_HANDSHAKE_TIMEOUT", "100")
    monkeypatch.setenv("ACHILLES_MAX_PREAUTH", "12")
    monkeypatch.setenv("ACHILLES_MAX_PREAUTH_PER_SOURCE", "8")
    lc = make_cluster(nodes=1, processes=1, log_level="INFO")
    first = [connect_from("127.0.0.2", lc.port) for _ in range(8)]
    second: List[socket.socket] = []
    try:
        for s in first:  # each gets its HELLO: all 8 are held
            s.settimeout(PATIENCE)
            assert s.recv(5)[0] == wire.HELLO
        second += [connect_from("127.0.0.3", lc.port) for _ in range(8)]
        closed: set = set()
        wait_for(lambda: count_closed(second, closed) >= 4, timeout=PATIENCE,
                 what="the server to refuse the sockets over the total cap")
        assert "ACHILLES_MAX_PREAUTH=12" in lc.log_text("server")
        assert count_closed(first, set()) == 0
    finally:
        for s in first + second:
            s.close()

    def admitted() -> bool:
        # The server handles the 16 closes asynchronously: wait until a new socket gets HELLO.
        with connect_from("127.0.0.4", lc.port) as probe:
            probe.settimeout(PATIENCE)
            try:
                return probe.recv(5)[:1] == bytes([wire.HELLO])
            except ConnectionResetError:
                return False

    wait_for(admitted, timeout=PATIENCE, what="the closed sockets' slots to be freed")
    cfg = Config(host="127.0.0.1", port=lc.port, username="local",
                 secret_key=lc.cluster.config.secret_key)
    with Cluster(cfg) as c:
        assert c.map(square, [3]) == [9]


def test_a_controller_over_the_per_source_cap_waits_for_a_free_slot(make_cluster, monkeypatch):
    """A controller whose source is at ACHILLES_MAX_PREAUTH_PER_SOURCE (a burst of controllers
    on one host) is refused by the server, retries, and gets in once a slot is free, instead of
    failing at once as it does for a server that is not there."""
    monkeypatch.setenv("ACHILLES_HANDSHAKE_TIMEOUT", "100")
    monkeypatch.setenv("ACHILLES_MAX_PREAUTH_PER_SOURCE", "4")
    lc = make_cluster(nodes=1, processes=1, log_level="INFO")
    held = [connect_from("127.0.0.1", lc.port) for _ in range(4)]
    outcome: list = []
    try:
        for s in held:  # each gets its HELLO: all 4 slots of 127.0.0.1 are taken
            s.settimeout(PATIENCE)
            assert s.recv(5)[0] == wire.HELLO
        cfg = Config(host="127.0.0.1", port=lc.port, username="local",
                     secret_key=lc.cluster.config.secret_key)

        def run() -> None:
            try:
                with Cluster(cfg, timeout=PATIENCE) as c:
                    outcome.append(c.map(square, [3]))
            except Exception as exc:  # reported below
                outcome.append(exc)

        caller = threading.Thread(target=run)
        caller.start()
        wait_for(lambda: "refusing a connection from 127.0.0.1" in lc.log_text("server"),
                 timeout=PATIENCE, what="the server to refuse the controller over the cap")
        assert outcome == [], f"the controller gave up at once: {outcome}"
    finally:
        for s in held:
            s.close()
    caller.join(PATIENCE)
    assert outcome == [[9]]


def test_plain_tcp_on_a_public_address_warns_loudly(daemons, secret, tmp_path):
    """A server listening on 0.0.0.0 without TLS logs that traffic is readable by anyone on the
    path and to use TLS; on loopback, or with TLS, it does not. It logs its open file limit."""
    public, _ = start_server(daemons, secret, "--host", "0.0.0.0")
    loopback, _ = start_server(daemons, secret, "--host", "127.0.0.1")
    certs = generate_certs(str(tmp_path / "certs"))
    with_tls, _ = start_server(daemons, secret, "--host", "0.0.0.0", "--tls-cert",
                               certs["server.pem"], "--tls-key", certs["server.key"])
    warning = "readable by anyone on the path; use TLS"
    assert warning in daemons.log(public)
    assert "WARNING" in [line for line in daemons.log(public).splitlines() if warning in line][0]
    assert warning not in daemons.log(loopback)
    assert warning not in daemons.log(with_tls)
    assert "open file limit: " in daemons.log(loopback)

