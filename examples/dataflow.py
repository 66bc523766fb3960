"""Dataflow: the root runs first and its value flows to its children.

    python examples/dataflow.py
"""

import achilles
from achilles import dataflow


@dataflow
def fetch(x):
    return x * 10


@dataflow
def double(v):
    return v * 2


@dataflow
def negate(v):
    return -v


if __name__ == "__main__":
    with achilles.LocalCluster(nodes=1, processes=2) as cluster:
        flow = fetch(double(), negate())
        print(flow(1, cluster=cluster))          # {'double': 20, 'negate': -10}
        choose = fetch(lambda v: double() if v > 15 else negate())
        print(choose(1, cluster=cluster), choose(2, cluster=cluster))
