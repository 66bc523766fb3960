"""The call-graph model: task functions, lazy :class:`TaskCall` nodes and the shippable graph.

``add(add(num(6), num(1)), num(3))`` returns a :class:`TaskCall`; nothing runs until
``.result()`` (or ``cluster.compute``) sends the whole graph to the server, which releases each
task to a node as soon as its inputs exist. A TaskCall used twice in one graph runs once.
Lazy calls may sit anywhere in the arguments, also inside lists, tuples, sets and dicts.

This module only builds and describes graphs; the user-facing decorators are
:mod:`achilles.graph`, running graphs is :mod:`achilles.controller.graph`. Which cluster
``TaskCall.result()`` uses by default is set by the facade (:func:`set_default_cluster`).
"""

from __future__ import annotations

import functools
import gc
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from achilles.core.serialization import dumps_code, dumps_data, function_name
from achilles.core.taskrefs import Ref, replace_instances

_ids = itertools.count(1)
_cluster_factory: Optional[Callable[[], Any]] = None


def set_default_cluster(factory: Callable[[], Any]) -> None:
    """Set what ``TaskCall.result()``/``.future()`` run on when no cluster is passed
    (the facade registers :func:`achilles.default_cluster` when ``achilles`` is imported)."""
    global _cluster_factory
    _cluster_factory = factory


def _default_cluster() -> Any:
    if _cluster_factory is None:
        raise RuntimeError("no default cluster is registered: import achilles, or pass a "
                           "cluster (call.result(cluster))")
    return _cluster_factory()


def _output_option(forward_output: Optional[bool]) -> Dict[str, Any]:
    """``forward_output`` as a keyword argument, when given."""
    return {} if forward_output is None else {"forward_output": forward_output}


@dataclass
class TaskOptions:
    """Per-task options (see :func:`task`)."""

    timeout: Optional[float] = None
    retries: int = 0
    retry_delay: float = 0.0
    resources: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {"timeout": self.timeout, "retries": self.retries,
                "retry_delay": self.retry_delay, "resources": dict(self.resources)}


class TaskFunction:
    """A ``@task``-decorated function: calling it returns a :class:`TaskCall`."""

    def __init__(self, func: Callable[..., Any], options: TaskOptions) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.options = options
        self.name = getattr(func, "__name__", "task")

    def __call__(self, *args: Any, **kwargs: Any) -> "TaskCall":
        return TaskCall(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<task {function_name(self.func)}>"


class Workflow:
    """A ``@workflow`` function: plain Python that composes task calls into a graph.

    Calling it runs its body at once (building, not running, the graph) and returns what the
    body returns. A Workflow passed uncalled as an argument to a task or another workflow is
    spliced in as ``workflow()``.
    """

    def __init__(self, func: Callable[..., Any]) -> None:
        functools.update_wrapper(self, func)
        self.func = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)


