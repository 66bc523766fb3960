"""A node survives whatever a peer on its server's port sends (forged AUTH_FAIL, malformed HELLO,
a foreign service): it logs an ERROR, keeps retrying, and joins the real server once one
appears. Peer text is logged only through :func:`achilles.core.logs.printable`."""

from __future__ import annotations

import io
import logging
import socket
import subprocess
import sys
import threading
from typing import Callable, List

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from achilles.core import wire
from achilles.core.config import Config
from achilles.controller.cluster import Cluster
from achilles.core.logs import OneRecordPerLineFormatter, printable
from conftest import read_frame, wait_for
from tasks import square

pytestmark = pytest.mark.timeout(120)

FORGED = "\nFORGED line: node stopped\r\n\x1b[2J\u2028FORGED again"
REFUSALS = 3


def test_printable_escapes_control_characters_and_truncates():
    """printable() turns newlines, carriage returns, escape sequences, Unicode line separators
    and bidi overrides into visible escapes, truncates past the limit, and is idempotent."""
    out = printable("a\nb\rc\x1bd\u2028e\u2029f\x85g\u202eh\x00")
    assert out == "a\\nb\\rc\\x1bd\\u2028e\\u2029f\\x85g\\u202eh\\x00"
    assert printable(out) == out
    assert printable("x" * 500) == "x" * 200 + "..."
    assert printable("\n" * 500, limit=10) == "\\n" * 5 + "..."
    assert printable(12) == "12"
    assert printable("héllo wörld ✓") == "héllo wörld ✓"


# No per-example deadline: a stalled CI runner must not turn a pure function's test flaky.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(), st.integers(min_value=0, max_value=300))
def test_printable_output_is_always_one_printable_line(text, limit):
    """Whatever the input, printable() gives a single printable line within limit + 3 chars."""
    out = printable(text, limit)
    assert out.isprintable()
    assert len(out) <= limit + 3
    assert len(out.splitlines()) <= 1


def test_formatter_keeps_one_record_per_line():
    """Should unsanitized text reach a log call, the daemons' formatter indents its extra
    lines and escapes other control characters, so no line can pass for a new record."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneRecordPerLineFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("achilles.test_formatter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("reason: %s", FORGED)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING reason: "
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert "\x1b" not in stream.getvalue()


def hello(**fields) -> bytes:
    """A HELLO frame, valid unless ``fields`` override a field."""
    body = {"achilles": 1, "proto": wire.PROTOCOL_VERSION, "nonce": "ab" * 32}
    body.update(fields)
    return wire.encode_json(wire.HELLO, body)


def forged_auth_fail(conn: socket.socket) -> None:
    """A correct HELLO, then an AUTH_FAIL whose reason tries to forge log lines."""
    conn.sendall(hello())
    code, _ = read_frame(conn)
    assert code == wire.AUTH
    conn.sendall(wire.encode_json(wire.AUTH_FAIL, {"reason": "go away" + FORGED}))


def hello_bad_version(conn: socket.socket) -> None:
    """A HELLO whose protocol version is text that tries to forge log lines."""
    conn.sendall(hello(proto="9" + FORGED[:40]))


def hello_bad_nonce(conn: socket.socket) -> None:
    """A HELLO whose nonce is not hex."""
    conn.sendall(hello(nonce="zz" * 32))


def foreign_service(conn: socket.socket) -> None:
    """Something that is not Achilles at all greets the node."""
    conn.sendall(b"SSH-2.0-OpenSSH_9.6" + FORGED.encode() + b"\r\n")


class FakeServer:
    """A plain socket server on 127.0.0.1 (OS-picked port) that treats every connection with
    ``behave`` and closes it, counting connections."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.behave = behave
        self.listener = socket.socket()
        # Its connections' TIME_WAIT entries must not keep the real server off this port.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.errors: List[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                self.connections += 1
                try:
                    self.behave(conn)
                except (AssertionError, OSError) as exc:
                    self.errors.append(exc)

    def close(self) -> None:
        """Stop accepting and free the port."""
        self._stop.set()
        self._thread.join(10)
        self.listener.close()


