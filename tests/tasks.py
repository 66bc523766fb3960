"""Task functions used by the tests (importable by the nodes, which get the caller's sys.path)."""

import os
import time


def pause(seconds):
    """Simulated work: the one place where test tasks sleep."""
    time.sleep(seconds)


def delayed(seconds):
    """Return ``seconds`` after sleeping that long."""
    pause(seconds)
    return seconds


def square(x):
    return x * x


def add_one(x):
    return x + 1


def slow_square(x, delay=0.01):
    pause(delay)
    return x * x


def where(x):
    """Which node process ran the item."""
    pause(0.005)
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


def crash_once(arg):
    """Kill the worker process the first time an item runs (a marker file remembers)."""
    x, marker_dir = arg
    marker = os.path.join(marker_dir, f"crashed-{x}")
    if x % 50 == 7 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return x


def always_exit(x):
    if x == 5:
        os._exit(7)
    return x


def segfault(x):
    if x == 2:
        import ctypes
        ctypes.string_at(0)
    return x


def sleepy(x):
    pause(0.02)
    return x


def long_sleep(arg):
    """Announce the start (a file in the given folder), then run for a minute."""
    x, folder = arg
    open(os.path.join(folder, f"started-{x}"), "w").close()
    pause(60)
    return x


def record(path, line):
    """Append a line to a file (tasks use it to count their runs)."""
    with open(path, "a") as fh:
        fh.write(f"{line}\n")


def oom_killed(x):
    """Die the way the OOM killer kills: SIGKILL."""
    if x == 1:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def blob(n):
    """``n`` bytes."""
    return b"x" * n


def gated(arg):
    """Return item ``i`` once the test opens its gate: the file ``<gate_dir>/<i // step>``."""
    i, gate_dir, step = arg
    while not os.path.exists(os.path.join(gate_dir, str(i // step))):
        pause(0.01)
    return i
