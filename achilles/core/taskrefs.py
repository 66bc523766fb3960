"""Task references: how a call-graph task's shipped arguments point at other tasks' values.

The controller ships each task's arguments with every lazy input replaced by a :class:`Ref`
(:func:`achilles.core.taskgraph.to_refs`); the node's worker process puts the inputs' values
back (:func:`from_refs`) just before it calls the task. Workers need only this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict


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
