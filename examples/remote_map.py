"""map on a running cluster: the server and nodes are started elsewhere.

Terminal 1: achilles config        (once; copy the .env to every machine)
Terminal 1: achilles-server
Terminal 2: achilles-node
Terminal 3: python examples/remote_map.py     (from the folder holding .env)
"""

import achilles


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


if __name__ == "__main__":
    steps = achilles.map(collatz_steps, range(1, 100_001))
    best = max(range(len(steps)), key=steps.__getitem__)
    print(f"longest Collatz chain below 100,000 starts at {best + 1}: {steps[best]} steps")
    print(achilles.status())
