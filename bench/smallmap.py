"""One small ``map`` many times: ``multiprocessing.Pool(2)`` against Achilles, alternating.

``python bench/smallmap.py`` times ``map(square, range(20000))`` (default chunksize) on a
``multiprocessing.Pool(2)`` and on an ``achilles.LocalCluster(nodes=1, processes=2)``, after
5 warm-up maps each, in ``--rounds`` alternating pairs (which side goes first alternates), and
prints each side's median and fastest time and the ratio of the medians (Pool / Achilles: 1.0
means as fast as Pool). One such map takes a few ms, so a single timing says more about the
machine than about either side; this is the shape of W1's 20,000-item row in ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import achilles  # noqa: E402
from bench.run import square, timed  # noqa: E402


def main(argv: List[str]) -> int:
    """Run the comparison and print one line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=20_000, help="input length (default 20000)")
    p.add_argument("--rounds", type=int, default=40, help="alternating pairs (default 40)")
    args = p.parse_args(argv)
    items = list(range(args.items))
    with multiprocessing.Pool(2) as pool, \
            achilles.LocalCluster(nodes=1, processes=2) as cluster:
        for _ in range(5):
            pool.map(square, items)
            cluster.map(square, items)
        on_pool: List[float] = []
        on_achilles: List[float] = []
        for i in range(args.rounds):
            sides = [(on_pool, pool.map), (on_achilles, cluster.map)]
            for out, run in (sides if i % 2 else sides[::-1]):
                out.append(timed(run, square, items)[0])
    mp, ma = statistics.median(on_pool), statistics.median(on_achilles)
    print(f"map(square, range({args.items:,})) x {args.rounds}: Pool median {mp * 1e3:.2f} ms "
          f"(fastest {min(on_pool) * 1e3:.2f}), Achilles median {ma * 1e3:.2f} ms (fastest "
          f"{min(on_achilles) * 1e3:.2f}); Achilles/Pool speed {mp / ma:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
