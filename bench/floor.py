"""The latency floor of a one-item call's route, with no Achilles code on it.

``python bench/floor.py`` times round trips of a 100-byte message along the route an
Achilles one-item ``map`` takes, built from the same parts (Twisted reactors, TCP on
127.0.0.1 with ``TCP_NODELAY``, length-prefixed frames, a thread hand-off and a pipe to a
worker process) but doing nothing else: no encoding, no authentication tags, no
scheduling. What a route costs here, an implementation along it cannot beat. Routes:

- ``relay``: caller thread -> ``callFromThread`` -> controller reactor -> relay process
  (Achilles' server) -> node reactor -> queue -> supervisor thread -> pipe -> worker
  process, and back the same way (Achilles' route until its node's reactor took over the
  worker pipes, ``00a61ea``);
- ``relay-reactor-pipe``: the same, but the node's reactor writes and reads the worker's
  pipe itself, with no supervisor thread (Achilles' route since);
- ``direct`` and ``direct-reactor-pipe``: the controller talks to the node with no relay.

In the same run it times ``multiprocessing.Pool(2).apply`` (the no-network bound) and, unless
``--no-achilles``, one-item ``map`` calls on ``achilles.LocalCluster(nodes=1, processes=2)``
(W5's shape). Every row runs once per round, in an order that rotates from round to round
(this machine's speed drifts by minutes); each row's line gives the p50 and p90 over all its
calls and the range of its rounds' p50s. Every route starts fresh processes, which end with it.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MESSAGE = b"x" * 100
ROUTES = ("relay", "relay-reactor-pipe", "direct", "direct-reactor-pipe")


def _framed(on_frame: Callable[[Any, bytes], None],
            on_connect: Optional[Callable[[Any], None]] = None) -> Any:
    """A factory of length-prefixed frame protocols with Nagle off."""
    from twisted.internet import protocol
    from twisted.protocols.basic import Int32StringReceiver

    class Framed(Int32StringReceiver):
        MAX_LENGTH = 1 << 20

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            if on_connect is not None:
                on_connect(self)

        def stringReceived(self, frame: bytes) -> None:
            on_frame(self, frame)

    factory = protocol.ClientFactory()  # listens as well as connects
    factory.protocol = Framed
    return factory


def _write_port(path: str, port: int) -> None:
    """Write ``port`` to ``path`` so that a reader never sees it half written."""
    with open(path + ".tmp", "w") as fh:
        fh.write(str(port))
    os.replace(path + ".tmp", path)


def _exit_with_stdin() -> None:
    """End this helper when its parent closes our stdin (or dies)."""
    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _relay(port_file: str) -> None:
    """The relay process: frames from the controller go to the node and back. Writes its
    port to ``port_file``, then ``port_file + ".node"`` once the node has said hello."""
    from twisted.internet import reactor

    peers: Dict[bytes, Any] = {}

    def on_frame(proto: Any, frame: bytes) -> None:
        if frame in (b"ctl", b"node"):
            peers[frame] = proto
            if frame == b"node":
                _write_port(port_file + ".node", 1)
            return
        (peers[b"node"] if proto is peers.get(b"ctl") else peers[b"ctl"]).sendString(frame)

    port = reactor.listenTCP(0, _framed(on_frame), interface="127.0.0.1")
    _write_port(port_file, port.getHost().port)
    reactor.run()


def _worker(read_fd: int, write_fd: int) -> None:
    while True:
        data = os.read(read_fd, 65536)
        if not data:
            os._exit(0)
        os.write(write_fd, data)


def _node(relay_port: int, reactor_pipe: bool, port_file: Optional[str]) -> None:
    """The node process: a forked worker behind a pipe, reached through a supervisor thread
    (or the reactor itself); connects to the relay, or listens when ``port_file`` is given."""
    from twisted.internet import reactor
    from twisted.internet.interfaces import IReadDescriptor
    from zope.interface import implementer

    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    if os.fork() == 0:
        os.close(to_worker_w)
        os.close(from_worker_r)
        _worker(to_worker_r, from_worker_w)
    os.close(to_worker_r)
    os.close(from_worker_w)
    peer: List[Any] = []
    if reactor_pipe:
        @implementer(IReadDescriptor)
        class WorkerPipe:
            def fileno(self) -> int:
                return from_worker_r

            def doRead(self) -> None:
                peer[0].sendString(os.read(from_worker_r, 65536))

            def connectionLost(self, reason: Any) -> None:
                pass

            def logPrefix(self) -> str:
                return "worker"

        reactor.callWhenRunning(reactor.addReader, WorkerPipe())

        def on_frame(proto: Any, frame: bytes) -> None:
            peer[:] = [proto]
            os.write(to_worker_w, frame)
    else:
        tasks: "queue.SimpleQueue[bytes]" = queue.SimpleQueue()

        def supervise() -> None:
            while True:
                os.write(to_worker_w, tasks.get())
                reactor.callFromThread(peer[0].sendString, os.read(from_worker_r, 65536))

        threading.Thread(target=supervise, daemon=True).start()

        def on_frame(proto: Any, frame: bytes) -> None:
            peer[:] = [proto]
            tasks.put(frame)
    if port_file is None:
        reactor.connectTCP("127.0.0.1", relay_port,
                           _framed(on_frame, lambda proto: proto.sendString(b"node")))
    else:
        port = reactor.listenTCP(0, _framed(on_frame), interface="127.0.0.1")
        _write_port(port_file, port.getHost().port)
    reactor.run()


def _spawn(*args: str) -> subprocess.Popen:
    """A helper process; it ends when its stdin closes (see :func:`_exit_with_stdin`)."""
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args],
                            stdin=subprocess.PIPE)


def _wait_port(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"helper process did not start (exit code {proc.poll()})")
        time.sleep(0.02)
    with open(path) as fh:
        return int(fh.read())


def _controller(port: int, calls: int, warmup: int, via_relay: bool) -> List[float]:
    """Round trips from a caller thread through a reactor thread, in a child process (each
    route gets a fresh reactor)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--role", "controller",
                          str(port), str(calls), str(warmup), str(via_relay)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [float(x) for x in out.split()]


