"""Task references: how a call-graph task's shipped arguments point at other tasks' values.

The controller ships each task's arguments with every lazy input replaced by a :class:`Ref`
(:func:`achilles.core.taskgraph.to_refs`); the node's worker process puts the inputs' values
back (:func:`from_refs`) just before it calls the task. Workers need only this module.

Arguments travel in one of two forms (:func:`resolve` takes both): the pickled
``(args, kwargs)`` with :class:`Ref` s inside, or, when every argument is positional and
either a lazy call or a plain value (``int``, ``float``, ``str``, ``bytes``, ``bool``,
``None``), the tuple ``(values, refs)``: the arguments with each lazy call as its task id, and
the positions that are task ids. The second needs no pickling of its own and no walk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

from achilles.core.serialization import loads_data


@dataclass(frozen=True)
class Ref:
    """Placeholder for another task's value inside a task's shipped arguments."""

    task_id: int


def replace_instances(value: Any, sub: Callable[[Any], Any], kind: type) -> Any:
    """Copy ``value`` with every ``kind`` instance inside containers replaced by ``sub(it)``."""
    if isinstance(value, kind):
        return sub(value)
    if isinstance(value, list):
        return [replace_instances(v, sub, kind) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(replace_instances(v, sub, kind) for v in value)
    if isinstance(value, (set, frozenset)):
        return type(value)(replace_instances(v, sub, kind) for v in value)
    if isinstance(value, dict):
        return {replace_instances(k, sub, kind): replace_instances(v, sub, kind)
                for k, v in value.items()}
    return value


def from_refs(value: Any, values: Dict[int, Any]) -> Any:
    """Arguments as run: every :class:`Ref` replaced by its task's value."""
    return replace_instances(value, lambda r: values[r.task_id], Ref)


def resolve(shipped: Any, values: Dict[int, Any]) -> Tuple[Any, Dict[str, Any]]:
    """``(args, kwargs)`` to call a task with, from its shipped arguments (either form) and
    its inputs' ``values``."""
    if type(shipped) is tuple:
        plain, refs = shipped
        args = list(plain)
        for position in refs:
            args[position] = values[plain[position]]
        return args, {}
    args, kwargs = loads_data(shipped)
    return from_refs(args, values), from_refs(kwargs, values)
