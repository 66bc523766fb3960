"""``SSHCluster``: a server on this machine and one node per host, started over SSH.

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
from typing import Any, Coroutine, Dict, Iterable, List, Optional, TypeVar, Union

import achilles
from achilles.core.errors import AchillesError, ConfigError
from achilles.launch.base import Launcher, LogSink, LogTail, print_log
from achilles.launch.hosts import HostSpec, parse_hosts

T = TypeVar("T")
STOP_GRACE = 10.0
MIN_PYTHON = (3, 9)

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


class RemoteNode:
    """One node on one host: its SSH connection, its process and its log."""

    def __init__(self, spec: HostSpec, name: str, sink: Optional[LogSink]) -> None:
        self.spec = spec
        self.name = name
        self.tail = LogTail(name, sink)
        self.conn: Any = None
        self.proc: Any = None
        self.pid: Optional[int] = None
        self.directory: Optional[str] = None
        self.exit_status: Optional[int] = None
        #: The client address the host's sshd saw (``$SSH_CONNECTION``).
        self.seen_from: Optional[str] = None
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


class SSHCluster(Launcher):
    """Start a server here and a node on each of ``hosts`` over SSH.

    ``hosts``: ``"host1,host2:8"`` or a list of such strings (``:N`` = worker processes,
    default: the host's CPU count; a host named twice gets two nodes). Each host's Python
    (``remote_python``, default ``python3``) must import the same Achilles version as here;
    every host is checked before anything starts. The cluster's ``.env`` (``env_file``, or a
    fresh private one) is copied to a private temporary folder on each host with mode 0600.
    Node log lines go to ``on_log(host, line)`` (default: ``[host] line`` on stderr).

    ``with SSHCluster(["alpha", "beta:4"]) as cluster: cluster.map(...)``; leaving the block
    (or :meth:`stop`) stops every node, removes the copied files and stops the server. Nodes
    also stop by themselves if this process dies (their SSH session ends).
    """

    kind = "ssh"

    def __init__(self, hosts: Union[str, Iterable[Union[str, HostSpec]]],
                 remote_python: str = "python3", env_file: Optional[str] = None, port: int = 0,
                 bind: str = "0.0.0.0", server_address: Optional[str] = None,
                 log_level: str = "WARNING", on_log: Optional[LogSink] = print_log,
                 start_timeout: Optional[float] = 120.0, connect_timeout: float = 30.0) -> None:
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
        self.nodes: List[RemoteNode] = []
        for spec in self.hosts:
            index = seen[spec.destination] = seen.get(spec.destination, -1) + 1
            name = spec.destination if counts[spec.destination] == 1 else f"{spec.destination}-{index}"
            self.nodes.append(RemoteNode(spec, name, on_log))
        self._loop: Optional[_Loop] = None

    def __repr__(self) -> str:
        return f"<SSHCluster port={self.port} hosts={[n.name for n in self.nodes]}>"

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
        results = await asyncio.gather(*(self._connect_and_check(n) for n in self.nodes),
                                       return_exceptions=True)
        problems = []
        for node, result in zip(self.nodes, results):
            if isinstance(result, BaseException):
                problems.append(f"  {node.name}: {result}")
        if problems:
            raise AchillesError("cannot start nodes on every host:\n" + "\n".join(problems))

    async def _connect_and_check(self, node: RemoteNode) -> None:
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

    def _env_text(self, directory: str, files: Dict[str, bytes]) -> bytes:
        """The cluster's .env, plus lines pointing TLS settings at the copies in ``directory``."""
        with open(self.env_file, "rb") as fh:
            text = fh.read()
        extra = []
        for field in ("tls_ca", "tls_client_cert", "tls_client_key"):
            path = getattr(self.settings, field)
            if path:
                with open(path, "rb") as fh:
                    files[field] = fh.read()
                extra.append(f"ACHILLES_{field.upper()}={directory}/{field}.pem")
        if extra:
            text = text.rstrip(b"\n") + b"\n" + "\n".join(extra).encode() + b"\n"
        return text

    async def _write_private(self, node: RemoteNode, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` on the host with mode 0600; the data goes through the
        session's stdin, never a command line."""
        q = shlex.quote(path)
        result = await node.conn.run(f"umask 077 && cat > {q} && chmod 600 {q}", input=data,
                                     encoding=None, check=False, timeout=60)
        if result.exit_status != 0:
            raise AchillesError(f"cannot write {path}: {result.stderr!r}")

    async def _start_one(self, node: RemoteNode) -> None:
        address = self.server_address or node.local_address()
        if not address:
            raise AchillesError("cannot tell which address of this machine the host reaches (it "
                                "is behind ProxyJump or address translation); pass "
                                "--server-address / server_address=")
        made = await node.conn.run('mktemp -d "${TMPDIR:-/tmp}/achilles-XXXXXXXX"', check=False,
                                   timeout=60)
        if made.exit_status != 0:
            raise AchillesError(f"cannot make a temporary folder: {str(made.stderr).strip()}")
        node.directory = directory = str(made.stdout).strip()
        files: Dict[str, bytes] = {}
        await self._write_private(node, f"{directory}/.env", self._env_text(directory, files))
        for field, data in files.items():
            await self._write_private(node, f"{directory}/{field}.pem", data)
        args = [self.remote_python, "-m", "achilles.node", "--host", address,
                "--port", str(self.port), "--name", node.name, "--log-level", self.log_level,
                "--exit-with-stdin"]
        if node.spec.processes:
            args += ["--processes", str(node.spec.processes)]
        q = shlex.quote
        command = (f"cd {q(directory)} && echo $$ && exec env ACHILLES_ENV_FILE={q(directory + '/.env')} "
                   + " ".join(q(a) for a in args))
        node.proc = await node.conn.create_process(command)
        first = await asyncio.wait_for(node.proc.stdout.readline(), 60)
        if not first.strip().isdigit():
            raise AchillesError(f"the node did not start: {first!r}")
        node.pid = int(first)
        node.tasks = [asyncio.ensure_future(self._pump(node.proc.stderr, node.tail)),
                      asyncio.ensure_future(self._pump(node.proc.stdout, node.tail)),
                      asyncio.ensure_future(self._watch(node))]

    @staticmethod
    async def _pump(stream: Any, tail: LogTail) -> None:
        async for line in stream:
            tail.add(str(line).rstrip("\n"))

    async def _watch(self, node: RemoteNode) -> None:
        await node.proc.wait(check=False)
        node.exit_status = node.proc.exit_status if node.proc.exit_status is not None else -1
        if not node.stopping:
            node.tail.add(f"node exited with status {node.exit_status}")

    def _node_problem(self) -> Optional[str]:
        for node in self.nodes:
            if node.exit_status is not None and not node.stopping:
                return (f"the node on {node.name} exited with status {node.exit_status}:\n"
                        f"{node.tail.text()[-2000:]}")
        return None

    # --- stop --------------------------------------------------------------------------------
    def _stop_nodes(self) -> None:
        if self._loop is None:
            return
        try:
            self._run(self._stop_all(), timeout=STOP_GRACE * 3 + 30)
        finally:
            self._loop.close()
            self._loop = None

    async def _stop_all(self) -> None:
        await asyncio.gather(*(self._stop_one(n) for n in self.nodes), return_exceptions=True)

    async def _stop_one(self, node: RemoteNode) -> None:
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
                node.conn.close()
                await node.conn.wait_closed()
