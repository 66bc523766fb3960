"""Many real nodes on one machine: efficiency of a sleep-bound map.

``python bench/realnodes.py`` starts ``LocalCluster(nodes=64, processes=1)`` (a real server and
64 real node daemons, one worker process each) and maps a function that sleeps ``--seconds``
(0.1) over ``--items`` (1,280) items, ``--repeat`` (3) times. Efficiency = ideal wall time
(items x seconds / worker processes) / measured wall time; the median is printed. Sleeping
tasks need no CPU, so on a small machine this measures what the cluster adds: scheduling,
messages and the nodes' own overhead, not the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def nap(x: Any, seconds: float = 0.1) -> Any:
    """Sleep, then return ``x``."""
    time.sleep(seconds)
    return x


def measure(nodes: int, items: int, seconds: float, repeat: int,
            chunksize: Optional[int]) -> Dict[str, Any]:
    """Start the cluster once, then time ``repeat`` maps; return every figure."""
    import functools

    import achilles

    start = time.perf_counter()
    with achilles.LocalCluster(nodes=nodes, processes=1) as cluster:
        started = time.perf_counter() - start
        func = functools.partial(nap, seconds=seconds)
        cluster.map(func, range(nodes * 2), chunksize=1)  # warm-up: every node has the code
        runs: List[float] = []
        for _ in range(repeat):
            t = time.perf_counter()
            result = cluster.map(func, range(items), chunksize=chunksize)
            runs.append(time.perf_counter() - t)
            assert result == list(range(items)), "wrong results"
    ideal = items * seconds / nodes
    return {"nodes": nodes, "items": items, "seconds_per_item": seconds, "chunksize": chunksize,
            "start_seconds": started, "ideal_seconds": ideal, "runs": runs,
            "efficiency": [ideal / r for r in runs],
            "median_efficiency": ideal / statistics.median(runs)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the efficiency of each run and the median."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--items", type=int, default=1280)
    parser.add_argument("--seconds", type=float, default=0.1, help="sleep per item")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunksize", type=int, default=None, help="default: automatic")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    out = measure(args.nodes, args.items, args.seconds, args.repeat, args.chunksize)
    print(f"{args.nodes} nodes x 1 process, {args.items} sleeps of {args.seconds:g} s "
          f"(ideal {out['ideal_seconds']:.2f} s; cluster started in {out['start_seconds']:.1f} s)")
    for run, eff in zip(out["runs"], out["efficiency"]):
        print(f"  {run:.3f} s  efficiency {eff:.3f}")
    print(f"median efficiency {out['median_efficiency']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
