"""Stage pipelines: Achilles against a chain of ``Pool.imap`` calls and pypeln, in one run.

``python bench/pipelines.py`` runs the same 4-stage pipeline (each stage burns ~2 ms of CPU per
item, the middle two as 2 copies: ``S, As(2, S), As(2, S), S``) over ``--items`` (10,000) ints:

- on ``achilles.LocalCluster(nodes=1, processes=2)`` (a real server and node on 127.0.0.1) with
  ``achilles.pipeline``;
- on one ``multiprocessing.Pool(2)`` as four chained ``imap`` calls (the no-network bound);
- with pypeln's process stages (``workers=1, 2, 2, 1``, bounded ``maxsize``), if installed
  (``pip install '.[bench]'``).

Ideal throughput, for this shape on 2 cores: the six stage copies (1 + 2 + 2 + 1) need 4 x 2 ms
= 8 ms of CPU per item in all, so 2 cores finish at most 2 / 8 ms = 250 items/s; the slowest
stage (a single copy, 2 ms per item) alone would allow 500 items/s; the ideal is the smaller,
250 items/s. The machinery's own CPU (messages, pickling, the server, the node) is not in the
ideal: it is what keeps a system below it. The busy loop spins on the process's CPU clock, so
each call costs 2 ms of CPU whatever else runs. On a shared machine the wall-clock figure says
more about the neighbours than about the pipeline, so each Achilles round also prints the CPU
that the caller, the server and the node tree (stage copies included) spent, and the
*efficiency*: the stages' useful work (items x 4 x 2 ms) over that total. That ratio depends
far less on the load (a crowded machine makes each message cost somewhat more CPU); on an
otherwise idle machine the throughput is at most efficiency x ideal. Each round also prints
how busy the machine was, to tell a slow system from a crowded machine. Printed: items/s, the
fraction of the ideal, and Achilles' ratio to each other system. ``--memory N`` instead
streams an N-item source stage (10,000,000 in the issue) through a trivial stage and prints
the RSS of the controller, the server and the node (with its stage processes) after the first
200,000 items and at their peak.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import achilles  # noqa: E402

COST = 0.002


def burn(seconds: float = COST) -> None:
    """Spin for ``seconds`` of this process's CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def work(x: int) -> int:
    """One stage's work on one item: ~2 ms of CPU."""
    burn()
    return x


class Work(achilles.Stage):
    """The same work as a Stage."""

    def do(self, x: int) -> None:
        burn()
        self.put(x)


class Count(achilles.Stage):
    """A source of ``n`` ints."""

    def setup(self, n: int) -> None:
        for i in range(n):
            self.put(i)


def trivial(x: int) -> int:
    return x & 7