class TaskCall:
    """One lazy call of a task; the root of the graph of everything it depends on."""

    def __init__(self, fn: TaskFunction, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        self.fn = fn
        self.args = (tuple(_splice(a) for a in args) if Workflow in map(type, args)
                     else tuple(args))
        self.kwargs = {k: _splice(v) for k, v in kwargs.items()} if kwargs else {}
        self.id = next(_ids)  # after its arguments' (a spliced workflow makes calls)
        self.info: Dict[str, Any] = {}  # state, node, duration after a run

    @property
    def name(self) -> str:
        return self.fn.name

    def __repr__(self) -> str:
        return f"<TaskCall {self.name}#{self.id}>"

    def dependencies(self) -> List["TaskCall"]:
        """The lazy calls among this call's arguments (direct inputs), without repeats."""
        return _shipped(self)[0]

    def result(self, cluster: Any = None, forward_output: Optional[bool] = None,
               progress: Any = None) -> Any:
        """Run the graph on ``cluster`` (default: the default connection) and return its value.
        ``forward_output=False``: do not print the tasks' output here. ``progress``: True,
        ``"tasks"`` (a bar per task name), a tqdm bar or a callable ``(done, total)`` (see
        ``Cluster.compute``)."""
        return (cluster or _default_cluster()).compute(self, progress=progress,
                                                       **_output_option(forward_output))[0]

    __call__ = result  # entangle's spelling: g()

    def future(self, cluster: Any = None, forward_output: Optional[bool] = None,
               progress: Any = None) -> Any:
        """Submit the graph; return a ``concurrent.futures.Future`` of its value."""
        return (cluster or _default_cluster()).submit_graph(self, progress=progress,
                                                             **_output_option(forward_output))

    def graph(self) -> Dict[str, Any]:
        """A JSON-serializable description: tasks (name, literal arguments; after a run also
        state, node, duration, attempts and whether it ran in a batch) and edges ``[from, to]``
        (input -> consumer)."""
        calls = walk([self])
        tasks = []
        edges: List[List[int]] = []
        for call in calls:
            tasks.append({"id": call.id, "name": call.name,
                          "function": function_name(call.fn.func),
                          "args": [_literal(a) for a in call.args],
                          "kwargs": {k: _literal(v) for k, v in call.kwargs.items()},
                          **{k: call.info.get(k) for k in ("state", "node", "duration", "attempts",
                                                            "batched")}})
            edges.extend([dep.id, call.id] for dep in call.dependencies())
        return {"root": self.id, "tasks": tasks, "edges": edges}


def _splice(value: Any) -> Any:
    return value() if isinstance(value, Workflow) else value


def _collect(value: Any, found: Dict[int, TaskCall]) -> None:
    if isinstance(value, TaskCall):
        found.setdefault(value.id, value)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _collect(v, found)
    elif isinstance(value, dict):
        for k, v in value.items():
            _collect(k, found)
            _collect(v, found)


def to_refs(value: Any) -> Any:
    """Arguments as shipped: every TaskCall replaced by a :class:`Ref`."""
    return replace_instances(value, lambda c: Ref(c.id), TaskCall)


#: Argument types that hold no lazy call: shipped as they are, without a walk.
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _shipped(call: TaskCall) -> Tuple[List[TaskCall], Any]:
    """``call``'s inputs (without repeats) and its arguments as shipped (one of the two forms
    of :mod:`achilles.core.taskrefs`), in one pass; the common case (positional arguments,
    each a lazy call or a plain value) without a recursive walk or a pickle of its own."""
    found: Dict[int, TaskCall] = {}
    plain: List[Any] = []
    refs: List[int] = []
    simple = not call.kwargs
    for position, value in enumerate(call.args):
        kind = type(value)
        if kind is TaskCall:
            found.setdefault(value.id, value)
            plain.append(value.id)
            refs.append(position)
        elif kind in _PLAIN:
            plain.append(value)
        else:
            _collect(value, found)
            simple = False
    if simple:
        return list(found.values()), (tuple(plain), tuple(refs))
    for value in call.kwargs.values():
        _collect(value, found)
    return list(found.values()), dumps_data((to_refs(call.args), to_refs(call.kwargs)))


def _literal(value: Any) -> Any:
    if isinstance(value, TaskCall):
        return {"task": value.id}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def walk(roots: Iterable[TaskCall]) -> List[TaskCall]:
    """Every call reachable from ``roots``, inputs before consumers, each once."""
    return [call for call, _ in _walk(roots)]


def _walk(roots: Iterable[TaskCall]) -> List[Tuple[TaskCall, Tuple[List[TaskCall], Any]]]:
    """:func:`walk`, each call with :func:`_shipped` of it (worked out once per call)."""
    calls: Dict[int, TaskCall] = {}
    shipped: Dict[int, Any] = {}
    ordered = True  # every input older than its consumer (the usual case): order by id
    stack = list(roots)
    while stack:
        call = stack.pop()
        if call.id in shipped:
            continue
        calls[call.id] = call
        shipped[call.id] = found = _shipped(call)
        for dep in found[0]:
            if dep.id >= call.id:  # a container changed after the call was made
                ordered = False
            if dep.id not in shipped:
                stack.append(dep)
    if ordered:
        return [(calls[i], shipped[i]) for i in sorted(calls)]
    order: List[Tuple[TaskCall, Any]] = []
    done: set = set()
    for root in roots:
        pending: List[Tuple[TaskCall, bool]] = [(root, False)]
        while pending:
            call, expanded = pending.pop()
            if expanded:
                order.append((call, shipped[call.id]))
                continue
            if call.id in done:
                continue
            done.add(call.id)
            pending.append((call, True))
            pending.extend((dep, False) for dep in reversed(shipped[call.id][0])
                           if dep.id not in done)
    return order


@dataclass
class GraphSpec:
    """A graph ready to ship: code by key, tasks as tuples, the outputs wanted."""

    funcs: Dict[str, bytes]
    #: ``(id, name, input ids, options, function key, arguments as shipped)``
    tasks: List[Tuple[int, str, List[int], Dict[str, Any], str, Any]]
    outputs: List[int]
    calls: Dict[int, TaskCall]
    roots: List[TaskCall]
    _positions: Optional[Dict[int, str]] = None

    @property
    def positions(self) -> Dict[int, str]:
        """Where each task sits (see :func:`positions`), worked out when first asked for
        (only a failure needs it)."""
        if self._positions is None:
            self._positions = positions(self.roots)
        return self._positions


def build(roots: List[TaskCall]) -> GraphSpec:
    """Serialize the graph under ``roots`` (shared sub-graphs appear once)."""
    # Building allocates a few objects per task and frees none: the cyclic collector would
    # scan the growing graph over and over for nothing, so it waits until the end.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _build(roots)
    finally:
        if paused:
            gc.enable()


def _build(roots: List[TaskCall]) -> GraphSpec:
    funcs: Dict[str, bytes] = {}
    keys: Dict[int, str] = {}
    options: Dict[int, Dict[str, Any]] = {}  # one dict per TaskOptions, shared by its tasks
    tasks = []
    calls: Dict[int, TaskCall] = {}
    for call, (deps, shipped) in _walk(roots):
        fn = call.fn
        key = keys.get(id(fn.func))
        if key is None:
            key = keys[id(fn.func)] = f"f{len(keys)}"
            funcs[key] = dumps_code(fn.func)
        opts = options.get(id(fn.options))
        if opts is None:
            opts = options[id(fn.options)] = fn.options.as_dict()
        calls[call.id] = call
        tasks.append((call.id, fn.name, [d.id for d in deps], opts, key, shipped))
    return GraphSpec(funcs, tasks, [r.id for r in roots], calls, list(roots))


def positions(roots: List[TaskCall]) -> Dict[int, str]:
    """Where each task sits: ``num#3 <- arg 0 of add#2 <- arg 1 of add#1``."""
    where: Dict[int, str] = {}
    queue: List[Tuple[TaskCall, str]] = [(r, f"{r.name}#{r.id}") for r in roots]
    while queue:
        call, path = queue.pop(0)
        if call.id in where:
            continue
        where[call.id] = path
        for slot, value in itertools.chain(enumerate(call.args), call.kwargs.items()):
            found: Dict[int, TaskCall] = {}
            _collect(value, found)
            label = f"arg {slot}" if isinstance(slot, int) else f"kwarg {slot!r}"
            for dep in found.values():
                queue.append((dep, f"{dep.name}#{dep.id} <- {label} of {path}"))
    return where
