"""What one server does with thousands of nodes: N simulated nodes in one process.

``python bench/swarm.py --nodes 1000,5000`` starts, for each size, a real ``achilles-server``
process on 127.0.0.1 and one *swarm* process holding N simulated nodes. Each simulated node is
a real TCP connection that speaks the real protocol through the same classes a node uses
(:class:`achilles.core.protocol.PeerSideProtocol`: the handshake, session-tagged frames,
heartbeats, ``NODE_READY`` and ``NODE_LOAD``), but runs no code: it answers each ``TASK`` with
a ``RESULT`` that echoes the task's payload (a chunk's pickled input list is also the pickled
result list of the identity function), at once or after ``--delay`` seconds. The controller
is the real library (``achilles.connect``) in this process. The figures:

- **connect**: seconds from the first connection until all N nodes are registered (the server's
  status lists them), with at most ``--window`` handshakes in flight, spread over loopback
  source addresses so no one source passes the server's pre-auth cap per source;
- **memory**: the server's resident memory (``VmRSS`` in ``/proc``) with N nodes, minus before;
- **idle**: the server's CPU (cores) over ``--idle`` seconds with N nodes and no work: the
  heartbeats both ways and the nodes' load reports;
- **status**: seconds and server CPU per ``status()`` call, and the reply's size; the same
  for the dashboard's ``/api/dashboard`` (the server runs its dashboard, as by default);
- **dispatch**: ``imap_unordered`` over ``--chunks`` items with ``chunksize=1``, every result
  checked to arrive exactly once; chunks per second of wall time, and server CPU seconds per
  chunk (so ``1 / cpu`` is what the server could do with a core to itself), and the CPU per
  chunk of the swarm process and of the controller (this process);
- with ``--delay D``: the same with every chunk taking D seconds on its node.

The swarm process raises its open-file limit to the hard limit; the server raises its own at
start. Other flags: ``--json PATH``, ``--processes`` (per simulated node), ``--heartbeat``.
Run ``python bench/swarm.py --help`` for all of them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

USERNAME = "swarm"
TICKS = os.sysconf("SC_CLK_TCK")
#: Handshakes one loopback source address may have in flight (the server's default cap is 32).
PER_SOURCE = 16
#: Seconds between two NODE_LOAD reports of one simulated node (as node/client.py sends).
LOAD_INTERVAL = 5.0


def identity(x: Any) -> Any:
    """The function the controller maps; simulated nodes never run it (they echo the input)."""
    return x


# --- /proc ----------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_cpu_seconds() -> float:
    """CPU seconds every core of this machine has spent busy (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:7]) - idle) / TICKS  # steal (field 8) is time this VM did not get


