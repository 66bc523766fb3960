"""Task functions for tests/test_pool_options.py (importable by the nodes)."""

import os
import uuid

from tasks import pause

_STATE = {}


def init_worker(log_dir, tag):
    """An initializer: remembers ``tag`` in this process and leaves one file per call."""
    _STATE["tag"] = tag
    with open(os.path.join(log_dir, f"{os.getpid()}-{uuid.uuid4().hex}"), "w"):
        pass


def tagged(x):
    """``(pid, the tag this process's initializer set, x)``."""
    return os.getpid(), _STATE.get("tag"), x


def failing_init():
    """An initializer that raises."""
    raise LookupError("no model to load")


def pid_of(x):
    """The worker process's pid."""
    return os.getpid()


def running(arg):
    """Counts how many calls sharing ``run_dir`` run at once: returns the count seen while
    this one was running (each call holds a file in ``run_dir`` while it runs)."""
    run_dir, x = arg
    mine = os.path.join(run_dir, uuid.uuid4().hex)
    with open(mine, "w"):
        pass
    try:
        pause(0.03)
        return len(os.listdir(run_dir))
    finally:
        os.unlink(mine)


class Unpicklable:
    """Cannot be pickled, by pickle or dill."""

    def __reduce__(self):
        raise TypeError("Unpicklable objects cannot be pickled")


def make_unpicklable(x):
    """Return an unpicklable result for x == 3."""
    return Unpicklable() if x == 3 else x


class LoadsBadly:
    """Pickles fine, fails to unpickle (in the caller)."""

    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("cannot be rebuilt here")


class NoRebuildError(Exception):
    """Pickles, but rebuilding it fails (its __reduce__ points at a raising function)."""

    def __reduce__(self):
        return (_refuse, ())


def raise_no_rebuild(x):
    raise NoRebuildError("lost in transit")


def loads_badly(x):
    """A result that the caller cannot unpickle."""
    return LoadsBadly()
