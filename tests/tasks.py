"""Task functions used by the tests (importable by the nodes, which get the caller's sys.path)."""

import os
import time


def square(x):
    return x * x


def add_one(x):
    return x + 1


def slow_square(x, delay=0.01):
    time.sleep(delay)
    return x * x


def where(x):
    """Which node process ran the item."""
    time.sleep(0.005)
    return os.getpid()


class TaskFailure(Exception):
    """A user-defined exception type that must reach the caller as itself."""


def fail_on_three(x):
    if x == 3:
        raise TaskFailure(f"item {x} is bad")
    return x


class TwoArgError(Exception):
    """Cannot be unpickled: pickle calls it with one argument."""

    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def unpicklable_error(x):
    raise TwoArgError("cannot be", "rebuilt")
