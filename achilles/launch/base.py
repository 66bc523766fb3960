"""What every launcher shares: the cluster's ``.env``, a server daemon on this machine, the
controller connection, waiting until the nodes join, and the context-manager protocol."""

from __future__ import annotations

import collections
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Callable, Deque, Dict, List, Optional

import achilles
from achilles.core import defaults
from achilles.core.config import Config, gen_config, load_config
from achilles.core.errors import AchillesError, ConfigError
from achilles.controller.cluster import Cluster

#: ``sink(source, line)``: where launchers send every log line of the server and the nodes;
#: called from several threads at once, so it must be thread-safe.
LogSink = Callable[[str, str], None]
TAIL_LINES = 200


_PRINT_LOCK = threading.Lock()


def print_log(source: str, line: str) -> None:
    """The default :data:`LogSink`: ``[source] line`` on stderr, one whole line at a time
    (the server's and the hosts' lines are pumped by different threads)."""
    text = f"[{source}] {line}\n"
    with _PRINT_LOCK:
        sys.stderr.write(text)
        sys.stderr.flush()


def is_local_address(host: Optional[str]) -> bool:
    """Whether ``host`` is empty, a loopback or the unspecified address (useless to a remote node)."""
    if not host or host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


class LogTail:
    """The last lines of one source, kept for error messages, each also passed to a sink."""

    def __init__(self, source: str, sink: Optional[LogSink]) -> None:
        self.source = source
        self.sink = sink
        self.lines: Deque[str] = collections.deque(maxlen=TAIL_LINES)

    def add(self, line: str) -> None:
        """Record one line (without its newline) and pass it on."""
        self.lines.append(line)
        if self.sink is not None:
            self.sink(self.source, line)

    def text(self) -> str:
        """The kept lines, joined."""
        return "\n".join(self.lines)


def _pump(stream: IO[bytes], tail: LogTail) -> None:
    for raw in iter(stream.readline, b""):
        tail.add(raw.decode("utf-8", "replace").rstrip("\n"))
    stream.close()


def _read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


class ServerHandle:
    """The server a launcher started, wherever it runs: :meth:`start` it, ask whether it is
    :meth:`alive`, read its log (``tail``), :meth:`stop` it."""

    tail: LogTail

    def start(self, deadline: float) -> int:
        """Start the server and return the port it listens on."""
        raise NotImplementedError

    def alive(self) -> bool:
        """Whether the server process is still running."""
        raise NotImplementedError

    def join_log(self) -> None:
        """Wait (briefly) until the server's last log lines are read."""

    def stop(self) -> None:
        """Stop the server; wait until it is gone."""
        raise NotImplementedError