def raise_fd_limit(need: int) -> int:
    """Raise this process's soft open-file limit to the hard limit; return it. Raises
    SystemExit naming ``ulimit -Hn`` if even the hard limit is below ``need``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY and limit < need:
        raise SystemExit(f"this needs {need} open files but the hard limit is {limit}; raise it "
                         f"(ulimit -Hn {need} as root, or LimitNOFILE= in a systemd unit)")
    return limit


# --- the swarm process ----------------------------------------------------------------------
def run_swarm(host: str, port: int, secret: str, nodes: int, processes: int, delay: float,
              window: int, heartbeat: float, load_reports: bool) -> None:
    """Connect ``nodes`` simulated nodes and serve until stdin closes.

    Speaks JSON lines on stdout: ``{"event": "connected", ...}`` once all are authenticated,
    and a ``{"event": "stats", ...}`` line for each ``stats`` line read on stdin. ``drop K``
    on stdin aborts K node connections (the server must re-queue their chunks).
    """
    from twisted.internet import protocol, stdio
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver
    from twisted.python.failure import Failure

    from achilles.core import wire
    from achilles.core.gctune import settle as settle_gc
    from achilles.core.handshake import derive_key
    from achilles.core.protocol import PeerSideProtocol, handles
    from achilles.core.reactor import get_reactor, lean_events

    reactor = get_reactor()
    lean_events(reactor)
    raise_fd_limit(nodes + 64)
    key = derive_key(USERNAME, secret)
    hostname = socket.gethostname()
    pid = os.getpid()
    counts: Dict[str, int] = collections.Counter()
    seen: Dict[Tuple[str, int], int] = collections.Counter()
    live: Dict[int, "SwarmNode"] = {}
    started = time.perf_counter()
    state = {"in_flight": 0, "next": 0, "reported": False}
    sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(max(1, -(-window // PER_SOURCE)))]

    def out(obj: Dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    class SwarmNode(PeerSideProtocol):
        """One simulated node: real handshake and frames, echoes each TASK's payload."""

        local_role = "node"

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index
            self.username = USERNAME
            self.auth_key = key
            self.heartbeat = heartbeat
            self.jobs: Dict[str, int] = {}
            self.pending: Dict[Tuple[str, int], Any] = {}
            self.counted = False
            self._load: Optional[LoopingCall] = None

        def on_authenticated(self) -> None:
            live[self.index] = self
            self.send(wire.NODE_READY, f"swarm-{self.index}", processes, hostname, pid, {})
            if load_reports:
                self._load = LoopingCall(self.send, wire.NODE_LOAD, 0.0, processes, 0, 0)
                # stagger the reports as independent machines would be
                reactor.callLater(LOAD_INTERVAL * (self.index % 997) / 997, self._start_load)
            handshake_over(self, True)

        def _start_load(self) -> None:
            if self._load is not None and self.state == "ready":
                self._load.start(LOAD_INTERVAL)

        def on_closed(self, reason: Failure) -> None:
            if self._load is not None and self._load.running:
                self._load.stop()
            for call in self.pending.values():
                if call.active():
                    call.cancel()
            self.pending.clear()
            if live.pop(self.index, None) is not None:
                counts["lost"] += 1
            else:
                handshake_over(self, False)

        @handles(wire.SHM_PROBE)
        def shm_probe(self, name: str, digest: bytes) -> None:
            self.send(wire.SHM_OK, False)  # a simulated node shares no memory: bytes only

        @handles(wire.JOB_CODE)
        def job_code(self, job_id: str, func_bytes: bytes, callback_bytes: bytes,
                     options: Dict[str, Any]) -> None:
            self.jobs[job_id] = 1
            counts["job_code"] += 1

        @handles(wire.TASK)
        def task(self, job_id: str, chunk_id: int, careful: bool, timeout: Optional[float],
                 payload: bytes) -> None:
            counts["tasks"] += 1
            seen[(job_id, chunk_id)] += 1
            if job_id not in self.jobs:
                counts["task_without_code"] += 1
            if delay > 0:
                self.pending[(job_id, chunk_id)] = reactor.callLater(
                    delay, self.answer, job_id, chunk_id, bytes(payload))
            else:
                self.answer(job_id, chunk_id, payload)

        def answer(self, job_id: str, chunk_id: int, payload: bytes) -> None:
            """Send the chunk's result: its own payload, as the identity function's."""
            self.pending.pop((job_id, chunk_id), None)
            counts["results"] += 1
            self.send(wire.RESULT, job_id, chunk_id, wire.OK, delay, f"swarm-{self.index}", payload)

        @handles(wire.CANCEL)
        def cancel(self, job_id: str, reason: str) -> None:
            self.jobs.pop(job_id, None)
            for k in [k for k in self.pending if k[0] == job_id]:
                self.pending.pop(k).cancel()

        @handles(wire.JOB_DONE)
        def job_done(self, job_ids: List[str]) -> None:
            for job_id in job_ids:
                self.jobs.pop(job_id, None)

        @handles(wire.SHUTDOWN)
        def shutdown(self, reason: str) -> None:
            self.link.loseConnection()

    class Factory(protocol.ClientFactory):
        def __init__(self, index: int) -> None:
            self.index = index

        def buildProtocol(self, addr: Any) -> SwarmNode:  # type: ignore[override]
            return SwarmNode(self.index)

        def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
            counts["connect_failed"] += 1
            state["in_flight"] -= 1
            retry(self.index)

    retry_queue: collections.deque = collections.deque()

    def retry(index: int) -> None:
        retry_queue.append(index)
        reactor.callLater(0.05, connect_more)

    def handshake_over(node: SwarmNode, ok: bool) -> None:
        if node.counted:
            return
        node.counted = True
        state["in_flight"] -= 1
        if not ok:
            counts["handshake_failed"] += 1
            retry(node.index)
            return
        counts["connected"] += 1
        if counts["connected"] == nodes and not state["reported"]:
            state["reported"] = True
            out({"event": "connected", "nodes": nodes,
                 "seconds": time.perf_counter() - started, "retries": counts["handshake_failed"]
                 + counts["connect_failed"]})
        connect_more()

    def connect_more() -> None:
        while state["in_flight"] < window and (retry_queue or state["next"] < nodes):
            if retry_queue:
                index = retry_queue.popleft()
            else:
                index = state["next"]
                state["next"] += 1
            state["in_flight"] += 1
            reactor.connectTCP(host, port, Factory(index), timeout=30,
                               bindAddress=(sources[index % len(sources)], 0))

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            words = line.decode().split()
            if words[:1] == ["stats"]:
                dup = sum(1 for n in seen.values() if n > 1)
                out({"event": "stats", "live": len(live), "duplicate_tasks": dup,
                     "pending": sum(len(n.pending) for n in live.values()), **counts})
            elif words[:1] == ["drop"]:
                # Drop nodes that hold chunks; wait (up to 10 s) until enough of them do, since
                # how many hold one at an instant moves with the controller's window (and falls
                # to none while the caller stops reading: keep reading while this runs).
                wanted, give_up = int(words[1]), time.monotonic() + 10

                def drop() -> None:
                    holding = [n for n in live.values() if n.pending]
                    if len(holding) < wanted and time.monotonic() < give_up:
                        reactor.callLater(0.002, drop)
                        return
                    victims = holding[:wanted]
                    for n in victims:
                        n.link.abortConnection()
                    out({"event": "dropped", "nodes": len(victims)})

                drop()
            elif words[:1] == ["forget"]:
                seen.clear()
                counts.clear()
                counts["connected"] = len(live)

        def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands())
    reactor.callWhenRunning(connect_more)
    settle_gc()  # as a node's reactor process does
    reactor.run()


