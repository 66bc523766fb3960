"""``LocalCluster``: a real server and node(s) as subprocesses on 127.0.0.1, for demos and tests."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, List, Optional

import achilles
from achilles.core import defaults
from achilles.core.config import Config, as_flag, forward_output_default
from achilles.core.errors import AchillesError
from achilles.controller.cluster import Cluster

START_TIMEOUT = 30.0


def _child_env(secret: str) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(achilles.__file__)))
    # The daemons import this same Achilles, and whatever the caller can import (so functions
    # defined in the caller's modules unpickle on the node).
    paths = [root] + [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["ACHILLES_USERNAME"] = "local"
    env["ACHILLES_SECRET_KEY"] = secret
    env.pop("ACHILLES_ENV_FILE", None)
    return env


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. Zombies do not count: they are dead and
    wait only for their parent, or init, to reap them, which some init processes do seconds
    late (orphaned workers of a node). Without ``/proc`` any member counts."""
    if not os.path.isdir("/proc"):
        return True
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[-1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != b"Z":
                return True
    return False


def _kill_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGKILL what is left of a daemon's process group (its workers) and wait until none of
    it runs."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not _group_running(proc.pid):
            return
        time.sleep(0.01)


class LocalCluster:
    """Start a server and ``nodes`` node daemons on loopback with a random port and secret.

    The server's web dashboard listens on loopback (an OS-picked port unless
    ``dashboard_port`` is given); :attr:`dashboard_url` says where.

    ``tls=True`` runs everything over TLS with fresh certificates; ``tls="mutual"`` also
    makes nodes and the controller present client certificates.
    ``forward_output=False`` keeps the tasks' output in the node logs instead of printing it
    here (default: ACHILLES_FORWARD_OUTPUT, on).

    ``with LocalCluster(nodes=2, processes=2) as cluster: cluster.map(...)``. Everything is
    stopped on exit, also when the body raises; the daemons also stop by themselves if this
    process dies.
    """

    def __init__(self, nodes: int = 1, processes: Optional[int] = None, prefetch: int = 2,
                 log_level: str = "WARNING", heartbeat: Optional[float] = None,
                 max_crashes: Optional[int] = None, reconnect_timeout: Optional[float] = None,
                 tls: "bool | str" = False, resources: Optional[str] = None,
                 max_frame: Optional[int] = None, dashboard_port: int = 0,
                 forward_output: Optional[bool] = None) -> None:
        self.n_nodes = nodes
        self.forward_output = forward_output
        #: Where the server's web dashboard is (``http://127.0.0.1:PORT/``), once started.
        self.dashboard_url: Optional[str] = None
        self.dashboard_port = dashboard_port
        self.max_frame = max_frame
        self.resources = resources
        self.heartbeat = heartbeat
        self.reconnect_timeout = reconnect_timeout
        self.processes = processes
        self.prefetch = prefetch
        self.log_level = log_level
        self.port = 0
        self.cluster: Optional[Cluster] = None
        self._secret = secrets.token_urlsafe(32)
        self._dir = tempfile.mkdtemp(prefix="achilles-local-")
        self._env = _child_env(self._secret)
        if heartbeat is not None:
            self._env["ACHILLES_HEARTBEAT"] = str(heartbeat)
        if max_crashes is not None:
            self._env["ACHILLES_MAX_CRASHES"] = str(max_crashes)
        if max_frame is not None:
            self._env["ACHILLES_MAX_FRAME"] = str(max_frame)
        self.tls: dict = {}
        if tls:
            from achilles.core.tls import generate_certs

            paths = generate_certs(os.path.join(self._dir, "certs"))
            self.tls = {"tls_cert": paths["server.pem"], "tls_key": paths["server.key"],
                        "tls_ca": paths["ca.pem"]}
            if tls == "mutual":
                self.tls.update(tls_client_ca=paths["ca.pem"], tls_client_cert=paths["client.pem"],
                                tls_client_key=paths["client.key"])
            for name, value in self.tls.items():
                self._env["ACHILLES_" + name.upper()] = value
        self.server: Optional[subprocess.Popen] = None
        self.nodes: List[subprocess.Popen] = []
        self._logs: List[Any] = []
        self._retired: List[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"<LocalCluster 127.0.0.1:{self.port} nodes={len(self.nodes)}>"

    def _spawn(self, name: str, args: List[str]) -> subprocess.Popen:
        log = open(os.path.join(self._dir, f"{name}.log"), "ab")
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", *args, "--exit-with-stdin", "--log-level", self.log_level],
            env=self._env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, cwd=self._dir)

    def log_text(self, name: str) -> str:
        """What a daemon (``server`` or ``node-0``...) has logged so far."""
        try:
            with open(os.path.join(self._dir, f"{name}.log"), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def start(self) -> Cluster:
        """Start everything and return a connected :class:`Cluster` (``__enter__`` does this)."""
        try:
            deadline = time.monotonic() + START_TIMEOUT
            self._start_server(0, deadline)
            for _ in range(self.n_nodes):
                self.add_node()
            cfg = Config(host="127.0.0.1", port=self.port, username="local",
                         secret_key=self._secret, tls_ca=self.tls.get("tls_ca"),
                         tls_client_cert=self.tls.get("tls_client_cert"),
                         tls_client_key=self.tls.get("tls_client_key"))
            if self.heartbeat is not None:
                cfg.heartbeat = self.heartbeat
            if self.reconnect_timeout is not None:
                cfg.reconnect_timeout = self.reconnect_timeout
            if self.max_frame is not None:
                cfg.max_frame = self.max_frame
            cfg.forward_output = (forward_output_default() if self.forward_output is None
                                  else self.forward_output)
            cfg.progress = as_flag("ACHILLES_PROGRESS", os.environ.get("ACHILLES_PROGRESS"),
                                   False)
            self.cluster = Cluster(cfg)
            self.wait_for_nodes(self.n_nodes, deadline)
            return self.cluster
        except BaseException:
            self.stop()
            raise

    def _start_server(self, port: int, deadline: float) -> None:
        port_file = os.path.join(self._dir, "port")
        if os.path.exists(port_file):
            os.unlink(port_file)
        url_file = os.path.join(self._dir, "dashboard-url")
        self.server = self._spawn("server", [
            "achilles.server", "--host", "127.0.0.1", "--port", str(port), "--port-file", port_file,
            "--prefetch", str(self.prefetch), "--dashboard", f"127.0.0.1:{self.dashboard_port}",
            "--dashboard-url-file", url_file])
        while not os.path.exists(port_file):
            if self.server.poll() is not None:
                raise AchillesError(f"the local server exited: {self.log_text('server')[-2000:]}")
            if time.monotonic() > deadline:
                raise AchillesError("the local server did not start in time")
            time.sleep(0.01)
        with open(port_file) as fh:
            self.port = int(fh.read())
        with open(url_file) as fh:
            self.dashboard_url = fh.read().strip() or None
            if self.dashboard_url:
                self.dashboard_port = int(self.dashboard_url.rsplit(":", 1)[1].strip("/"))

    def restart_server(self, down_for: float = 0.0) -> None:
        """Kill the server with SIGKILL and start a new one on the same port (fault tests)."""
        assert self.server is not None
        self.server.kill()
        self.server.wait(10)
        self._retired.append(self.server)
        time.sleep(down_for)
        self._start_server(self.port, time.monotonic() + START_TIMEOUT)

    def add_node(self, processes: Optional[int] = None, name: Optional[str] = None,
                 resources: Optional[str] = None) -> subprocess.Popen:
        """Start one more node daemon (it joins running jobs at once); ``resources`` as
        ``gpu=1,ram=64`` (default: the cluster's ``resources``)."""
        index = len(self.nodes)
        args = ["achilles.node", "--host", "127.0.0.1", "--port", str(self.port),
                "--name", name or f"local-{index}"]
        procs = processes or self.processes
        if procs:
            args += ["--processes", str(procs)]
        wanted = resources or self.resources
        if wanted:
            args += ["--resources", wanted]
        proc = self._spawn(f"node-{index}", args)
        self.nodes.append(proc)
        return proc

    def wait_for_nodes(self, count: int, deadline: Optional[float] = None) -> None:
        """Block until ``count`` nodes are connected."""
        deadline = deadline or time.monotonic() + START_TIMEOUT
        assert self.cluster is not None
        while len(self.cluster.status()["nodes"]) < count:
            for i, proc in enumerate(self.nodes):
                if proc.poll() is not None:
                    raise AchillesError(f"local node {i} exited: {self.log_text(f'node-{i}')[-2000:]}")
            if time.monotonic() > deadline:
                raise AchillesError(f"only {len(self.cluster.status()['nodes'])} of {count} "
                                    "local nodes connected in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the controller connection, the nodes and the server; remove temporary files."""
        if self.cluster is not None:
            try:
                self.cluster.close()
            except Exception:
                pass
            self.cluster = None
        procs = [p for p in self.nodes + self._retired + [self.server] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc)
            if proc.stdin:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for log in self._logs:
            log.close()
        self._logs = []
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        """Start, and make the connected cluster the default of the module-level calls
        (``achilles.map``, ``g.result()``, ``g()``...) until the block ends."""
        cluster = self.start()
        defaults.push(cluster)
        return cluster

    def __exit__(self, *exc: Any) -> None:
        if self.cluster is not None:
            defaults.remove(self.cluster)
        self.stop()
