"""Task functions that print and log, for tests/test_output.py (importable by the nodes)."""

import logging
import os
import sys

from tasks import TaskFailure, pause


def chatty(x):
    """One line to each of stdout, stderr and the log; returns ``x``."""
    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    logging.getLogger("chatty").warning("log %s", x)
    return x


def tagged(arg):
    """Print a line naming the caller's tag and the item, after a little simulated work."""
    tag, x = arg
    pause(0.01)
    print(f"marker {tag}-{x}")
    return x


def flood(n):
    """Print ``n`` lines in a tight loop."""
    for i in range(n):
        print(f"flood line {i}")
    return n


def flood_then_fail(n):
    """Print ``n`` lines in a tight loop, then fail."""
    flood(n)
    raise TaskFailure(f"failed after {n} lines")


def steps_then_fail(x):
    """Print 30 numbered steps (more than the tail keeps), then fail on item 2."""
    for i in range(30):
        print(f"item {x} step {i}")
    if x == 2:
        raise TaskFailure(f"item {x} failed")
    return x


def last_words_then_die(x):
    """Print (flushed) a line, then kill the worker process."""
    print(f"last words of {x}", flush=True)
    os._exit(3)


def odd_writers(x):
    """Write through sys.stdout.buffer, without newlines, and as a redrawn progress line."""
    sys.stdout.buffer.write(f"bytes {x}\n".encode())
    sys.stdout.write("no ")
    sys.stdout.write("newline")
    print(f"\rbar 10%\rbar 100%", file=sys.stderr)
    return x
