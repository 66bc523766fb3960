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