def _controller_main(port: int, calls: int, warmup: int, via_relay: bool) -> None:
    from twisted.internet import reactor

    answers: "queue.SimpleQueue[bytes]" = queue.SimpleQueue()
    connected: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

    def on_connect(proto: Any) -> None:
        if via_relay:
            proto.sendString(b"ctl")
        connected.put(proto)

    reactor.connectTCP("127.0.0.1", port, _framed(lambda _, frame: answers.put(frame),
                                                   on_connect))
    threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                     daemon=True).start()
    proto = connected.get(timeout=10)  # "ctl" goes first on this connection
    times = []
    for i in range(warmup + calls):
        start = time.perf_counter()
        reactor.callFromThread(proto.sendString, MESSAGE)
        answers.get(timeout=10)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    print(" ".join(repr(t) for t in times))


def route(name: str, calls: int, warmup: int) -> List[float]:
    """Round-trip times (seconds) of ``calls`` messages along route ``name``."""
    reactor_pipe = name.endswith("reactor-pipe")
    procs: List[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if name.startswith("relay"):
                procs.append(_spawn("--role", "relay", os.path.join(tmp, "relay")))
                port = _wait_port(os.path.join(tmp, "relay"), procs[-1])
                procs.append(_spawn("--role", "node", str(port), str(reactor_pipe)))
                _wait_port(os.path.join(tmp, "relay.node"), procs[-1])  # the node said hello
                return _controller(port, calls, warmup, True)
            procs.append(_spawn("--role", "node", "0", str(reactor_pipe),
                                os.path.join(tmp, "node")))
            port = _wait_port(os.path.join(tmp, "node"), procs[-1])
            return _controller(port, calls, warmup, False)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                assert proc.stdin is not None
                proc.stdin.close()


def _noop(x: int) -> int:
    return x


def pool_times(calls: int, warmup: int) -> List[float]:
    """``multiprocessing.Pool(2).apply`` round trips."""
    times = []
    with multiprocessing.Pool(2) as pool:
        for i in range(warmup + calls):
            start = time.perf_counter()
            pool.apply(_noop, (i,))
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def achilles_times(calls: int, warmup: int) -> List[float]:
    """One-item ``map`` calls on a ``LocalCluster(nodes=1, processes=2)`` (W5's shape)."""
    import achilles
    from bench.run import square

    times = []
    with achilles.LocalCluster(nodes=1, processes=2) as cluster:
        for i in range(warmup + calls):
            start = time.perf_counter()
            cluster.map(square, [i])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def percentile(times: List[float], q: float) -> float:
    """The ``q`` quantile of ``times`` (0 < q < 1), nearest rank."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: List[str]) -> int:
    """Time every route, Pool and Achilles; print one line each."""
    if argv[:2] == ["--role", "relay"]:
        _exit_with_stdin()
        _relay(argv[2])
        return 0
    if argv[:2] == ["--role", "node"]:
        _exit_with_stdin()
        _node(int(argv[2]), argv[3] == "True", argv[4] if len(argv) > 4 else None)
        return 0
    if argv[:2] == ["--role", "controller"]:
        _controller_main(int(argv[2]), int(argv[3]), int(argv[4]), argv[5] == "True")
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000,
                   help="timed round trips per row and round (1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    p.add_argument("--warmup", type=int, default=200, help="untimed round trips first (200)")
    p.add_argument("--no-achilles", action="store_true", help="leave out the Achilles row")
    args = p.parse_args(argv)
    rows: List[Tuple[str, Callable[[int, int], List[float]]]] = [
        ("Pool(2).apply", pool_times)]
    rows += [(f"route {name}", functools.partial(route, name)) for name in ROUTES]
    if not args.no_achilles:
        rows.append(("Achilles one-item map", achilles_times))
    times: Dict[str, List[float]] = {label: [] for label, _ in rows}
    p50s: Dict[str, List[float]] = {label: [] for label, _ in rows}
    for r in range(args.rounds):
        shift = r % len(rows)
        for label, run in rows[shift:] + rows[:shift]:
            got = run(args.calls, args.warmup)
            times[label] += got
            p50s[label].append(percentile(got, 0.5))
    for label, _ in rows:
        print(f"{label:24s} p50 {percentile(times[label], 0.5) * 1e3:6.3f} ms  "
              f"p90 {percentile(times[label], 0.9) * 1e3:6.3f} ms  rounds' p50 "
              f"{min(p50s[label]) * 1e3:.3f}-{max(p50s[label]) * 1e3:.3f} ms  "
              f"({len(times[label])} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
