"""Call graphs: nested task calls run in dependency order across the cluster.

    python examples/call_graph.py
"""

import json

import achilles
from achilles import task, workflow


@task
def num(n):
    return n


@task
def add(a, b):
    return a + b


@task(timeout=5, retries=1)
def total(values):
    return sum(values)


@workflow
def pairs(n):
    return [add(num(i), num(i + 1)) for i in range(n)]


if __name__ == "__main__":
    with achilles.LocalCluster(nodes=1, processes=2) as cluster:
        g = add(add(num(6), num(1)), add(num(5), num(-2)))
        print("add(add(6, 1), add(5, -2)) =", g.result(cluster))
        shared = num(21)
        print("a shared input runs once:", cluster.compute(add(shared, shared)))
        print("fan-in over 100 pairs:", cluster.compute(total(pairs(100))))
        future = cluster.submit(pow, 2, 100)
        print("submit(pow, 2, 100) ->", future.result())
        print(json.dumps(g.graph(), indent=1)[:400], "...")
