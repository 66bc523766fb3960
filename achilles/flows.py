"""Dataflow (entangle's meaning): ``flow = a(b(), c())``; ``flow(x)`` runs ``a(x)`` first,
then ``b`` and ``c`` in parallel on ``a``'s result, and returns the leaves' results by name.

A child may also be a plain callable, e.g. ``a(lambda v: b() if v > 0 else c())``: it gets
the parent's value in the controller and returns the next step (a dataflow call, a list of
them, or None to stop), so the path is chosen at run time. A flow can be called again.
Each step runs as one task on the cluster; values between steps pass through the controller.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


class DataflowFunction:
    """A ``@dataflow`` function: calling it with its children builds a :class:`Dataflow`."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.name = getattr(func, "__name__", "step")

    def __call__(self, *children: Any) -> "Dataflow":
        for child in children:
            if not callable(child):
                raise TypeError(f"{self.name}(...) takes dataflow steps or callables, not {child!r}")
        return Dataflow(self, children)


def dataflow(func: Callable[[Any], Any]) -> DataflowFunction:
    """Decorate a one-argument function as a dataflow step."""
    return DataflowFunction(func)


class Dataflow:
    """A step and what follows it; call it with an input to run the whole flow."""

    def __init__(self, step: DataflowFunction, children: Sequence[Any]) -> None:
        self.step = step
        self.children = tuple(children)

    @property
    def name(self) -> str:
        return self.step.name

    def __repr__(self) -> str:
        inner = ", ".join(getattr(c, "name", "<callable>") for c in self.children)
        return f"{self.name}({inner})"

    def __call__(self, value: Any, cluster: Any = None, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Run on ``value``; return ``{leaf name: value}`` (``a/b`` paths where names repeat)."""
        from achilles.api import default_cluster

        return _Run(cluster or default_cluster()).start(self, value, timeout)


def _next_steps(children: Sequence[Any], value: Any) -> List[Dataflow]:
    steps: List[Dataflow] = []
    for child in children:
        if isinstance(child, Dataflow):
            steps.append(child)
            continue
        if isinstance(child, DataflowFunction):
            steps.append(child())
            continue
        chosen = child(value)
        if chosen is None:
            continue
        for item in chosen if isinstance(chosen, (list, tuple)) else [chosen]:
            if isinstance(item, DataflowFunction):
                item = item()
            if not isinstance(item, Dataflow):
                raise TypeError(f"a dataflow branch returned {item!r}, not a dataflow step")
            steps.append(item)
    return steps


class _Run:
    """One execution of a flow: launches each step as its parent's value arrives."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.lock = threading.Lock()
        self.pending = 0
        self.leaves: List[Tuple[List[str], Any]] = []
        self.error: Optional[BaseException] = None
        self.done = threading.Event()

    def start(self, flow: Dataflow, value: Any, timeout: Optional[float]) -> Dict[str, Any]:
        self._launch(flow, value, [flow.name])
        if not self.done.wait(timeout):
            raise TimeoutError(f"the dataflow did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        counts = collections.Counter(path[-1] for path, _ in self.leaves)
        return {(path[-1] if counts[path[-1]] == 1 else "/".join(path)): v for path, v in self.leaves}

    def _launch(self, flow: Dataflow, value: Any, path: List[str]) -> None:
        with self.lock:
            self.pending += 1
        future = self.cluster.submit(flow.step.func, value)
        future.add_done_callback(lambda f: self._finished(flow, path, f))

    def _finished(self, flow: Dataflow, path: List[str], future: Any) -> None:
        try:
            value = future.result()
            steps = _next_steps(flow.children, value)
            if not steps:
                with self.lock:
                    self.leaves.append((path, value))
            for step in steps:
                self._launch(step, value, path + [step.name])
        except BaseException as exc:
            with self.lock:
                if self.error is None:
                    self.error = exc
            self.done.set()
        with self.lock:
            self.pending -= 1
            if self.pending == 0:
                self.done.set()
