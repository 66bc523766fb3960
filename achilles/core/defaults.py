"""Which cluster the module-level calls use inside a ``with`` block.

``with achilles.LocalCluster() as cluster:`` and ``with achilles.connect() as cluster:`` make
``cluster`` the default for ``achilles.map``, ``g.result()``, ``g()`` and the rest until the
block ends (as dask's ``Client`` sets itself as the default). Blocks nest: the innermost
open one wins, and leaving it restores the one around it. The setting is process-wide, so
threads started inside the block use it too. Outside every block, the facade falls back to a
connection made from the configuration (:func:`achilles.default_cluster`).
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional

_lock = threading.Lock()
_stack: List[Any] = []


def push(cluster: Any) -> None:
    """Make ``cluster`` the default until :func:`remove` is called with it."""
    with _lock:
        _stack.append(cluster)


def remove(cluster: Any) -> None:
    """Stop ``cluster`` being a default (its innermost entry; a no-op if it is not one)."""
    with _lock:
        for i in range(len(_stack) - 1, -1, -1):
            if _stack[i] is cluster:
                del _stack[i]
                return


def current() -> Optional[Any]:
    """The innermost cluster made default by a ``with`` block, or None."""
    with _lock:
        return _stack[-1] if _stack else None
