"""Two checkouts of Achilles timed in turns on the same work: did a change make maps faster?

``python bench/ab.py DIR_A DIR_B`` starts one process per checkout, each importing Achilles
from its own directory and running its own ``LocalCluster(nodes=1, processes=2)``, and lets
them take turns of ``--batch`` timed ``map`` calls (``--items`` items each, ``--chunksize``)
for ``--turns`` turns, the side going first alternating. On a machine whose speed drifts from
minute to minute, two runs minutes apart cannot show a change of a few per cent; turns of a
second or so can. It prints each side's p50, p90 and mean over all its calls, and per turn the
difference of the two sides' p50s: its median and in how many turns B was faster. The
default (one item per call) is W5's shape; ``--items 5000 --chunksize 1`` is D1's and
``--items 20000`` W1's small map.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import achilles
if not os.path.abspath(achilles.__file__).startswith(os.path.join(sys.argv[1], "")):
    sys.exit(f"achilles came from {achilles.__file__}, not from {sys.argv[1]}")
from bench.run import square
items = list(range(int(sys.argv[2])))
chunksize = None if sys.argv[3] == "None" else int(sys.argv[3])
with achilles.LocalCluster(nodes=1, processes=2) as cluster:
    for _ in range(int(sys.argv[4])):
        cluster.map(square, items, chunksize=chunksize)
    print("ready", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            cluster.map(square, items, chunksize=chunksize)
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)
"""


def percentile(times: List[float], q: float) -> float:
    """The ``q`` quantile of ``times`` (0 < q < 1), nearest rank."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(dirs: Dict[str, str], turns: int, batch: int, items: int,
        chunksize: Optional[int], warmup: int) -> Dict[str, List[List[float]]]:
    """Each side's call times, turn by turn."""
    procs = {side: subprocess.Popen([sys.executable, "-c", CHILD, os.path.abspath(d),
                                     str(items), str(chunksize), str(warmup)],
                                    cwd=d, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
             for side, d in dirs.items()}
    got: Dict[str, List[List[float]]] = {side: [] for side in dirs}
    try:
        for side, proc in procs.items():
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"side {side} ({dirs[side]}) did not start")
        for turn in range(turns):
            for side in ("A", "B") if turn % 2 == 0 else ("B", "A"):
                proc = procs[side]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"{batch}\n")
                proc.stdin.flush()
                got[side].append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return got


def main(argv: List[str]) -> int:
    """Time both checkouts in turns; print one line per side and the per-turn verdict."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="checkout A (the baseline)")
    p.add_argument("b", help="checkout B (the change)")
    p.add_argument("--turns", type=int, default=30, help="turns per side (30)")
    p.add_argument("--batch", type=int, default=50, help="timed calls per turn (50)")
    p.add_argument("--items", type=int, default=1, help="items per map (1)")
    p.add_argument("--chunksize", type=int, default=None, help="(the default chunking)")
    p.add_argument("--warmup", type=int, default=300, help="untimed maps first (300)")
    args = p.parse_args(argv)
    got = run({"A": args.a, "B": args.b}, args.turns, args.batch, args.items, args.chunksize,
              args.warmup)
    for side in ("A", "B"):
        times = [t for turn in got[side] for t in turn]
        print(f"{side} p50 {percentile(times, 0.5) * 1e3:.3f} ms  p90 "
              f"{percentile(times, 0.9) * 1e3:.3f} ms  mean {statistics.mean(times) * 1e3:.3f} ms"
              f"  ({len(times)} calls)")
    diffs = [statistics.median(b) - statistics.median(a) for a, b in zip(got["A"], got["B"])]
    faster = sum(1 for d in diffs if d < 0)
    print(f"B-A per turn: median {statistics.median(diffs) * 1e6:+.0f} us; B faster in {faster} "
          f"of {len(diffs)} turns")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
