"""A stage pipeline in mpyx's spelling, distributed: a source stage, parallel copies, a
broadcast, meta travelling with each item, and teardown reporting once the input is drained.

    python examples/pipeline_mpyx.py
"""

import achilles
from achilles import EZ, As, F


class Frames(F):
    """Source stage: generates the items in setup (here: fake 'frames' of numbers)."""

    def setup(self, count):
        for n in range(count):
            self.meta["frame"] = n
            self.put(list(range(n, n + 4)))


class Scale(F):
    """Long-lived per copy: setup runs once in the copy's process (load a model here)."""

    def setup(self, factor):
        self.factor = factor

    def do(self, frame):
        self.put([v * self.factor for v in frame])


def total(frame):
    """Plain functions are stages too: the return value goes on (None: nothing)."""
    return ("sum", sum(frame))


def peak(frame):
    return ("max", max(frame))


class Label(F):
    """Last stage: reads the meta set by the source; teardown may still put."""

    def setup(self):
        self.seen = 0

    def do(self, result):
        self.seen += 1
        self.put((self.meta["frame"],) + result)

    def teardown(self):
        self.put(("label saw", self.seen))


if __name__ == "__main__":
    with achilles.LocalCluster(nodes=2, processes=2) as cluster:
        pipe = EZ(Frames(6), As(2, Scale, 10), {total, peak}, Label(), cluster=cluster,
                  ordered=True)
        print(sorted(s["name"] for s in pipe.graph()["stages"]))
        for row in sorted(pipe.list(), key=str):
            print(row)
