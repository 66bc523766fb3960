"""The per-job options of ``map`` / ``imap`` / ``imap_unordered``: checked in the caller's
thread (so a wrong one raises there, before anything is sent) and encoded for ``SUBMIT``.

On the wire (the ``options`` dict of ``SUBMIT`` and ``JOB_CODE``), each key only when set:
``init`` (dill of ``functools.partial(initializer, *initargs)``), ``maxtasks`` (int >= 1), ``max_active``
(int >= 1) and ``group`` (this ``Cluster``'s random scope + ``:`` + the caller's group name,
so two controllers' groups never meet on a worker).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from achilles.core.serialization import dumps_code


def check_chunksize(chunksize: Any) -> Optional[int]:
    """``chunksize`` as ``multiprocessing.Pool`` takes it: None, or an int of at least 1."""
    if chunksize is None:
        return None
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"chunksize must be an int or None, not {type(chunksize).__name__}")
    if chunksize < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize}")
    return chunksize


def _positive(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None, not {value}")
    return value


@dataclass(frozen=True)
class JobOptions:
    """Checked options of one job (see :meth:`Cluster.map <achilles.controller.cluster.Cluster.map>`)."""

    initializer: Optional[Callable[..., Any]] = None
    initargs: Tuple[Any, ...] = ()
    maxtasksperchild: Optional[int] = None
    max_active: Optional[int] = None
    group: Optional[str] = None

    @classmethod
    def check(cls, initializer: Any = None, initargs: Any = (), maxtasksperchild: Any = None,
              max_active: Any = None, group: Any = None) -> "JobOptions":
        """Validate the keyword arguments; TypeError or ValueError names the bad one."""
        if (initializer is None and initargs == () and maxtasksperchild is None
                and max_active is None and group is None):
            return NO_OPTIONS
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        if isinstance(initargs, (str, bytes)) or not isinstance(initargs, (tuple, list)):
            raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")
        if initargs and initializer is None:
            raise ValueError("initargs given without an initializer")
        if group is not None and not isinstance(group, str):
            raise TypeError(f"group must be a str or None, not {type(group).__name__}")
        return cls(initializer, tuple(initargs), _positive("maxtasksperchild", maxtasksperchild),
                   _positive("max_active", max_active), group)

    def encode(self, scope: str) -> Dict[str, Any]:
        """The ``SUBMIT`` options dict; ``scope`` is unique to the calling ``Cluster``.
        An initializer or initargs that cannot be pickled raise here."""
        out: Dict[str, Any] = {}
        if self is NO_OPTIONS:
            return out
        if self.initializer is not None:
            out["init"] = dumps_code(functools.partial(self.initializer, *self.initargs))
        if self.maxtasksperchild is not None:
            out["maxtasks"] = self.maxtasksperchild
        if self.max_active is not None:
            out["max_active"] = self.max_active
        if self.group is not None:
            out["group"] = f"{scope}:{self.group}"
        return out

    def cap_chunksize(self, chunksize: Optional[int]) -> Optional[int]:
        """The largest automatic chunk: ``maxtasksperchild`` items, so that a worker runs at
        most that many before it is replaced (None: no cap)."""
        return self.maxtasksperchild if chunksize is None else None


#: The options of a job that sets none (the common case, checked without work).
NO_OPTIONS = JobOptions()
