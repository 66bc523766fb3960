"""``achilles demo``: a real job on a local cluster (server + node on loopback, no config)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, TextIO


def count_primes(limit: int) -> int:
    """CPU-bound work: the number of primes below ``limit`` (trial division)."""
    count = 0
    for n in range(2, limit):
        if all(n % d for d in range(2, int(n ** 0.5) + 1)):
            count += 1
    return count


def numbers(n: int) -> Iterator[int]:
    """A generator input, read lazily by the cluster."""
    for i in range(n):
        yield i


def keep_busy(cluster: Any, stop: threading.Event) -> None:
    """Run prime counts on ``cluster`` batch after batch until ``stop`` is set, so that the
    dashboard has a job to show."""
    while not stop.is_set():
        cluster.map(count_primes, [20_000 + 1_000 * i for i in range(16)], chunksize=1)


def run_demo(processes: Optional[int] = None, out: Callable[..., Any] = print, keep: bool = False,
             stdin: Optional[TextIO] = None) -> int:
    """Run the demo; returns a process exit code.

    With ``keep``, the cluster then stays up with a job running, until a line (Enter) or the
    end of ``stdin``, so the dashboard can be watched.
    """
    from achilles.local import LocalCluster

    started = time.perf_counter()
    local = LocalCluster(nodes=1, processes=processes)
    with local as cluster:
        status = cluster.status()
        node = status["nodes"][0]
        out(f"local cluster up in {time.perf_counter() - started:.2f} s: server on 127.0.0.1, "
            f"node {node['name']} with {node['processes']} processes")
        if local.dashboard_url:
            out(f"dashboard: {local.dashboard_url}")

        limits = [20_000 + 1_000 * i for i in range(16)]
        t = time.perf_counter()
        # On a terminal the map draws its progress bar (progress=True); in a pipe it does not.
        counts = cluster.map(count_primes, limits, progress=sys.stderr.isatty())
        out(f"map(count_primes, 16 limits) -> {counts[:4]} ... in {time.perf_counter() - t:.2f} s")
        expected = [count_primes(x) for x in limits[:2]]
        if counts[:2] != expected:
            out(f"wrong results: {counts[:2]} != {expected}")
            return 1

        t = time.perf_counter()
        first: Optional[float] = None
        total = 0
        for square in cluster.imap(lambda x: x * x, numbers(100_000)):
            if first is None:
                first = time.perf_counter() - t
            total += square
        assert first is not None
        out(f"imap(lambda x: x * x, generator of 100,000) -> sum {total}; first result after "
            f"{first * 1000:.1f} ms, all in {time.perf_counter() - t:.2f} s")
        if total != sum(x * x for x in range(100_000)):
            out("wrong sum")
            return 1
        if keep:
            stop = threading.Event()
            busy = threading.Thread(target=keep_busy, args=(cluster, stop), daemon=True)
            busy.start()
            out(f"the cluster stays up, counting primes, with its dashboard at "
                f"{local.dashboard_url}; press Enter to stop")
            (stdin or sys.stdin).readline()
            stop.set()
            busy.join()
    out(f"demo finished in {time.perf_counter() - started:.2f} s; cluster stopped")
    return 0
