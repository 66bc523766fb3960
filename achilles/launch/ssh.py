"""``SSHCluster``: a server (on this machine, or on one of the hosts) and one node per host,
started over SSH.

SSH goes through ``asyncssh`` (the ``ssh`` extra), which reads the user's ``~/.ssh/config``
(Host aliases, HostName, Port, User, IdentityFile, ProxyJump), ``~/.ssh/known_hosts``, keys
and agent, like ``ssh`` does. Its event loop runs in one background thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shlex
import threading
import time
from typing import Any, Coroutine, Dict, Iterable, List, Optional, TypeVar, Union

import achilles
from achilles.core.errors import AchillesError, ConfigError
from achilles.launch.base import Launcher, LogSink, LogTail, ServerHandle, print_log
from achilles.launch.hosts import HostSpec, parse_host, parse_hosts

T = TypeVar("T")
STOP_GRACE = 10.0
MIN_PYTHON = (3, 9)
#: The TLS files each kind of process reads, copied beside its ``.env`` on its host.
NODE_TLS_FIELDS = ("tls_ca", "tls_client_cert", "tls_client_key")
SERVER_TLS_FIELDS = ("tls_cert", "tls_key", "tls_client_ca")

_CHECK = (
    "import sys, json\n"
    "out = {'python': '%d.%d.%d' % tuple(sys.version_info[:3]), 'executable': sys.executable}\n"
    "try:\n"
    "    import achilles\n"
    "    out['achilles'] = achilles.__version__\n"
    "except Exception as exc:\n"
    "    out['error'] = '%s: %s' % (type(exc).__name__, exc)\n"
    "print(json.dumps(out))\n"
)


def _asyncssh() -> Any:
    try:
        import asyncssh
    except ImportError:
        raise ConfigError("starting nodes over SSH needs asyncssh: pip install 'achilles[ssh]'") from None
    return asyncssh


def _same_address(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a.split("%")[0]), ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return a == b
    x = getattr(x, "ipv4_mapped", None) or x
    y = getattr(y, "ipv4_mapped", None) or y
    return x == y


class _Loop:
    """An asyncio event loop in a daemon thread; ``run`` waits for one coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="achilles-ssh")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class RemoteProcess:
    """One process (a node, or the server) on one host: its SSH connection, its process and
    its log."""

    def __init__(self, spec: HostSpec, name: str, sink: Optional[LogSink]) -> None:
        self.spec = spec
        self.name = name
        self.tail = LogTail(name, sink)
        self.conn: Any = None
        self.proc: Any = None
        self.pid: Optional[int] = None
        self.directory: Optional[str] = None
        self.exit_status: Optional[int] = None
        #: The client address the host's sshd saw, and its own (``$SSH_CONNECTION``).
        self.seen_from: Optional[str] = None
        self.seen_at: Optional[str] = None
        self.stopping = False
        self.tasks: List["asyncio.Task[Any]"] = []

    def local_address(self) -> Optional[str]:
        """This machine's address as the host sees it: the SSH connection's own end, when the
        host saw the connection come from there (not through a jump host or address
        translation, where the host may not reach it); else None."""
        sockname = self.conn.get_extra_info("sockname") if self.conn is not None else None
        if not sockname or not self.seen_from:
            return None
        return sockname[0] if _same_address(sockname[0], self.seen_from) else None

    def host_address(self) -> Optional[str]:
        """The host's address as this machine reached it: the SSH connection's far end, when
        the connection is direct (see :meth:`local_address`) and arrived there; else None."""
        peername = self.conn.get_extra_info("peername") if self.conn is not None else None
        if not peername or not self.seen_at or self.local_address() is None:
            return None
        return peername[0] if _same_address(peername[0], self.seen_at) else None


class RemoteServer(ServerHandle):
    """The ``achilles-server`` an :class:`SSHCluster` runs on one of its hosts."""

    def __init__(self, cluster: "SSHCluster", remote: RemoteProcess) -> None:
        self.cluster = cluster
        self.remote = remote
        self.tail = remote.tail

    def start(self, deadline: float) -> int:
        """Start the server on its host, wait until it listens; return its port."""
        return self.cluster._run(self.cluster._start_server(self.remote, deadline))

    def alive(self) -> bool:
        """Whether the server process is still running on its host."""
        return self.remote.proc is not None and self.remote.exit_status is None

    def stop(self) -> None:
        """Stop the server (its stdin closes; SIGKILL after a grace period), remove its files."""
        self.cluster._stop_remote(self.remote)


