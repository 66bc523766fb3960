"""Task functions for tests/test_fast_credit.py (importable by the nodes' workers)."""

import os
import time


def gated(arg):
    """``(x, folder, first_gated)``: x squared; from item ``first_gated`` on, only once the
    file ``folder/open`` exists."""
    x, folder, first_gated = arg
    if x >= first_gated:
        gate = os.path.join(folder, "open")
        while not os.path.exists(gate):
            time.sleep(0.002)
    return x * x


def slow_then_gated(arg):
    """Like :func:`gated`, but the items before the gate each take 20 ms."""
    x, folder, first_gated = arg
    if x < first_gated:
        time.sleep(0.02)
    return gated(arg)


def shout(x):
    """Print a line naming ``x`` and return it."""
    print(f"line of item {x}")
    return x
