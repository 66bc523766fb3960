"""map / imap / imap_unordered on a local cluster (no configuration needed).

    python examples/local_map.py
"""

import time

import achilles


def slow_square(x: int) -> int:
    time.sleep(0.01)
    return x * x


if __name__ == "__main__":
    with achilles.LocalCluster(nodes=2, processes=2) as cluster:
        print(cluster.map(slow_square, range(20)))
        for value in cluster.imap(lambda x: x + 1, (i for i in range(5))):
            print("imap gave", value)
        print(sorted(cluster.imap_unordered(str, range(5))))
        print(cluster.status())
