"""A pipeline over a lazy input iterable: errors collected alongside results, a stage that
skips bad items, ordered output, and the live queue view of watch().

    python examples/pipeline_errors.py
"""

import math
import sys

import achilles


class Parse(achilles.Stage):
    on_error = "skip"  # unparsable lines are logged on the node and counted

    def do(self, line):
        self.put(float(line))


class Root(achilles.Stage):
    on_error = "collect"  # errors come out of items() as achilles.StageError

    def do(self, x):
        self.put(math.sqrt(x))


def lines():
    for text in ["4", "x", "9", "-1", "16", "?", "25"]:
        yield text


if __name__ == "__main__":
    with achilles.LocalCluster(nodes=1, processes=2) as cluster:
        pipe = achilles.pipeline(lines, Parse(), achilles.As(2, Root), cluster=cluster,
                                 ordered=True)
        pipe.watch(interval=0.5, file=sys.stderr)
        for out in pipe.items():
            if isinstance(out, achilles.StageError):
                print("error in", out.stage, type(out.exception).__name__, out.item)
            else:
                print("result", out)
        print("skipped", pipe.stats["stages"][0]["skipped"])