# --- the orchestrator -----------------------------------------------------------------------
class Swarm:
    """A real server process and a swarm process of ``nodes`` simulated nodes, both stopped
    (whole process groups) on exit. Use as a context manager."""

    def __init__(self, nodes: int, processes: int = 1, delay: float = 0.0, window: int = 64,
                 heartbeat: float = 10.0, prefetch: int = 2, load_reports: bool = True,
                 node_heartbeat: Optional[float] = None,
                 log_level: str = "WARNING", profile: Optional[str] = None) -> None:
        self.profile = profile
        self.nodes = nodes
        self.processes = processes
        self.delay = delay
        self.window = window
        self.heartbeat = heartbeat
        #: The simulated nodes' heartbeat (default: the server's).
        self.node_heartbeat = heartbeat if node_heartbeat is None else node_heartbeat
        self.prefetch = prefetch
        self.load_reports = load_reports
        self.log_level = log_level
        self.secret = secrets.token_urlsafe(32)
        self.dir = tempfile.mkdtemp(prefix="achilles-swarm-")
        self.server: Optional[subprocess.Popen] = None
        self.swarm: Optional[subprocess.Popen] = None
        self.port = 0
        self.cluster: Any = None

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in sys.path if p])
        env["ACHILLES_SECRET_KEY"] = self.secret
        env["ACHILLES_USERNAME"] = USERNAME
        env["ACHILLES_HEARTBEAT"] = str(self.heartbeat)
        env["ACHILLES_PREFETCH"] = str(self.prefetch)
        env["ACHILLES_DASHBOARD"] = "127.0.0.1:0"  # on, as by default, on a free port
        env.pop("ACHILLES_ENV_FILE", None)
        return env

    def start_server(self) -> int:
        """Start the server; return its pid once it listens."""
        port_file = os.path.join(self.dir, "port")
        self.dashboard_file = os.path.join(self.dir, "dashboard")
        log = open(os.path.join(self.dir, "server.log"), "wb")
        profiler = ["-m", "cProfile", "-o", self.profile] if self.profile else []
        self.server = subprocess.Popen(
            [sys.executable, *profiler, "-m", "achilles.server", "--host", "127.0.0.1", "--port", "0",
             "--port-file", port_file, "--dashboard-url-file", self.dashboard_file,
             "--log-level", self.log_level, "--exit-with-stdin"],
            env=self._env(), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + 30
        while not os.path.exists(port_file):
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + self.server_log())
            time.sleep(0.02)
        with open(port_file) as fh:
            self.port = int(fh.read())
        return self.server.pid

    def dashboard_get(self, path: str) -> bytes:
        """GET ``path`` from the server's dashboard (on loopback: no token needed)."""
        import urllib.request

        with open(self.dashboard_file) as fh:
            base = fh.read().strip().split("?")[0].rstrip("/")
        with urllib.request.urlopen(base + path, timeout=60) as reply:
            return reply.read()

    def server_log(self) -> str:
        """What the server logged."""
        with open(os.path.join(self.dir, "server.log"), errors="replace") as fh:
            return fh.read()

    def connect_controller(self) -> Any:
        """A real controller (``achilles.connect``) on the server."""
        import achilles

        self.cluster = achilles.connect(host="127.0.0.1", port=self.port, username=USERNAME,
                                        secret_key=self.secret)
        return self.cluster

    def start_swarm(self) -> Dict[str, Any]:
        """Start the swarm process and wait until every node is registered with the server;
        return the swarm's ``connected`` report plus ``registered_seconds`` (until the server's
        status lists all of them)."""
        start = time.perf_counter()
        self.swarm = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "_swarm", "--port", str(self.port),
             "--nodes", str(self.nodes), "--processes", str(self.processes),
             "--delay", str(self.delay), "--window", str(self.window),
             "--heartbeat", str(self.node_heartbeat)]
            + ([] if self.load_reports else ["--no-load"]),
            env=self._env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(os.path.join(self.dir, "swarm.log"), "wb"), start_new_session=True,
            text=True, bufsize=1)
        report = self.read_event("connected", timeout=120 + self.nodes / 50)
        while len(self.cluster.status()["nodes"]) < self.nodes:
            time.sleep(0.05)
        report["registered_seconds"] = time.perf_counter() - start
        return report

    def read_event(self, event: str, timeout: float = 60.0) -> Dict[str, Any]:
        """The next JSON line from the swarm with this ``event``."""
        assert self.swarm is not None and self.swarm.stdout is not None
        import select

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.swarm.stdout], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"no {event!r} from the swarm within {timeout:g} s")
            line = self.swarm.stdout.readline()
            if not line:
                raise RuntimeError(f"the swarm exited (code {self.swarm.poll()}):\n"
                                   + open(os.path.join(self.dir, "swarm.log")).read()[-3000:])
            obj = json.loads(line)
            if obj.get("event") == event:
                return obj

    def command(self, line: str, reply: str) -> Dict[str, Any]:
        """Send a command line to the swarm and return its reply event."""
        assert self.swarm is not None and self.swarm.stdin is not None
        self.swarm.stdin.write(line + "\n")
        self.swarm.stdin.flush()
        return self.read_event(reply)

    def __enter__(self) -> "Swarm":
        try:
            self.start_server()
            self.connect_controller()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def pids(self) -> List[int]:
        """Process group ids this swarm started."""
        return [p.pid for p in (self.server, self.swarm) if p is not None]

    def stop(self) -> None:
        """Close the controller and stop both processes (and their groups)."""
        if self.cluster is not None:
            try:
                self.cluster.close()
            except Exception:
                pass
            self.cluster = None
        for proc in (self.swarm, self.server):
            if proc is None:
                continue
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()


