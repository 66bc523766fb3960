"""Call-graph benchmark: a reduction tree of ~10,000 tiny tasks, Achilles vs dask.distributed.

``python bench/graphs.py`` builds the same binary reduction tree (``leaves`` leaf tasks, then
pairwise ``add`` up to one root: ``2 x leaves - 1`` tasks) with ``@achilles.task`` on a
``LocalCluster(nodes=1, processes=2)`` and with ``dask.delayed`` on a local
``distributed`` scheduler. dask has no "one worker of 2 processes", so both readings run:
two single-threaded worker processes, and one worker process with 2 threads; the ratio is
taken against the faster. It prints tasks per second for each (median of ``--repeat`` rounds,
after a warm-up). Target (issue 3): Achilles at least 2x dask's tasks per second. dask is
optional: without it only Achilles runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import achilles  # noqa: E402


def leaf(i: int) -> int:
    """A leaf task: returns its input."""
    return i


def add(a: int, b: int) -> int:
    """An inner task: adds its two inputs."""
    return a + b


def tree(make_leaf: Callable[[int], Any], make_add: Callable[[Any, Any], Any], leaves: int) -> Any:
    """Build a reduction tree from the two task constructors; return its root."""
    layer = [make_leaf(i) for i in range(leaves)]
    while len(layer) > 1:
        nxt = [make_add(layer[i], layer[i + 1]) for i in range(0, len(layer) - 1, 2)]
        if len(layer) % 2:
            nxt.append(layer[-1])
        layer = nxt
    return layer[0]


def run_achilles(leaves: int, repeat: int,
                 cpu: Optional[List[Dict[str, float]]] = None) -> List[float]:
    """Seconds per run of the tree on a local Achilles cluster; with ``cpu``, each run's CPU
    seconds per role (this process, the server, the node with its workers) are appended."""
    from bench.pipelines import CpuMeter

    t_leaf, t_add = achilles.task(leaf), achilles.task(add)
    times = []
    lc = achilles.LocalCluster(nodes=1, processes=2)
    with lc as cluster:
        assert cluster.compute(tree(t_leaf, t_add, 64)) == [sum(range(64))]  # warm-up
        meter = CpuMeter(lc)
        for _ in range(repeat):
            root = tree(t_leaf, t_add, leaves)
            meter.start()
            start = time.perf_counter()
            assert cluster.compute(root) == [sum(range(leaves))]
            times.append(time.perf_counter() - start)
            if cpu is not None:
                cpu.append(meter.stop())
    return times


def run_dask(leaves: int, repeat: int, workers: int, threads: int) -> Optional[List[float]]:
    """Seconds per run of the tree with dask.delayed on a local distributed cluster."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        return None
    times = []
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        d_leaf, d_add = dask.delayed(leaf, pure=False), dask.delayed(add, pure=False)
        assert client.compute(tree(d_leaf, d_add, 64)).result() == sum(range(64))
        for _ in range(repeat):
            root = tree(d_leaf, d_add, leaves)
            start = time.perf_counter()
            assert client.compute(root).result() == sum(range(leaves))
            times.append(time.perf_counter() - start)
    return times


def main(argv: Optional[List[str]] = None) -> int:
    """Run both sides and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=5000, help="leaf tasks (default 5000: 9,999 tasks)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per side (default 3)")
    parser.add_argument("--cpu", action="store_true",
                        help="also print Achilles' CPU per task by role (from /proc)")
    args = parser.parse_args(argv)
    tasks = 2 * args.leaves - 1
    print(f"$ python {' '.join(sys.argv)}")
    print(f"python {platform.python_version()}, {os.cpu_count()} cores; reduction tree of "
          f"{tasks} tasks, median of {args.repeat} rounds")
    results: Dict[str, float] = {}
    cpu: List[Dict[str, float]] = []
    ach = run_achilles(args.leaves, args.repeat, cpu)
    results["achilles"] = tasks / statistics.median(ach)
    if args.cpu:
        print("achilles CPU per task (median): " + ", ".join(
            f"{role} {statistics.median(run[role] for run in cpu) * 1e6 / tasks:.1f} us"
            for role in cpu[0]))
    for label, workers, threads in (("dask 2x1", 2, 1), ("dask 1x2", 1, 2)):
        dask_times = run_dask(args.leaves, args.repeat, workers, threads)
        if dask_times is not None:
            results[label] = tasks / statistics.median(dask_times)
    print(f"{'system':<32} {'tasks/s':>10}")
    labels = {"achilles": "achilles (1 node x 2 processes)",
              "dask 2x1": "dask (2 workers x 1 thread)", "dask 1x2": "dask (1 worker x 2 threads)"}
    for name, rate in results.items():
        print(f"{labels[name]:<32} {rate:>10,.0f}")
    dask_best = max((v for k, v in results.items() if k.startswith("dask")), default=None)
    if dask_best is not None:
        ratio = results["achilles"] / dask_best
        print(f"ratio achilles/dask: {ratio:.2f}x (target >= 2x: {'PASS' if ratio >= 2 else 'MISS'})")
        print("(against the faster dask layout)")
    else:
        print("dask.distributed is not installed (pip install 'dask[distributed]'); no comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
