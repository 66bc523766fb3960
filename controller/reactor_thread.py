"""The Twisted reactor in one background thread of the controller process.

Public calls stay synchronous: they hand work to the reactor with ``callFromThread`` and wait
on a queue. The thread starts on first use and is shared by every :class:`Cluster`.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
from typing import Any, Callable, Optional, Tuple

from twisted.internet import defer
from twisted.python.failure import Failure

from achilles.core.reactor import get_reactor, lean_events

log = logging.getLogger("achilles.controller")

_lock = threading.Lock()
_thread: Optional[threading.Thread] = None


def ensure_running() -> None:
    """Start the reactor thread once (no-op if a reactor already runs in this process)."""
    global _thread
    reactor = get_reactor()

    with _lock:
        if _thread is not None or reactor.running:
            return
        lean_events(reactor)
        started = threading.Event()
        reactor.callWhenRunning(started.set)
        _thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                   name="achilles-reactor", daemon=True)
        _thread.start()
        started.wait(10)
        atexit.register(_stop)


def _stop() -> None:
    reactor = get_reactor()

    if reactor.running:
        reactor.callFromThread(reactor.stop)
        if _thread is not None:
            _thread.join(2)


def in_reactor() -> bool:
    """Whether the caller is the reactor thread itself."""
    return _thread is not None and threading.current_thread() is _thread


def call(fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
    """Run ``fn`` in the reactor thread and wait for its result (a Deferred is waited on)."""
    reactor = get_reactor()

    ensure_running()
    box: "queue.Queue[Any]" = queue.Queue(maxsize=1)

    def run() -> None:
        _drain()  # calls posted before this one run first
        d = defer.maybeDeferred(fn, *args, **kwargs)
        d.addBoth(box.put)

    reactor.callFromThread(run)
    try:
        result = box.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"no answer from the reactor within {timeout} s") from None
    if isinstance(result, Failure):
        result.raiseException()
    return result


_posted: "collections.deque[Tuple[Callable[..., Any], Tuple[Any, ...]]]" = collections.deque()
_posted_lock = threading.Lock()
_drain_scheduled = False


def post(fn: Callable[..., Any], *args: Any, wake: bool = True) -> None:
    """Run ``fn`` in the reactor thread without waiting. Posted calls run in order (also
    before any later :func:`call`), and calls posted in quick succession share one wake-up of
    the reactor. With ``wake=False`` the call waits for the next one that wakes it (or the
    next :func:`call`): for bookkeeping that needs no thread hop of its own, such as removing
    a finished job's routing entry."""
    global _drain_scheduled
    with _posted_lock:
        _posted.append((fn, args))
        if _drain_scheduled or not wake:
            return
        _drain_scheduled = True
    get_reactor().callFromThread(_drain)


def _drain() -> None:
    global _drain_scheduled
    while True:
        with _posted_lock:
            if not _posted:
                _drain_scheduled = False
                return
            fn, args = _posted.popleft()
        try:
            fn(*args)
        except Exception:
            log.exception("a call posted to the reactor thread failed")