def dispatch_run(sw: Swarm, chunks: int) -> Dict[str, Any]:
    """Map ``chunks`` items at chunksize 1; check each result arrives exactly once; return
    rate and server CPU."""
    assert sw.server is not None and sw.swarm is not None
    ours = [sw.server.pid, sw.swarm.pid, os.getpid()]
    before_cpu = cpu_seconds(sw.server.pid)
    before = [cpu_seconds(p) for p in ours]
    before_ours = sum(before)
    before_all = machine_cpu_seconds()
    start = time.perf_counter()
    results = list(sw.cluster.imap_unordered(identity, range(chunks), chunksize=1))
    wall = time.perf_counter() - start
    cpu = cpu_seconds(sw.server.pid) - before_cpu
    after = [cpu_seconds(p) for p in ours]
    others = (machine_cpu_seconds() - before_all) - (sum(after) - before_ours)
    counts = collections.Counter(results)
    missing = chunks - len(counts)
    twice = sum(1 for n in counts.values() if n > 1)
    if missing or twice or set(counts) != set(range(chunks)):
        raise AssertionError(f"{missing} results missing, {twice} delivered more than once")
    return {"chunks": chunks, "seconds": wall, "per_second": chunks / wall,
            "server_cpu": cpu, "server_cpu_per_chunk_us": cpu / chunks * 1e6,
            "server_busy": cpu / wall, "swarm_busy": (after[1] - before[1]) / wall,
            "controller_busy": (after[2] - before[2]) / wall,
            "swarm_cpu_per_chunk_us": (after[1] - before[1]) / chunks * 1e6,
            "controller_cpu_per_chunk_us": (after[2] - before[2]) / chunks * 1e6,
            "other_processes_cores": max(0.0, others / wall)}