class ServerProcess(ServerHandle):
    """An ``achilles-server`` started on this machine for a launcher, with the cluster's
    ``.env``; stopped by its process group."""

    def __init__(self, env_file: str, bind: str, port: int, directory: str, log_level: str,
                 sink: Optional[LogSink]) -> None:
        self.env_file = env_file
        self.bind = bind
        self.port = port
        self.directory = directory
        self.log_level = log_level
        self.tail = LogTail("server", sink)
        self.proc: Optional[subprocess.Popen] = None
        self._pump: Optional[threading.Thread] = None

    def start(self, deadline: float) -> int:
        """Start the server and return the port it listens on."""
        port_file = os.path.join(self.directory, "server.port")
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(achilles.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            [root] + [p for p in sys.path if p and os.path.isdir(p)]))
        env["ACHILLES_ENV_FILE"] = self.env_file
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "achilles.server", "--host", self.bind, "--port", str(self.port),
             "--port-file", port_file, "--log-level", self.log_level, "--exit-with-stdin"],
            env=env, cwd=self.directory, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        assert self.proc.stderr is not None
        self._pump = threading.Thread(target=_pump, args=(self.proc.stderr, self.tail), daemon=True,
                                      name="achilles-server-log")
        self._pump.start()
        while not _read_text(port_file):
            if self.proc.poll() is not None:
                self.join_log()
                raise AchillesError(f"the server exited with status {self.proc.returncode}:\n"
                                    f"{self.tail.text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AchillesError("the server did not start in time")
            time.sleep(0.02)
        self.port = int(_read_text(port_file))
        return self.port

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def join_log(self) -> None:
        """Wait (briefly) until the server's last log lines are read."""
        if self._pump is not None:
            self._pump.join(5)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds."""
        proc = self.proc
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue
            break
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.join_log()


class Launcher:
    """A server (here, unless a subclass runs it elsewhere) plus nodes somewhere else;
    subclasses start and stop the nodes.

    ``env_file``: the cluster's ``.env`` (its secret, user name, TLS and other settings);
    without one, a private ``.env`` with a fresh secret is made for this cluster's lifetime.
    ``server_address``: the address nodes use to reach this machine (default: the ``.env``'s
    ``ACHILLES_HOST`` unless it is a loopback address, else what the launcher finds).
    """

    kind = "launcher"

    def __init__(self, env_file: Optional[str] = None, port: int = 0, bind: str = "0.0.0.0",
                 server_address: Optional[str] = None, log_level: str = "WARNING",
                 on_log: Optional[LogSink] = print_log, start_timeout: Optional[float] = 120.0) -> None:
        self.port = port
        self.bind = bind
        self.log_level = log_level
        self.on_log = on_log
        self.start_timeout = start_timeout
        self.cluster: Optional[Cluster] = None
        if env_file is not None and not os.path.isfile(env_file):
            raise ConfigError(f"{env_file} does not name a readable .env file")
        self._dir = tempfile.mkdtemp(prefix=f"achilles-{self.kind}-")
        if env_file is None:
            env_file = gen_config(os.path.join(self._dir, ".env"), host="127.0.0.1", port=0,
                                  username="launch-" + secrets.token_hex(4))
        self.env_file = os.path.abspath(env_file)
        self.settings: Config = load_config(env_file=self.env_file)
        self.settings.require_secret()
        if server_address is None and not is_local_address(self.settings.host):
            server_address = self.settings.host
        self.server_address = server_address
        self.server: ServerHandle = ServerProcess(self.env_file, bind, port, self._dir, log_level,
                                                  on_log)

    # --- what a subclass provides --------------------------------------------------------------
    def _prepare(self, deadline: float) -> None:
        """Check everything the nodes need before the server starts (default: nothing)."""

    def _start_nodes(self, deadline: float) -> None:
        raise NotImplementedError

    def _node_problem(self) -> Optional[str]:
        """Why the nodes can no longer join (a node or job ended), or None."""
        return None

    def _stop_nodes(self) -> None:
        raise NotImplementedError

    def expected_nodes(self) -> int:
        """How many nodes this launcher started and waits for."""
        raise NotImplementedError

    def _settled(self, nodes: List[Dict[str, Any]], count: int, exact: bool) -> bool:
        """Whether the connected ``nodes`` are the ones waited for."""
        return len(nodes) == count or (len(nodes) > count and not exact)

    # --- shared ------------------------------------------------------------------------------
    def _deadline(self, timeout: Optional[float]) -> float:
        return float("inf") if timeout is None else time.monotonic() + timeout

    def controller_config(self) -> Config:
        """Settings a script on this machine uses to reach the started server."""
        host = self.server_address if self.server_address else (
            "127.0.0.1" if is_local_address(self.bind) else self.bind)
        return load_config(env_file=self.env_file, host=host, port=self.port)

    def start(self) -> Cluster:
        """Start the server and the nodes, wait until every node joined, and return a connected
        :class:`Cluster` (``__enter__`` does this). On any failure everything is stopped."""
        try:
            deadline = self._deadline(self.start_timeout)
            self._prepare(deadline)
            self.port = self.server.start(min(deadline, time.monotonic() + 60))
            self._start_nodes(deadline)
            self.cluster = Cluster(self.controller_config())
            self.wait_for_nodes(self.expected_nodes(), deadline=deadline)
            return self.cluster
        except BaseException:
            self.stop()
            raise

    def connected_nodes(self) -> List[Dict[str, Any]]:
        """The server's list of connected nodes."""
        assert self.cluster is not None
        return self.cluster.status()["nodes"]

    def wait_for_nodes(self, count: int, timeout: Optional[float] = None,
                       deadline: Optional[float] = None, exact: bool = False) -> None:
        """Block until ``count`` nodes are connected (``exact``: exactly ``count``); fail when
        the server or a node ends first, or at the deadline."""
        if deadline is None:
            deadline = self._deadline(timeout)
        while True:
            nodes = self.connected_nodes()
            if self._settled(nodes, count, exact):
                return
            if not self.server.alive():
                self.server.join_log()
                raise AchillesError(f"the server exited:\n{self.server.tail.text()[-2000:]}")
            problem = self._node_problem()
            if problem:
                raise AchillesError(problem)
            if time.monotonic() > deadline:
                raise AchillesError(f"{len(nodes)} of {count} nodes connected in time")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the nodes, then the server; remove this machine's temporary files."""
        if self.cluster is not None:
            try:
                self.cluster.close()
            except Exception:
                pass
            self.cluster = None
        try:
            self._stop_nodes()
        finally:
            self.server.stop()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        """Start, and make the connected cluster the default of the module-level calls."""
        cluster = self.start()
        defaults.push(cluster)
        return cluster

    def __exit__(self, *exc: Any) -> None:
        if self.cluster is not None:
            defaults.remove(self.cluster)
        self.stop()
