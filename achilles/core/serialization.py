"""What crosses process boundaries: code with dill, data with the C pickler, errors as records.

Data (arguments, results) goes through the fast C pickler first and falls back to dill only
when it must (lambdas inside the data, say). Functions always go through dill, by value when
they live in ``__main__`` or a REPL, so scripts and notebooks work unchanged.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any, Callable, Optional, Tuple

import dill

from achilles.core.errors import RemoteError, RemoteTraceback

PROTOCOL = 5


def dumps_code(func: Optional[Callable[..., Any]]) -> bytes:
    """Serialize a function (or None) with dill."""
    if func is None:
        return b""
    return dill.dumps(func, protocol=PROTOCOL, recurse=True)


def loads_code(data: bytes) -> Any:
    """Inverse of :func:`dumps_code`: the function (None for empty ``data``). Typed ``Any``:
    callers pass bytes they know hold a function, which no checker can see."""
    return dill.loads(data) if data else None


def dumps_data(obj: Any) -> bytes:
    """Serialize data: the C pickler, or dill when the C pickler cannot."""
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        return dill.dumps(obj, protocol=PROTOCOL, recurse=True)


def loads_data(data: "bytes | bytearray | memoryview") -> Any:
    """Inverse of :func:`dumps_data` (dill's pickles load with the C unpickler too)."""
    return pickle.loads(data)


ErrorRecord = Tuple[int, Optional[bytes], str, str, str]


def error_record(index: int, exc: BaseException, partial: list) -> bytes:
    """Serialize a task failure at ``index`` of its chunk, with the results before it."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc_bytes: Optional[bytes]
    try:
        exc_bytes = dumps_data(exc)
        pickle.loads(exc_bytes)
    except Exception:
        exc_bytes = None
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable exception>"
    try:
        partial_bytes = dumps_data(partial)
    except Exception:
        partial_bytes = dumps_data([])
    return pickle.dumps((index, exc_bytes, type_name, message, tb, partial_bytes), protocol=PROTOCOL)


#: Longest traceback text sent to the server for display (the caller gets the whole one).
MAX_TRACEBACK_TEXT = 16_000


def error_text(payload: bytes) -> Optional[Tuple[int, str, str, str]]:
    """``(index, type name, message, traceback)`` of an :func:`error_record`, or None when
    ``payload`` is not one. Only the record's plain fields are read: the pickled exception and
    partial results inside it stay bytes. The traceback keeps its last
    :data:`MAX_TRACEBACK_TEXT` characters."""
    try:
        index, _exc, type_name, message, tb, _partial = pickle.loads(payload)
    except Exception:
        return None
    if not (isinstance(index, int) and isinstance(type_name, str) and isinstance(message, str)
            and isinstance(tb, str)):
        return None
    if len(tb) > MAX_TRACEBACK_TEXT:
        tb = "...\n" + tb[-MAX_TRACEBACK_TEXT:]
    return index, type_name, message[:MAX_TRACEBACK_TEXT], tb


def load_error(payload: bytes, where: str = "") -> Tuple[int, BaseException, list]:
    """Rebuild ``(index, exception, partial_results)`` from :func:`error_record` output.

    The exception is the task's own type when it can be rebuilt, else :class:`RemoteError`;
    either way the remote traceback is attached as ``__cause__`` (a :class:`RemoteTraceback`).
    """
    index, exc_bytes, type_name, message, tb, partial_bytes = pickle.loads(payload)
    exc: BaseException
    try:
        exc = pickle.loads(exc_bytes) if exc_bytes else RemoteError(type_name, message, tb)
        if not isinstance(exc, BaseException):
            raise TypeError("not an exception")
    except Exception:
        exc = RemoteError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    if where and hasattr(exc, "add_note"):
        exc.add_note(where)
    try:
        partial = pickle.loads(partial_bytes)
    except Exception:
        partial = []
    return index, exc, partial


def function_name(func: Callable[..., Any]) -> str:
    """A readable name for logs and status."""
    module = getattr(func, "__module__", None) or "?"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{module}.{name}"