@pytest.mark.parametrize("behave", [forged_auth_fail, hello_bad_version, hello_bad_nonce,
                                    foreign_service])
def test_node_survives_hostile_server_then_joins_real_one(daemons, secret, behave):
    """A node refused again and again by a fake server keeps running and reconnecting, logs an
    ERROR saying what to check, logs no forged line; once a real server takes the port, the
    node joins it and runs work."""
    fake = FakeServer(behave)
    try:
        node = daemons.start("node", "--host", "127.0.0.1", "--port", str(fake.port),
                             "--processes", "1", "--name", "survivor", "--retry-max-delay", "0.2",
                             secret=secret)
        wait_for(lambda: fake.connections >= REFUSALS or node.poll() is not None, timeout=60,
                 what=f"{REFUSALS} reconnections to the fake server")
        assert node.poll() is None, daemons.log(node)
    finally:
        fake.close()
    assert not fake.errors, fake.errors
    port = fake.port
    port_file = daemons.tmp_path / "real-port"
    server = daemons.start("server", "--host", "127.0.0.1", "--port", str(port), "--port-file",
                           str(port_file), secret=secret)
    wait_for(lambda: port_file.exists() or server.poll() is not None, what="the real server")
    assert server.poll() is None, daemons.log(server)
    with Cluster(Config(host="127.0.0.1", port=port, username="tester", secret_key=secret)) as c:
        wait_for(lambda: [n["name"] for n in c.status()["nodes"]] == ["survivor"], timeout=60,
                 what="the node to join the real server")
        assert c.map(square, range(10)) == [x * x for x in range(10)]
    assert node.poll() is None
    log = daemons.log(node)
    lines = log.splitlines()
    assert not [line for line in lines if line.lstrip().startswith("FORGED")], log
    assert "\x1b" not in log and "\u2028" not in log
    errors = [line for line in lines if " ERROR handshake with the server at " in line]
    assert len(errors) >= REFUSALS, log
    assert "ACHILLES_SECRET_KEY" in errors[0] and "TLS" in errors[0]
    assert "Achilles server" in errors[0]
    if behave is forged_auth_fail:
        assert "go away\\nFORGED line" in errors[0]
    assert "succeeded after" in log
    assert "Traceback" not in log


def test_node_exits_on_local_configuration_error(tmp_path, secret):
    """A local configuration error (an unreadable TLS CA file) still stops the node at once,
    with exit code 2 and a message naming the file."""
    from conftest import Daemons

    env = Daemons(tmp_path).env(secret)
    missing = tmp_path / "no-such-ca.pem"
    out = subprocess.run([sys.executable, "-m", "achilles.node", "--port", "1", "--tls-ca",
                          str(missing)], env=env, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    assert str(missing) in out.stderr


def test_retry_max_delay_caps_both_backoffs(monkeypatch):
    """By default a node waits at most 5 s between attempts while the server is unreachable and
    30 s while its handshakes fail; ACHILLES_RETRY_MAX_DELAY (or --retry-max-delay) caps both."""
    from achilles.core.config import load_config
    from achilles.node.client import NodeFactory

    monkeypatch.delenv("ACHILLES_RETRY_MAX_DELAY", raising=False)
    assert load_config().retry_max_delay is None
    monkeypatch.setenv("ACHILLES_RETRY_MAX_DELAY", "0.25")
    assert load_config().retry_max_delay == 0.25
    assert load_config(retry_max_delay=2.0).retry_max_delay == 2.0
    for cap, reachable, refused in ((None, 5.0, 30.0), (0.25, 0.25, 0.25)):
        factory = NodeFactory("n", 0, "u", "s" * 20, "127.0.0.1:1", retry_max_delay=cap)
        try:
            assert (factory.reachableMaxDelay, factory.refusedMaxDelay) == (reachable, refused)
            factory.handshake_failed("refused")
            assert factory.maxDelay == refused
            factory.authenticated()
            assert factory.maxDelay == reachable and factory.delay <= reachable
        finally:
            factory.pool.close()
            factory.stages.close()