def measure(nodes: int, chunks: int, idle: float, status_calls: int, processes: int,
            delay_chunks: int, delay: float, window: int, heartbeat: float,
            load_reports: bool = True) -> Dict[str, Any]:
    """Every figure for one swarm size (see the module docstring)."""
    out: Dict[str, Any] = {"nodes": nodes}
    with Swarm(nodes, processes=processes, window=window, heartbeat=heartbeat,
               delay=0.0, load_reports=load_reports) as sw:
        assert sw.server is not None
        time.sleep(0.5)
        base = rss_bytes(sw.server.pid)
        connect = sw.start_swarm()
        out["connect_seconds"] = connect["seconds"]
        out["registered_seconds"] = connect["registered_seconds"]
        out["connect_retries"] = connect["retries"]
        time.sleep(1.0)
        rss = rss_bytes(sw.server.pid)
        out["server_rss_base_mib"] = base / 2 ** 20
        out["server_rss_mib"] = rss / 2 ** 20
        out["rss_per_node_kib"] = (rss - base) / nodes / 1024
        # idle: heartbeats and load reports only
        c0, t0 = cpu_seconds(sw.server.pid), time.perf_counter()
        time.sleep(idle)
        out["idle_server_cores"] = (cpu_seconds(sw.server.pid) - c0) / (time.perf_counter() - t0)
        # status
        times = []
        c0 = cpu_seconds(sw.server.pid)
        for _ in range(status_calls):
            t = time.perf_counter()
            st = sw.cluster.status()
            times.append(time.perf_counter() - t)
        out["status_ms"] = statistics.median(times) * 1e3
        out["status_server_cpu_ms"] = (cpu_seconds(sw.server.pid) - c0) / status_calls * 1e3
        out["status_bytes"] = len(json.dumps(st))
        assert len(st["nodes"]) == nodes
        # the dashboard's poll (what an open page without event stream asks every tick)
        times = []
        c0 = cpu_seconds(sw.server.pid)
        for _ in range(status_calls):
            t = time.perf_counter()
            page = sw.dashboard_get("/api/dashboard")
            times.append(time.perf_counter() - t)
        out["dashboard_ms"] = statistics.median(times) * 1e3
        out["dashboard_server_cpu_ms"] = (cpu_seconds(sw.server.pid) - c0) / status_calls * 1e3
        out["dashboard_bytes"] = len(page)
        # dispatch, answered at once
        dispatch_run(sw, min(chunks, 2000))  # warm-up
        d = out["dispatch"] = dispatch_run(sw, chunks)
        # the heartbeats and load reports go on during the run: take the idle cost out
        d["server_cpu_net_us"] = max(0.0, d["server_cpu"] - out["idle_server_cores"]
                                     * d["seconds"]) / chunks * 1e6
        out["server_rss_after_mib"] = rss_bytes(sw.server.pid) / 2 ** 20
        stats = sw.command("stats", "stats")
        out["swarm_duplicate_tasks"] = stats["duplicate_tasks"]
        out["lost_nodes"] = stats.get("lost", 0)
    if delay_chunks and delay > 0:
        with Swarm(nodes, processes=processes, window=window, heartbeat=heartbeat,
                   delay=delay) as sw:
            sw.start_swarm()
            out["delayed"] = dict(dispatch_run(sw, delay_chunks), delay=delay)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the measurements and print a table (or, with ``_swarm``, be the swarm process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_swarm"]:
        p = argparse.ArgumentParser()
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--nodes", type=int, required=True)
        p.add_argument("--processes", type=int, default=1)
        p.add_argument("--delay", type=float, default=0.0)
        p.add_argument("--window", type=int, default=64)
        p.add_argument("--heartbeat", type=float, default=10.0)
        p.add_argument("--no-load", action="store_true")
        a = p.parse_args(argv[1:])
        run_swarm("127.0.0.1", a.port, os.environ["ACHILLES_SECRET_KEY"], a.nodes, a.processes,
                  a.delay, a.window, a.heartbeat, not a.no_load)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1000,5000", help="swarm sizes (default 1000,5000)")
    parser.add_argument("--chunks", type=int, default=50000,
                        help="items mapped at chunksize 1 per size (default 50,000)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    parser.add_argument("--status-calls", type=int, default=20)
    parser.add_argument("--processes", type=int, default=1, help="processes per simulated node")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="also run with nodes answering after this many seconds")
    parser.add_argument("--delay-chunks", type=int, default=20000)
    parser.add_argument("--window", type=int, default=64, help="handshakes in flight at once")
    parser.add_argument("--heartbeat", type=float, default=10.0,
                        help="ACHILLES_HEARTBEAT of the server and the simulated nodes")
    parser.add_argument("--no-load-reports", action="store_true",
                        help="simulated nodes send no NODE_LOAD (with a long --heartbeat: the "
                             "server's CPU is dispatch alone)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    raise_fd_limit(64)
    rows = []
    for n in (int(s) for s in args.nodes.split(",")):
        row = measure(n, args.chunks, args.idle, args.status_calls, args.processes,
                      args.delay_chunks, args.delay, args.window, args.heartbeat,
                      not args.no_load_reports)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'nodes':>6} {'connect s':>9} {'KiB/node':>8} {'idle cores':>10} {'status ms':>9} "
          f"{'dash ms':>7} {'chunks/s':>9} {'srv us/chunk':>12} {'net of idle':>11} {'srv busy':>8} "
          f"{'swarm us':>8} {'ctl us':>6} {'others':>6}")
    for r in rows:
        d = r["dispatch"]
        print(f"{r['nodes']:>6} {r['registered_seconds']:>9.2f} {r['rss_per_node_kib']:>8.1f} "
              f"{r['idle_server_cores']:>10.3f} {r['status_ms']:>9.1f} {r['dashboard_ms']:>7.1f} "
              f"{d['per_second']:>9,.0f} "
              f"{d['server_cpu_per_chunk_us']:>12.1f} {d['server_cpu_net_us']:>11.1f} "
              f"{d['server_busy']:>8.2f} {d['swarm_cpu_per_chunk_us']:>8.1f} "
              f"{d['controller_cpu_per_chunk_us']:>6.1f} {d['other_processes_cores']:>6.2f}")
        if "delayed" in r:
            dd = r["delayed"]
            print(f"{'':>6} with {dd['delay'] * 1e3:g} ms per chunk: {dd['per_second']:,.0f} "
                  f"chunks/s, server busy {dd['server_busy']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
