"""Call graphs for users: the ``@task`` and ``@workflow`` decorators.

Calling a ``@task`` function builds a lazy :class:`TaskCall` instead of running it; the graph
model itself lives in :mod:`achilles.core.taskgraph`, running graphs in
:mod:`achilles.controller.graph`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from achilles.core.taskgraph import TaskCall, TaskFunction, TaskOptions, Workflow

__all__ = ["task", "workflow", "TaskCall", "TaskFunction", "TaskOptions", "Workflow"]


def task(func: Optional[Callable[..., Any]] = None, *, timeout: Optional[float] = None,
         retries: int = 0, retry_delay: float = 0.0,
         resources: Optional[Dict[str, float]] = None) -> Any:
    """Make ``func`` a graph task: calls build a lazy graph run by ``.result()``.

    ``timeout``: seconds; past it the task's worker process is killed and replaced and the task
    fails with :class:`achilles.TaskTimeout`. ``retries``/``retry_delay``: re-run on an
    exception (or timeout) after ``retry_delay`` seconds, up to ``retries`` times; the last
    error is raised. ``resources``: e.g. ``{"gpu": 1}``; only nodes started with
    ``--resources gpu=N`` run it, at most N such tasks at once.
    """
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive")
    if retries < 0 or retry_delay < 0:
        raise ValueError("retries and retry_delay must not be negative")
    options = TaskOptions(timeout, int(retries), float(retry_delay),
                          {str(k): float(v) for k, v in (resources or {}).items()})
    if func is None:
        return lambda f: TaskFunction(f, options)
    return TaskFunction(func, options)


def workflow(func: Callable[..., Any]) -> Workflow:
    """Decorate a function that builds a graph from task calls (entangle's ``@workflow``)."""
    return Workflow(func)