class SSHCluster(Launcher):
    """Start a server (here, or on ``server_host``) and a node on each of ``hosts`` over SSH.

    ``hosts``: ``"host1,host2:8"`` or a list of such strings (``:N`` = worker processes,
    default: the host's CPU count; a host named twice gets two nodes). Each host's Python
    (``remote_python``, default ``python3``) must import the same Achilles version as here;
    every host is checked before anything starts. The cluster's ``.env`` (``env_file``, or a
    fresh private one) is copied to a private temporary folder on each host with mode 0600.
    Node log lines go to ``on_log(host, line)`` (default: ``[host] line`` on stderr).

    ``server_host``: an SSH destination (e.g. the first of ``hosts``) to run the server on
    instead of this machine, with its own private copy of the ``.env`` (and the server's TLS
    files). Nodes and this machine's controllers then reach it at ``server_address``, by
    default the address this machine's SSH connection reached that host at
    (:meth:`controller_config` gives the settings for scripts here).

    ``with SSHCluster(["alpha", "beta:4"]) as cluster: cluster.map(...)``; leaving the block
    (or :meth:`stop`) stops every node, removes the copied files and stops the server. Nodes
    also stop by themselves if this process dies (their SSH session ends).
    """

    kind = "ssh"

    def __init__(self, hosts: Union[str, Iterable[Union[str, HostSpec]]],
                 remote_python: str = "python3", env_file: Optional[str] = None, port: int = 0,
                 bind: str = "0.0.0.0", server_address: Optional[str] = None,
                 log_level: str = "WARNING", on_log: Optional[LogSink] = print_log,
                 start_timeout: Optional[float] = 120.0, connect_timeout: float = 30.0,
                 server_host: Optional[str] = None) -> None:
        self._ssh = _asyncssh()
        self.hosts = parse_hosts(hosts)
        super().__init__(env_file=env_file, port=port, bind=bind, server_address=server_address,
                         log_level=log_level, on_log=on_log, start_timeout=start_timeout)
        self.remote_python = remote_python
        self.connect_timeout = connect_timeout
        counts: Dict[str, int] = {}
        for spec in self.hosts:
            counts[spec.destination] = counts.get(spec.destination, 0) + 1
        seen: Dict[str, int] = {}
        self.nodes: List[RemoteProcess] = []
        for spec in self.hosts:
            index = seen[spec.destination] = seen.get(spec.destination, -1) + 1
            name = spec.destination if counts[spec.destination] == 1 else f"{spec.destination}-{index}"
            self.nodes.append(RemoteProcess(spec, name, on_log))
        self.remote_server: Optional[RemoteProcess] = None
        if server_host is not None:
            spec = parse_host(server_host)
            if spec.processes:
                raise ConfigError(f"the server's host is written host or user@host, without :N; "
                                  f"got {server_host!r}")
            self.remote_server = RemoteProcess(spec, f"server@{spec.destination}", on_log)
            self.server = RemoteServer(self, self.remote_server)
        self._loop: Optional[_Loop] = None

    def __repr__(self) -> str:
        where = f" server={self.remote_server.spec.destination}" if self.remote_server else ""
        return f"<SSHCluster port={self.port}{where} hosts={[n.name for n in self.nodes]}>"

    def _remotes(self) -> List[RemoteProcess]:
        return self.nodes + ([self.remote_server] if self.remote_server else [])

    def expected_nodes(self) -> int:
        """One node per host entry."""
        return len(self.nodes)

    def log_text(self, name: str) -> str:
        """The last log lines of the node called ``name`` (``server``: the server's)."""
        if name == "server":
            return self.server.tail.text()
        return "\n".join(n.tail.text() for n in self.nodes if n.name == name)

    # --- start -------------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        if self._loop is None:
            self._loop = _Loop()
        return self._loop.run(coro, timeout)

    def _prepare(self, deadline: float) -> None:
        self._run(self._connect_and_check_all())

    async def _connect_and_check_all(self) -> None:
        remotes = self._remotes()
        results = await asyncio.gather(*(self._connect_and_check(n) for n in remotes),
                                       return_exceptions=True)
        problems = [f"  {node.name}: {result}" for node, result in zip(remotes, results)
                    if isinstance(result, BaseException)]
        if not problems:
            problems = self._address_problems()
        if problems:
            raise AchillesError("cannot start nodes on every host:\n" + "\n".join(problems))

    def _address_problems(self) -> List[str]:
        """Settle the address nodes reach the server at (for a server on a host: that host's,
        as this machine reached it); name each host for which none can be told, before
        anything starts."""
        server = self.remote_server
        if self.server_address:
            return []
        if server is not None:
            self.server_address = server.host_address()
            if self.server_address:
                return []
            return [f"  {server.name}: cannot tell which address of {server.spec.destination} the "
                    "nodes and this machine reach (it is behind ProxyJump or address "
                    "translation); pass --server-address / server_address="]
        return [f"  {node.name}: cannot tell which address of this machine the host reaches (it "
                "is behind ProxyJump or address translation); pass --server-address / "
                "server_address=" for node in self.nodes if not node.local_address()]

    async def _connect_and_check(self, node: RemoteProcess) -> None:
        ssh = self._ssh
        try:
            node.conn = await asyncio.wait_for(ssh.connect(node.spec.destination),
                                               self.connect_timeout)
        except asyncio.TimeoutError:
            raise AchillesError(f"no SSH connection within {self.connect_timeout:g} s") from None
        except (OSError, ssh.Error) as exc:
            raise AchillesError(f"SSH connection failed: {exc}") from None
        seen = await node.conn.run("echo $SSH_CONNECTION", check=False, timeout=60)
        words = str(seen.stdout or "").split()
        node.seen_from = words[0] if words else None
        node.seen_at = words[2] if len(words) > 2 else None
        py = shlex.quote(self.remote_python)
        result = await node.conn.run(f"{py} -c {shlex.quote(_CHECK)}", check=False, timeout=60)
        out = str(result.stdout or "").strip().splitlines()
        if result.exit_status == 127 or not out:
            raise AchillesError(
                f"no Python at {self.remote_python!r} there ({str(result.stderr or '').strip()}); "
                "install python3, or pass --python PATH / remote_python= naming it")
        info = json.loads(out[-1])
        version = tuple(int(p) for p in info["python"].split("."))
        if version[:2] < MIN_PYTHON:
            raise AchillesError(f"{info['executable']} is Python {info['python']}; Achilles "
                                "needs 3.9 or newer (pass --python PATH / remote_python=)")
        if "achilles" not in info:
            raise AchillesError(
                f"{info['executable']} (Python {info['python']}) cannot import achilles "
                f"({info.get('error')}); install Achilles {achilles.__version__} there, or pass "
                "--python PATH / remote_python= naming the Python of the virtualenv that has it")
        if info["achilles"] != achilles.__version__:
            raise AchillesError(f"{info['executable']} has Achilles {info['achilles']}, this "
                                f"machine {achilles.__version__}; install the same version")

    def _start_nodes(self, deadline: float) -> None:
        self._run(self._start_all())

    async def _start_all(self) -> None:
        results = await asyncio.gather(*(self._start_one(n) for n in self.nodes),
                                       return_exceptions=True)
        problems = [f"  {n.name}: {r}" for n, r in zip(self.nodes, results)
                    if isinstance(r, BaseException)]
        if problems:
            raise AchillesError("cannot start nodes on every host:\n" + "\n".join(problems))

    def _env_text(self, directory: str, files: Dict[str, bytes], fields: Iterable[str]) -> bytes:
        """The cluster's .env, plus lines pointing the TLS settings ``fields`` at the copies in
        ``directory`` (their contents put in ``files``)."""
        with open(self.env_file, "rb") as fh:
            text = fh.read()
        extra = []
        for field in fields:
            path = getattr(self.settings, field)
            if path:
                with open(path, "rb") as fh:
                    files[field] = fh.read()
                extra.append(f"ACHILLES_{field.upper()}={directory}/{field}.pem")
        if extra:
            text = text.rstrip(b"\n") + b"\n" + "\n".join(extra).encode() + b"\n"
        return text

    async def _write_private(self, node: RemoteProcess, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` on the host with mode 0600; the data goes through the
        session's stdin, never a command line."""
        q = shlex.quote(path)
        result = await node.conn.run(f"umask 077 && cat > {q} && chmod 600 {q}", input=data,
                                     encoding=None, check=False, timeout=60)
        if result.exit_status != 0:
            raise AchillesError(f"cannot write {path}: {result.stderr!r}")

    async def _private_folder(self, node: RemoteProcess, fields: Iterable[str]) -> str:
        """Make a private temporary folder on the host and copy the ``.env`` (and the TLS
        ``fields``' files) into it, mode 0600; return the folder."""
        made = await node.conn.run('mktemp -d "${TMPDIR:-/tmp}/achilles-XXXXXXXX"', check=False,
                                   timeout=60)
        if made.exit_status != 0:
            raise AchillesError(f"cannot make a temporary folder: {str(made.stderr).strip()}")
        node.directory = directory = str(made.stdout).strip()
        files: Dict[str, bytes] = {}
        await self._write_private(node, f"{directory}/.env",
                                  self._env_text(directory, files, fields))
        for field, data in files.items():
            await self._write_private(node, f"{directory}/{field}.pem", data)
        return directory

    async def _launch(self, node: RemoteProcess, module: str, args: List[str]) -> None:
        """Run ``python -m module args`` on the host in its private folder, reading the
        ``.env`` there; pump its output into its log and watch for its exit."""
        directory = node.directory
        assert directory is not None
        q = shlex.quote
        command = (f"cd {q(directory)} && echo $$ && exec env ACHILLES_ENV_FILE={q(directory + '/.env')} "
                   + " ".join(q(a) for a in [self.remote_python, "-m", module, *args]))
        node.proc = await node.conn.create_process(command)
        first = await asyncio.wait_for(node.proc.stdout.readline(), 60)
        if not first.strip().isdigit():
            raise AchillesError(f"{module} did not start: {first!r}")
        node.pid = int(first)
        node.tasks = [asyncio.ensure_future(self._pump(node.proc.stderr, node.tail)),
                      asyncio.ensure_future(self._pump(node.proc.stdout, node.tail)),
                      asyncio.ensure_future(self._watch(node))]

    async def _start_one(self, node: RemoteProcess) -> None:
        address = self.server_address or node.local_address()
        assert address, "_address_problems lets no host without a server address through"
        await self._private_folder(node, NODE_TLS_FIELDS)
        args = ["--host", address, "--port", str(self.port), "--name", node.name,
                "--log-level", self.log_level, "--exit-with-stdin"]
        if node.spec.processes:
            args += ["--processes", str(node.spec.processes)]
        await self._launch(node, "achilles.node", args)

    async def _start_server(self, server: RemoteProcess, deadline: float) -> int:
        """Start the server on its host and wait until it listens; return its port."""
        where = server.spec.destination
        directory = await self._private_folder(server, SERVER_TLS_FIELDS)
        port_file = f"{directory}/server.port"
        await self._launch(server, "achilles.server",
                           ["--host", self.bind, "--port", str(self.port), "--port-file", port_file,
                            "--log-level", self.log_level, "--exit-with-stdin"])
        q = shlex.quote(port_file)
        # One command waits on the host until the port file is written or the server is gone.
        listening = (f"while [ ! -s {q} ] && kill -0 {server.pid} 2>/dev/null; do sleep 0.05; "
                     f"done; cat {q} 2>/dev/null")
        try:
            result = await asyncio.wait_for(server.conn.run(listening, check=False),
                                            max(1.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise AchillesError(f"the server on {where} did not start in time") from None
        text = str(result.stdout or "").strip()
        if not text.isdigit():
            try:
                await asyncio.wait_for(asyncio.shield(server.tasks[-1]), 10)
            except asyncio.TimeoutError:
                pass
            raise AchillesError(f"the server on {where} exited with status {server.exit_status}:"
                                f"\n{server.tail.text()[-2000:]}")
        return int(text)

    @staticmethod
    async def _pump(stream: Any, tail: LogTail) -> None:
        async for line in stream:
            tail.add(str(line).rstrip("\n"))

    async def _watch(self, node: RemoteProcess) -> None:
        await node.proc.wait(check=False)
        node.exit_status = node.proc.exit_status if node.proc.exit_status is not None else -1
        if not node.stopping:
            what = "server" if node is self.remote_server else "node"
            node.tail.add(f"{what} exited with status {node.exit_status}")

    def _node_problem(self) -> Optional[str]:
        for node in self.nodes:
            if node.exit_status is not None and not node.stopping:
                return (f"the node on {node.name} exited with status {node.exit_status}:\n"
                        f"{node.tail.text()[-2000:]}")
        return None

    # --- stop --------------------------------------------------------------------------------
    def _stop_nodes(self) -> None:
        if self._loop is not None:
            self._run(self._stop_all(), timeout=STOP_GRACE * 3 + 30)

    def _stop_remote(self, remote: RemoteProcess) -> None:
        if self._loop is not None:
            self._run(self._stop_one(remote), timeout=STOP_GRACE * 3 + 30)

    def stop(self) -> None:
        """Stop the nodes, then the server, wherever it runs; remove every copied file."""
        try:
            super().stop()
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None

    async def _stop_all(self) -> None:
        await asyncio.gather(*(self._stop_one(n) for n in self.nodes), return_exceptions=True)

    async def _stop_one(self, node: RemoteProcess) -> None:
        node.stopping = True
        try:
            if node.proc is not None and node.exit_status is None:
                node.proc.stdin.write_eof()  # the node's --exit-with-stdin: a clean stop
                try:
                    await asyncio.wait_for(asyncio.shield(node.tasks[-1]), STOP_GRACE)
                except asyncio.TimeoutError:
                    await node.conn.run(f"kill -KILL -- -{node.pid} {node.pid}", check=False,
                                        timeout=30)
                    await asyncio.wait_for(asyncio.shield(node.tasks[-1]), STOP_GRACE)
            for task in node.tasks:
                try:
                    await asyncio.wait_for(task, 5)
                except (asyncio.TimeoutError, Exception):
                    pass
            if node.directory and node.conn is not None:
                await node.conn.run(f"rm -rf {shlex.quote(node.directory)}", check=False, timeout=30)
        finally:
            if node.conn is not None:
                conn, node.conn = node.conn, None
                conn.close()
                await conn.wait_closed()
