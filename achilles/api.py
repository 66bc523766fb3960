"""Module-level API: ``achilles.map / imap / imap_unordered / status / kill_cluster`` on a
default connection made from the configuration (arguments > environment > .env)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from achilles.core import defaults, taskgraph
from achilles.core.config import load_config

_lock = threading.Lock()
_default: Any = None


def connect(host: Optional[str] = None, port: Optional[int] = None,
            username: Optional[str] = None, secret_key: Optional[str] = None) -> Any:
    """Connect to an Achilles server and return a :class:`achilles.controller.cluster.Cluster`.

    Arguments that are None come from ``ACHILLES_*`` environment variables, then ``.env``.
    Use it as a context manager, or call ``close()``; the connection is reused across calls.
    Inside ``with achilles.connect() as cluster:`` the module-level calls use ``cluster``.
    """
    from achilles.controller.cluster import Cluster

    return Cluster(load_config(host=host, port=port, username=username, secret_key=secret_key))


def default_cluster() -> Any:
    """The cluster the module-level functions use: the innermost ``with achilles.connect()``
    or ``with achilles.LocalCluster()`` block's, else a shared connection made from the
    configuration on first use."""
    global _default
    inside = defaults.current()
    if inside is not None:
        return inside
    with _lock:
        proto = getattr(_default, "_proto", None)
        if _default is None or proto is None:
            _default = connect()
        return _default


def map(func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: Optional[int] = None,
        callback: Optional[Callable[[Any], Any]] = None, *,
        initializer: Optional[Callable[..., Any]] = None, initargs: Tuple[Any, ...] = (),
        maxtasksperchild: Optional[int] = None, max_active: Optional[int] = None,
        group: Optional[str] = None, forward_output: Optional[bool] = None,
        progress: Any = None) -> List[Any]:
    """``Cluster.map`` on the default connection: results in input order, as a list. The
    keyword options are ``Cluster.map``'s (``forward_output=False``: do not print the tasks'
    output here; ``progress=True``: draw a progress bar)."""
    return default_cluster().map(func, iterable, chunksize, callback, initializer=initializer,
                                 initargs=initargs, maxtasksperchild=maxtasksperchild,
                                 max_active=max_active, group=group,
                                 forward_output=forward_output, progress=progress)


def imap(func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: Optional[int] = None,
         callback: Optional[Callable[[Any], Any]] = None, *,
         initializer: Optional[Callable[..., Any]] = None, initargs: Tuple[Any, ...] = (),
         maxtasksperchild: Optional[int] = None, max_active: Optional[int] = None,
         group: Optional[str] = None, forward_output: Optional[bool] = None,
         progress: Any = None) -> Any:
    """``Cluster.imap`` on the default connection: results in input order, as they come."""
    return default_cluster().imap(func, iterable, chunksize, callback, initializer=initializer,
                                  initargs=initargs, maxtasksperchild=maxtasksperchild,
                                  max_active=max_active, group=group,
                                  forward_output=forward_output, progress=progress)


def imap_unordered(func: Callable[[Any], Any], iterable: Iterable[Any],
                   chunksize: Optional[int] = None,
                   callback: Optional[Callable[[Any], Any]] = None, *,
                   initializer: Optional[Callable[..., Any]] = None,
                   initargs: Tuple[Any, ...] = (), maxtasksperchild: Optional[int] = None,
                   max_active: Optional[int] = None, group: Optional[str] = None,
                   forward_output: Optional[bool] = None, progress: Any = None) -> Any:
    """``Cluster.imap_unordered`` on the default connection: results in completion order."""
    return default_cluster().imap_unordered(
        func, iterable, chunksize, callback, initializer=initializer, initargs=initargs,
        maxtasksperchild=maxtasksperchild, max_active=max_active, group=group,
        forward_output=forward_output, progress=progress)


def report_progress(n: float = 1) -> None:
    """Call inside a task running on a node: ``n`` more items of its chunk (or a fraction of
    a graph task) are done, so the caller's progress bar moves before the chunk returns.
    Rate-limited in the worker; does nothing outside a worker process."""
    from achilles.node.worker import report_progress as report

    report(n)


def status() -> Dict[str, List[Dict[str, Any]]]:
    """``Cluster.status`` on the default connection."""
    return default_cluster().status()


def kill_cluster(command_verified: bool = False) -> int:
    """``Cluster.kill`` on the default connection: stop every node and the server."""
    global _default
    cluster = default_cluster()
    stopped = cluster.kill(command_verified)
    with _lock:
        if _default is cluster:
            _default = None
    return stopped


taskgraph.set_default_cluster(default_cluster)