def cpu_busy() -> float:
    """CPU seconds spent by the whole machine so far (all cores, from /proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_achilles(cluster: Any, items: int, batch: int) -> float:
    start = time.perf_counter()
    p = achilles.pipeline(range(items), Work(), achilles.As(2, Work), achilles.As(2, Work), Work(),
                          cluster=cluster, batch=batch)
    n = p.join()
    elapsed = time.perf_counter() - start
    assert n == items, n
    return items / elapsed


def run_pool(pool: Any, items: int, chunksize: int) -> float:
    start = time.perf_counter()
    it = pool.imap(work, range(items), chunksize)
    for _ in range(3):
        it = pool.imap(work, it, chunksize)
    n = sum(1 for _ in it)
    elapsed = time.perf_counter() - start
    assert n == items, n
    return items / elapsed


def run_pypeln(items: int) -> float:
    import pypeln as pl

    start = time.perf_counter()
    stage = pl.process.map(work, range(items), workers=1, maxsize=64)
    stage = pl.process.map(work, stage, workers=2, maxsize=64)
    stage = pl.process.map(work, stage, workers=2, maxsize=64)
    stage = pl.process.map(work, stage, workers=1, maxsize=64)
    n = sum(1 for _ in stage)
    elapsed = time.perf_counter() - start
    assert n == items, n
    return items / elapsed


def group_stats(pgid: int) -> Iterator[Tuple[int, List[str]]]:
    """``(pid, fields of /proc/PID/stat after the command name)`` of every process in group
    ``pgid``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().split(")")[-1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                yield int(entry), fields


def group_cpu(pgid: int) -> Dict[int, float]:
    """CPU seconds (user + system, with reaped children) of every process in group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    return {pid: sum(int(v) for v in fields[11:15]) / tick for pid, fields in group_stats(pgid)}


class CpuMeter:
    """CPU spent by the caller, the server and the node tree (stage copies, workers, the
    forkserver with the copies it reaped) between :meth:`start` and :meth:`stop`."""

    def __init__(self, lc: Any) -> None:
        self.lc = lc

    def _read(self) -> Dict[str, Dict[int, float]]:
        me = os.times()
        return {"caller": {0: me.user + me.system},
                "server": group_cpu(self.lc.server.pid),
                "node": group_cpu(self.lc.nodes[0].pid)}

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> Dict[str, float]:
        """CPU seconds per role since :meth:`start` (a process that ended uncounted is lost
        only if nobody reaped it, which the forkserver does)."""
        after = self._read()
        return {role: sum(after[role].values()) - sum(self.before[role].get(pid, 0.0)
                                                      for pid in after[role])
                for role in after}


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mib(pid: int) -> float:
    """RSS of ``pid`` and every process in its process group (the node's workers and stages)."""
    return sum(rss_mib(member) for member, _ in group_stats(pid))


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--memory", type=int, default=0,
                        help="instead: stream this many items from a source stage, print RSS")
    parser.add_argument("--skip", default="", help="comma-separated: pool,pypeln")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.memory:
        lc = achilles.LocalCluster(nodes=1, processes=2)
        with lc as cluster:
            me = os.getpid()
            start: Dict[str, float] = {}
            peak: Dict[str, float] = collections.Counter()
            t0 = time.perf_counter()
            n = 0
            for _ in achilles.pipeline(Count(args.memory), trivial, cluster=cluster,
                                       batch=max(args.batch, 1000)).items():
                n += 1
                if n % 200_000 == 0:
                    now = {"controller": rss_mib(me), "server": rss_mib(lc.server.pid),
                           "node": tree_rss_mib(lc.nodes[0].pid)}
                    start = start or now  # after 200,000 items: stage processes are up
                    for role, value in now.items():
                        peak[role] = max(peak[role], value)
            elapsed = time.perf_counter() - t0
            assert n == args.memory, n
            print(f"{n:,} items from a source stage through one stage in {elapsed:.1f} s "
                  f"({n / elapsed:,.0f} items/s)")
            for role in start:
                print(f"  {role:<10} RSS after 200,000 items {start[role]:6.1f} MiB  peak "
                      f"{peak[role]:6.1f} MiB  growth {peak[role] - start[role]:+.1f} MiB")
        return 0

    per_call = COST  # burn() spins on this process's CPU clock
    cores = len(os.sched_getaffinity(0))
    # Copies per stage 1, 2, 2, 1: a single copy bounds its stage; six copies use at most six cores.
    ideal = min(1 / per_call, min(cores, 6) / (4 * per_call))
    print(f"work(): {per_call * 1e3:.2f} ms of CPU per call; ideal {ideal:,.0f} items/s "
          f"(slowest stage {1 / per_call:,.0f}/s, {cores} cores "
          f"{min(cores, 6) / (4 * per_call):,.0f}/s); "
          f"{args.items:,} items, batch {args.batch}; load average {os.getloadavg()[0]:.1f}")
    figures: Dict[str, List[float]] = collections.defaultdict(list)
    runners: Dict[str, Callable[[], float]] = {}
    lc = achilles.LocalCluster(nodes=1, processes=2)
    cluster = lc.start()
    meter = CpuMeter(lc)
    efficiency: List[float] = []
    pool = multiprocessing.Pool(2)
    try:
        runners["achilles"] = lambda: run_achilles(cluster, args.items, args.batch)
        if "pool" not in skip:
            runners["pool"] = lambda: run_pool(pool, args.items, args.batch)
        if "pypeln" not in skip:
            try:
                import pypeln  # noqa: F401

                runners["pypeln"] = lambda: run_pypeln(args.items)
            except ImportError:
                print("pypeln is not installed (pip install '.[bench]'); skipped")
        run_achilles(cluster, 200, args.batch)  # warm up: code shipped, processes started
        for r in range(args.repeat):
            order = list(runners) if r % 2 == 0 else list(reversed(list(runners)))
            for name in order:
                busy0, t0 = cpu_busy(), time.perf_counter()
                if name == "achilles":
                    meter.start()
                figures[name].append(runners[name]())
                if name == "achilles":
                    spent = meter.stop()
                    total = sum(spent.values())
                    efficiency.append(args.items * 4 * COST / total)
                    print("  " + ", ".join(f"{role} {cpu:.2f} s" for role, cpu in spent.items())
                          + f" of CPU; stage work {args.items * 4 * COST:.2f} s: efficiency "
                          f"{efficiency[-1]:.1%}; machinery "
                          f"{(total - args.items * 4 * COST) / args.items * 1e6:,.0f} us/item")
                # Expected busy cores if nothing else ran: items x 4 stages x COST / wall time.
                wall = time.perf_counter() - t0
                used = (cpu_busy() - busy0) / wall
                ours = args.items * 4 * COST / wall
                print(f"  round {r + 1}: {name:<8} {figures[name][-1]:8,.1f} items/s "
                      f"(machine busy {used:.2f} cores, of which the stages' work {ours:.2f})",
                      flush=True)
    finally:
        pool.terminate()
        lc.stop()
    print(f"\n{'system':<10} {'items/s':>10} {'of ideal':>9} {'achilles/it':>12}")
    ach = statistics.median(figures["achilles"])
    for name, values in figures.items():
        v = statistics.median(values)
        print(f"{name:<10} {v:10,.1f} {v / ideal:9.1%} {ach / v:12.2f}")
    eff = statistics.median(efficiency)
    print(f"\nachilles CPU efficiency (stage work / CPU of caller, server and node tree): "
          f"{eff:.1%}; on an idle machine at most {eff * ideal:,.0f} items/s")
    print(f"target: achilles >= 85% of ideal: {'pass' if ach >= 0.85 * ideal else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
