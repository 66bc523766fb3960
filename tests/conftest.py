"""Shared fixtures: real local clusters and daemons on 127.0.0.1 with OS-picked ports.

Every process a test starts is stopped at teardown (by process group), and a final check
fails the test if one of them is still alive.
"""

from __future__ import annotations

import os
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import pytest

import achilles
from achilles.local import LocalCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False): the
    one place tests wait on something they cannot be told about."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02,
             what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    if not poll(predicate, timeout, interval):
        raise AssertionError(f"timed out waiting for {what}")


class Reader:
    """Takes every result of ``results`` into :attr:`got` in a thread of its own. The controller
    reads input and answers the server's WANTs only while its caller waits in ``next()``: a
    test that stopped reading to look at or break the cluster would freeze the input at what
    had been sent by then, and the nodes would run dry under it."""

    def __init__(self, results: Iterable[Any]) -> None:
        self.got: List[Any] = []
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._read, args=(results,), daemon=True)
        self._thread.start()

    def _read(self, results: Iterable[Any]) -> None:
        try:
            for x in results:
                self.got.append(x)
        except BaseException as exc:  # raised again by result()
            self.error = exc

    def result(self, timeout: float = 60.0) -> List[Any]:
        """Every result once the iterator has ended; raise what it raised."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"results still coming after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.got


def busy_on(cluster: Any, node: str) -> int:
    """Chunks the server has on the node named ``node`` now (0 when it is not connected)."""
    return sum(n["busy"] for n in cluster.status()["nodes"] if n["name"] == node)


def read_frame(sock) -> "tuple":
    """One raw frame ``(code, body)`` from a blocking socket; ``(None, b"")`` if it closed
    before a header arrived."""
    header = b""
    while len(header) < 5:
        more = sock.recv(5 - len(header))
        if not more:
            return None, b""
        header += more
    code, length = struct.unpack("!BI", header)
    body = b""
    while len(body) < length:
        more = sock.recv(length - len(body))
        if not more:
            break
        body += more
    return code, body


def bench_module(name: str) -> Any:
    """``bench/<name>.py`` loaded as a module (``bench`` is no package), for its tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench",
                                                  os.path.join(ROOT, "bench", f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def proc_stats() -> "Iterator[tuple]":
    """``(pid, fields of /proc/PID/stat after the command name)`` for every live process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().split(")")[-1].split()
            except OSError:
                continue
            yield int(entry), fields


class MarkerPickle:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def group_members(pgid: int) -> List[int]:
    """Live pids whose process group is ``pgid``."""
    return [pid for pid, fields in proc_stats() if int(fields[2]) == pgid and fields[0] != "Z"]


def sigint_as_on_a_terminal() -> None:
    """``preexec_fn`` for a command a test stops with Ctrl-C (SIGINT): SIGINT back to its
    default, as a command typed at a terminal has it. A test run started in the background
    by a non-interactive shell (``pytest &`` in a CI script, ``nohup``) inherits SIGINT
    ignored, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM a daemon's whole process group, then SIGKILL whatever is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None or group_members(proc.pid):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        poll(lambda: proc.poll() is not None and not group_members(proc.pid), grace)
        if proc.poll() is not None and not group_members(proc.pid):
            return


class Daemons:
    """Starts ``achilles-server`` / ``achilles-node`` processes for one test and stops them."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.procs: List[subprocess.Popen] = []
        self.logs: Dict[int, str] = {}

    def env(self, secret: str, username: str = "tester") -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in sys.path if p])
        env["ACHILLES_SECRET_KEY"] = secret
        env["ACHILLES_USERNAME"] = username
        env.pop("ACHILLES_ENV_FILE", None)
        return env

    def start(self, role: str, *args: str, secret: str, username: str = "tester",
              netns: Optional[str] = None) -> subprocess.Popen:
        """Start ``achilles.<role>`` (inside network namespace ``netns`` if given). It exits
        when this test process does, however that ends (``--exit-with-stdin`` on a pipe only
        this process holds), so a killed test run leaves no daemon behind."""
        log = str(self.tmp_path / f"{role}-{len(self.procs)}.log")
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with open(log, "wb") as fh:
            proc = subprocess.Popen(prefix + [sys.executable, "-m", f"achilles.{role}", *args,
                                              "--exit-with-stdin"],
                                    env=self.env(secret, username), stdin=subprocess.PIPE,
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=str(self.tmp_path))
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def server(self, secret: str, username: str = "tester", *args: str) -> int:
        """Start a server on an OS-picked port (``args``: more options); return the port."""
        port_file = self.tmp_path / f"port-{len(self.procs)}"
        proc = self.start("server", "--host", "127.0.0.1", "--port", "0", "--port-file",
                          str(port_file), *args, secret=secret, username=username)
        wait_for(lambda: port_file.exists() or proc.poll() is not None, what="server port")
        assert proc.poll() is None, self.log(proc)
        return int(port_file.read_text())

    def log(self, proc: subprocess.Popen) -> str:
        with open(self.logs[proc.pid], errors="replace") as fh:
            return fh.read()

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_group(proc)
            if proc.stdin is not None:
                proc.stdin.close()


@pytest.fixture
def daemons(tmp_path) -> Iterator[Daemons]:
    """Start daemons by hand; all are stopped (whole process groups) after the test."""
    d = Daemons(tmp_path)
    yield d
    d.stop_all()
    for proc in d.procs:
        assert not group_members(proc.pid), f"processes of group {proc.pid} outlived the test"


@pytest.fixture
def secret() -> str:
    """A fresh shared secret."""
    return secrets.token_urlsafe(24)


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Factory for started LocalClusters, stopped at teardown with nothing left running."""
    made: List[LocalCluster] = []

    def make(nodes: int = 1, processes: Optional[int] = 2, **kw) -> LocalCluster:
        lc = LocalCluster(nodes=nodes, processes=processes, **kw)
        lc.start()
        made.append(lc)
        return lc

    yield make
    pids = []
    for lc in made:
        pids += [p.pid for p in lc.nodes] + ([lc.server.pid] if lc.server else [])
        lc.stop()
    for pid in pids:
        assert not group_members(pid), f"processes of group {pid} outlived the test"


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[LocalCluster]:
    """One LocalCluster (2 nodes x 2 processes) shared by a module's read-only tests."""
    lc = LocalCluster(nodes=2, processes=2)
    lc.start()
    yield lc
    pids = [p.pid for p in lc.nodes] + [lc.server.pid]
    lc.stop()
    for pid in pids:
        assert not group_members(pid), f"processes of group {pid} outlived the module"


@pytest.fixture
def cluster(shared_cluster: LocalCluster) -> achilles.controller.cluster.Cluster:
    """The shared cluster's connected controller."""
    return shared_cluster.cluster
