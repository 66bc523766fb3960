"""A function's dill bytes, pickled once while nothing they depend on has changed.

Pickling a function with dill costs ~0.2 ms when it travels by value (it lives in
``__main__``, a notebook, or is a closure or lambda): more than the rest of a one-item
``map``. :func:`dumps_code_cached` keeps, per function object, its bytes and a snapshot of
everything dill reads to produce them: the code, names, defaults, closure cells, attributes,
annotations and each global the code can name. The bytes are reused only while the snapshot
is equal, and a snapshot is taken only when every value in it is immutable (numbers, strings,
bytes, None, tuples and frozensets of those) or travels by reference (modules, builtins,
functions and classes importable by name); a mutable value anywhere (a list, a dict, an
instance, a class defined in ``__main__``) means no caching for that call. So a changed
global, closure cell or default is always pickled afresh: a cached function is never stale.
"""

from __future__ import annotations

import sys
import threading
import types
import weakref
from typing import Any, Callable, Dict, FrozenSet, Optional, Set, Tuple

from achilles.core.serialization import dumps_code

#: Cached functions at most (a program making fresh lambdas per call must not grow it).
MAX_ENTRIES = 256
#: How deep a snapshot follows functions (travelling by value) that a function's globals name.
MAX_DEPTH = 4

_SCALARS: FrozenSet[type] = frozenset({int, str, bytes, bool, type(None), type(Ellipsis),
                                       type(NotImplemented)})
_cache: "weakref.WeakKeyDictionary[Callable[..., Any], Tuple[Any, bytes]]" = \
    weakref.WeakKeyDictionary()
_names: "weakref.WeakKeyDictionary[types.CodeType, Tuple[str, ...]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class _Mutable(Exception):
    """A value the snapshot cannot vouch for: pickle afresh."""


def dumps_code_cached(func: Optional[Callable[..., Any]]) -> bytes:
    """:func:`achilles.core.serialization.dumps_code` of ``func``, from the cache when
    ``func`` and everything its bytes depend on are unchanged since it was last pickled."""
    if type(func) is not types.FunctionType:
        return dumps_code(func)
    try:
        state = _snapshot(func, 0, set())
    except _Mutable:
        return dumps_code(func)
    with _lock:
        hit = _cache.get(func)
    if hit is not None and hit[0] == state:
        return hit[1]
    data = dumps_code(func)
    with _lock:
        if len(_cache) >= MAX_ENTRIES:
            _cache.clear()
        _cache[func] = (state, data)
    return data


def _located(obj: Any) -> bool:
    """Whether dill pickles ``obj`` by reference: its module is imported (not ``__main__``)
    and its qualified name there leads back to it."""
    module_name = getattr(obj, "__module__", None)
    if module_name in ("__main__", None):
        return False
    module = sys.modules.get(module_name)
    if module is None:
        raise _Mutable  # dill would import it: leave that to dill
    found: Any = module
    for part in getattr(obj, "__qualname__", "").split("."):
        found = getattr(found, part, _located)
        if found is _located:
            return False
    return found is obj


def _global_names(code: types.CodeType) -> Tuple[str, ...]:
    """Every name the code (and the code nested in it) may look up as a global."""
    names = _names.get(code)
    if names is None:
        found: Set[str] = set()
        stack = [code]
        while stack:
            c = stack.pop()
            found.update(c.co_names)
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        names = tuple(sorted(found))
        with _lock:
            _names[code] = names
    return names


def _snapshot(func: types.FunctionType, depth: int, seen: Set[int]) -> Any:
    """What dill's bytes of ``func`` depend on, as a value that compares equal only when
    they would be the same; raises :class:`_Mutable` when that cannot be told. It holds no
    reference to ``func`` itself (the cache's weak key)."""
    if _located(func):
        return ("ref",)
    if depth > MAX_DEPTH:
        raise _Mutable
    seen.add(id(func))
    env = func.__globals__
    missing = ("missing",)
    return (
        "value", func.__code__, func.__name__, func.__qualname__, func.__module__,
        func.__doc__,
        _value(func.__defaults__, depth, seen),
        _items(func.__kwdefaults__, depth, seen),
        None if func.__closure__ is None else tuple(
            _cell(cell, depth, seen) for cell in func.__closure__),
        _items(func.__dict__, depth, seen),
        _items(func.__annotations__, depth, seen),
        tuple(_value(env.get(name, missing), depth, seen) if name in env else missing
              for name in _global_names(func.__code__)),
    )


def _cell(cell: Any, depth: int, seen: Set[int]) -> Any:
    try:
        contents = cell.cell_contents
    except ValueError:
        return ("empty",)
    return _value(contents, depth, seen)


def _items(mapping: Optional[Dict[str, Any]], depth: int, seen: Set[int]) -> Any:
    if not mapping:
        return None
    return tuple((key, _value(value, depth, seen)) for key, value in mapping.items())


def _value(value: Any, depth: int, seen: Set[int]) -> Any:
    """A value's part of a snapshot (its type too: ``1``, ``1.0`` and ``True`` are equal
    but pickle differently)."""
    kind = type(value)
    if kind in _SCALARS:
        return (kind, value)
    if kind is float or kind is complex:
        return (kind, repr(value))  # repr tells -0.0 from 0.0
    if kind is tuple or kind is frozenset:
        return (kind, tuple(_value(v, depth, seen) for v in value))
    if kind is types.ModuleType:
        if value.__name__ == "__main__":
            raise _Mutable
        return (kind, value)
    if kind is types.BuiltinFunctionType:
        return (kind, value)
    if kind is types.FunctionType:
        if id(value) in seen:  # recursion: the function is already in this snapshot
            return ("seen", id(value))
        return ("function", value, _snapshot(value, depth + 1, seen))
    if isinstance(value, type) and _located(value):
        return (type, value)
    raise _Mutable
