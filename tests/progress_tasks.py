"""Task functions for the progress tests (importable by the nodes)."""

import os

from achilles import report_progress

from tasks import pause

#: Seconds a task waits for its marker file before giving up (the test then fails on its own).
MARKER_WAIT = 30.0


def wait_for_marker(path):
    """Block until ``path`` exists (polling) or :data:`MARKER_WAIT` passes; whether it does."""
    for _ in range(int(MARKER_WAIT / 0.01)):
        if os.path.exists(path):
            return True
        pause(0.01)
    return False


def first_waits(arg):
    """Item 0 waits for the marker; the others return at once."""
    x, marker = arg
    if x == 0:
        return wait_for_marker(marker)
    return x


def reports_each(arg):
    """Reports each item done as it goes; the last item of the chunk waits for the marker."""
    x, last, marker = arg
    if x == last:
        return wait_for_marker(marker)
    report_progress(1)
    return x


def fails_on(arg):
    """Raise ValueError on item ``bad``."""
    x, bad = arg
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x
