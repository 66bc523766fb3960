"""Task functions for tests/test_shm.py (importable by the nodes' workers)."""

from __future__ import annotations

import os
import time


def rotate(data: bytes) -> bytes:
    """``data`` rotated by one byte: a new object of the same size."""
    return data[1:] + data[:1]


def slow_rotate(arg: tuple) -> tuple:
    """``(index, rotate(data))`` after ``delay`` seconds, so a test can kill a node mid-job."""
    index, data, delay = arg
    time.sleep(delay)
    return index, rotate(data)


def data_size(arg: tuple) -> int:
    """The size of the item's data (its second element; the first may be anything, such as
    a marker that must never be unpickled)."""
    return len(arg[1])


def big_result(n: int) -> bytes:
    """``n`` bytes from a small argument (a large result, a small argument)."""
    return os.urandom(8) * (n // 8)


class Holder:
    """A result that says it is large (``__sizeof__``), so a worker tries to pickle it
    straight into a segment, and that holds ``what``."""

    def __init__(self, what: object) -> None:
        self.what = what

    def __sizeof__(self) -> int:
        return 1 << 20


def holding_lambda(n: int) -> Holder:
    """A Holder of a lambda: the C pickler refuses it, dill pickles it."""
    return Holder(lambda: n)


def holding_generator(n: int) -> Holder:
    """A Holder of a generator: neither pickle nor dill can pickle it."""
    return Holder(x for x in range(n))
