"""Task functions that kill their worker process at a chosen moment (importable by workers)."""

from __future__ import annotations

import os
import signal
import threading

from tasks import pause


def _die(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(7)


def _first_time(marker: str) -> bool:
    """True only for the first caller: the marker file is created atomically."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def chaos(arg):
    """``(x, plan)``: return ``x``, or first kill the worker as ``plan`` says.

    ``plan`` is None or ``(when, how, delay, marker)``: ``when`` is ``now`` (kill it after
    ``delay`` s of the item's work) or ``later`` (return ``x``, and a thread kills the worker
    ``delay`` s afterwards: while the chunk's result is written, or while the worker waits for
    its next chunk; ``<marker>.armed`` holds the worker's pid); ``how`` is ``exit`` (``os._exit(7)``) or
    ``kill`` (SIGKILL); ``marker`` is a file path making it happen only the first time, or
    None for every time.
    """
    x, plan = arg
    if plan is None:
        return x
    when, how, delay, marker = plan
    if marker is not None and not _first_time(marker):
        return x
    if when == "later":
        def later() -> None:
            pause(delay)
            _die(how)
        if marker is not None:  # written whole or not at all, even if a kill lands here
            with open(marker + ".tmp", "w") as fh:
                fh.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker + ".armed")
        threading.Thread(target=later, daemon=True).start()
        return x
    if delay:
        pause(delay)
    _die(how)


def fork_then_exit(pid_file: str):
    """Fork a child that keeps the worker's pipe open for a minute, then kill the worker."""
    pid = os.fork()
    if pid == 0:
        pause(60)
        os._exit(0)
    with open(pid_file, "w") as fh:
        fh.write(str(pid))
    os._exit(3)


def exit_with(code: int):
    """Kill the worker with this exit code."""
    os._exit(code)
