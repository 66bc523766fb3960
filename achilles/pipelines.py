"""Stage pipelines across the cluster, in mpyx's spelling: ``achilles.pipeline`` (``EZ``).

>>> import achilles
>>> class Square(achilles.Stage):
...     def do(self, x):
...         self.put(x * x)
>>> achilles.pipeline(range(5), Square(), lambda x: x + 1).list()   # doctest: +SKIP
[1, 2, 5, 10, 17]

Structures nest: a ``list`` (or :class:`Serial`) runs stages in sequence, a ``tuple`` (or
:class:`Parallel`) runs them side by side on a shared input, a ``set`` (or :class:`Broadcast`)
gives every branch every item; ``As(n, Stage, *args)`` makes ``n`` copies of one stage. Each
stage copy is a long-lived process on a node (see :class:`Stage` for its life and for what a
restart after a crash means); items flow between stages through the server with bounded,
credit-based queues, never through this process.
"""

from __future__ import annotations

import inspect
import json
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from achilles.core.serialization import dumps_code, function_name
from achilles.controller.pipeline import PipeRun, StageError

ON_ERROR = ("fail", "skip", "collect")
#: Items per batch by default (a batch travels as one message between stages).
DEFAULT_BATCH = 16

__all__ = ["Stage", "F", "As", "Serial", "Parallel", "Broadcast", "Pipeline", "pipeline", "EZ",
           "StageError"]


class Stage:
    """Base class of a pipeline stage (``F`` for mpyx users).

    ``Stage(*args, **kwargs)`` keeps its arguments for :meth:`setup`, which runs once in the
    stage copy's own process on a node; :meth:`do` runs on each input item and emits zero or
    more outputs with :meth:`put`; :meth:`teardown` runs once the stage's input is drained.
    A first stage without an input iterable is a *source*: its ``setup`` generates the items
    with ``put`` (which blocks while the pipeline is full), and returning from ``setup`` ends
    the source.

    ``self.meta`` is a dict that travels with each item: set keys before ``put`` and the
    outputs carry them to the next stage, whose ``self.meta`` holds them while it works on
    that item.

    In the copy's process, ``self.copy_index`` is the copy's number within its stage and
    ``self.node_name`` the node it runs on.

    Class attributes: ``on_error`` (``"fail"``, ``"skip"`` or ``"collect"``, overriding the
    pipeline's) and ``resources`` (e.g. ``{"gpu": 1}``; each copy holds them on its node).

    Faults: when a copy's process or node dies, the copy starts again on a node (``setup``
    runs again) and the batches it held are run again there, so every source item still
    produces its outputs exactly once at the end. A stateful stage may therefore see again
    the items of the batches a dead copy held (up to two batches per copy), and its
    ``teardown`` runs only on copies that live to the end; a restarted source stage must
    generate the same sequence, as the items it delivered before are skipped by count.
    """

    on_error: Optional[str] = None
    resources: Optional[Dict[str, float]] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._achilles_args = args
        self._achilles_kwargs = kwargs
        self.meta: Dict[str, Any] = {}

    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Runs once in the stage copy's process before any item (default: nothing)."""

    def do(self, item: Any) -> None:
        """Handle one item; emit outputs with :meth:`put` (default: pass it on)."""
        self.put(item)

    def teardown(self) -> None:
        """Runs once after the last item (default: nothing); may still :meth:`put`."""

    def put(self, item: Any) -> None:
        """Emit one output item (with the current ``self.meta``) to the next stage."""
        emit = self.__dict__.get("_achilles_emit")
        if emit is None:
            raise RuntimeError("Stage.put works only inside a running pipeline")
        emit(item, self.meta)

    def stop(self) -> None:
        """mpyx compatibility: a source ends when its ``setup`` returns."""

    @property
    def stage_name(self) -> str:
        """The name shown by ``watch()``, ``graph()`` and errors."""
        return type(self).__name__


F = Stage


class _Function(Stage):
    """A plain function as a stage: its return value is put, unless it is None."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        super().__init__()
        self.func = func
        self.on_error = getattr(func, "on_error", None)

    def do(self, item: Any) -> None:
        value = self.func(item)
        if value is not None:
            self.put(value)

    @property
    def stage_name(self) -> str:
        return function_name(self.func).rpartition(".")[2]


class As:
    """``As(n, StageClass, *args, resources=None, **kwargs)``: ``n`` parallel copies of one
    stage sharing its input (``StageClass`` may also be a function)."""

    def __init__(self, n: int, stage: Any, *args: Any,
                 resources: Optional[Dict[str, float]] = None, **kwargs: Any) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"As needs a positive number of copies, got {n!r}")
        self.n = n
        self.stage = stage
        self.args = args
        self.kwargs = kwargs
        self.resources = resources

    def copies(self) -> List[Stage]:
        """The ``n`` stage objects."""
        if inspect.isclass(self.stage) and issubclass(self.stage, Stage):
            return [self.stage(*self.args, **self.kwargs) for _ in range(self.n)]
        if isinstance(self.stage, Stage):
            return [self.stage for _ in range(self.n)]
        if callable(self.stage):
            return [_Function(self.stage) for _ in range(self.n)]
        raise TypeError(f"As wants a Stage class or a function, got {self.stage!r}")


class _Group:
    def __init__(self, *parts: Any) -> None:
        if not parts:
            raise ValueError(f"{type(self).__name__} needs at least one part")
        self.parts = parts


class Serial(_Group):
    """Stages in sequence (same as a ``list``)."""


class Parallel(_Group):
    """Branches side by side sharing one input; each item goes to one of them (a ``tuple``)."""


class Broadcast(_Group):
    """Branches that each get every item (a ``set``, for parts that are not hashable)."""


def _stage_like(x: Any) -> bool:
    if isinstance(x, (Stage, As, _Group)):
        return True
    if inspect.isclass(x) and issubclass(x, Stage):
        return True
    if isinstance(x, (list, tuple, set, frozenset)):
        return bool(x) and all(_stage_like(p) for p in x)
    return callable(x) and not inspect.isgeneratorfunction(x)


class _Compiler:
    """Flattens a nested structure into stages and routes (see :mod:`achilles.server.pipelines`)."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.stages: List[Dict[str, Any]] = []
        self.objects: List[List[Stage]] = []

    def _name(self, base: str) -> str:
        taken = {s["name"] for s in self.stages}
        if base not in taken:
            return base
        n = 2
        while f"{base}#{n}" in taken:
            n += 1
        return f"{base}#{n}"

    def _copies(self, x: Any) -> Tuple[List[Stage], Optional[Dict[str, float]]]:
        if isinstance(x, As):
            copies = x.copies()
            return copies, x.resources if x.resources is not None else copies[0].resources
        if inspect.isclass(x) and issubclass(x, Stage):
            x = x()
        if isinstance(x, Stage):
            return [x], x.resources
        if callable(x):
            return [_Function(x)], None
        raise TypeError(f"not a pipeline stage: {x!r} (a Stage, a function, As(...), or a "
                        "list, tuple or set of them)")

    def _simple(self, x: Any) -> bool:
        return isinstance(x, (Stage, As)) or (callable(x) and not isinstance(x, _Group)
                                              and not isinstance(x, (list, tuple, set, frozenset)))

    def _node(self, copies: List[Stage], resources: Optional[Dict[str, float]]) -> int:
        names = dict.fromkeys(c.stage_name for c in copies)
        policy = copies[0].on_error or self.on_error
        if policy not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {policy!r}")
        index = len(self.stages)
        self.stages.append({"name": self._name("|".join(names)), "codes": [],
                            "resources": dict(resources or {}), "route": "out",
                            "source": False, "on_error": policy})
        self.objects.append(copies)
        return index

    def compile(self, x: Any) -> Tuple[Any, List[int]]:
        """``(entry route, exit stages)`` of structure ``x``."""
        if isinstance(x, Serial) or isinstance(x, list):
            parts = list(x.parts if isinstance(x, Serial) else x)
            if not parts:
                raise ValueError("an empty list is not a pipeline stage")
            entry, exits = self.compile(parts[0])
            for part in parts[1:]:
                nxt, nxt_exits = self.compile(part)
                for e in exits:
                    self.stages[e]["route"] = nxt
                exits = nxt_exits
            return entry, exits
        if isinstance(x, (Parallel, tuple, Broadcast, set, frozenset)):
            parts = list(x.parts if isinstance(x, _Group) else x)
            if not parts:
                raise ValueError("an empty tuple or set is not a pipeline stage")
            broadcast = isinstance(x, (Broadcast, set, frozenset))
            if not broadcast and all(self._simple(p) for p in parts):
                groups = [self._copies(p) for p in parts]
                needs = [g[1] or {} for g in groups]
                if all(r == needs[0] for r in needs):
                    return self._single([c for g in groups for c in g[0]], needs[0])
            entries, exits = [], []
            for p in parts:
                entry, ex = self.compile(p)
                entries.append(entry)
                exits += ex
            if len(entries) == 1:
                return entries[0], exits
            return ["all" if broadcast else "any", entries], exits
        copies, resources = self._copies(x)
        return self._single(copies, resources)

    def _single(self, copies: List[Stage], resources: Optional[Dict[str, float]]) -> Tuple[Any, List[int]]:
        index = self._node(copies, resources)
        return index, [index]


def _leaves(route: Any) -> List[Any]:
    if route == "out" or isinstance(route, int):
        return [route]
    return [leaf for branch in route[1] for leaf in _leaves(branch)]


class Pipeline:
    """A pipeline built by :func:`pipeline`; runs on :meth:`start` (or when first read)."""

    def __init__(self, stages: Tuple[Any, ...], cluster: Any = None, ordered: bool = False,
                 on_error: str = "fail", batch: int = DEFAULT_BATCH,
                 name: Optional[str] = None, forward_output: Optional[bool] = None) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        parts = list(stages)
        self.inputs: Optional[Iterable[Any]] = None
        if not _stage_like(parts[0]):
            first = parts.pop(0)
            self.inputs = first() if inspect.isgeneratorfunction(first) else first
            try:
                iter(self.inputs)
            except TypeError:
                raise TypeError(f"the first element of a pipeline must be a stage or an "
                                f"iterable, got {first!r}") from None
            if not parts:
                raise ValueError("a pipeline needs at least one stage after its input")
        compiler = _Compiler(on_error)
        self.entry, exits = compiler.compile(parts if len(parts) > 1 else parts[0])
        for e in exits:
            compiler.stages[e]["route"] = "out"
        if self.inputs is None:
            for leaf in _leaves(self.entry):
                compiler.stages[leaf]["source"] = True
        for spec, copies in zip(compiler.stages, compiler.objects):
            spec["codes"] = [dumps_code(c) for c in copies]  # type: ignore[arg-type]
        self.specs = compiler.stages
        self.cluster = cluster
        self.ordered = ordered
        self.batch = batch
        self.forward_output = forward_output
        self.name = name or " -> ".join(s["name"] for s in self.specs)[:100]
        self._run: Optional[PipeRun] = None
        self._watcher: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # --- running ----------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        """Start every stage copy on the cluster (input is read as the outputs are read)."""
        with self._lock:
            if self._run is None:
                if self.cluster is None:
                    from achilles.api import default_cluster

                    self.cluster = default_cluster()
                forward = self.forward_output
                if forward is None:
                    forward = bool(getattr(self.cluster, "forward_output", True))
                self._run = PipeRun(self.cluster, self.name, self.specs,
                                    None if self.inputs is None else self.entry, self.inputs,
                                    self.ordered, self.batch, forward)
            return self

    def items(self) -> Iterator[Any]:
        """Outputs as they come (``ordered=True``: in input order); lazy, starts if needed.
        A stage's failure is raised here once the outputs before it are out."""
        run = self.start()._run
        assert run is not None
        for values in run.batches():
            yield from values

    def list(self) -> List[Any]:
        """Run to the end and return every output."""
        return list(self.items())

    def join(self) -> int:
        """Run to the end, discarding the outputs; returns how many there were."""
        return sum(1 for _ in self.items())

    def stop(self) -> None:
        """Stop every stage copy now (``teardown`` runs on the copies that are idle)."""
        with self._lock:
            run = self._run
        if run is not None:
            run.close()

    @property
    def done(self) -> bool:
        """Whether the pipeline has finished, failed or been stopped."""
        run = self._run
        return run is not None and (run.done or run.closed)

    @property
    def stats(self) -> Dict[str, Any]:
        """Per-stage figures reported by the server when the pipeline finished."""
        run = self._run
        return dict(run.stats) if run is not None else {}

    @property
    def pipe_id(self) -> Optional[str]:
        """The pipeline's job id once started (``status()`` shows its first 8 characters)."""
        return None if self._run is None else self._run.pipe_id

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- observing --------------------------------------------------------------------------
    def stage_status(self) -> List[Dict[str, Any]]:
        """This pipeline's stages as the server sees them now (empty when not running)."""
        if self._run is None or self.cluster is None:
            return []
        prefix = self._run.pipe_id[:8]
        for job in self.cluster.status().get("jobs", []):
            if job.get("id") == prefix and job.get("kind") == "pipeline":
                return list(job.get("stages", []))
        return []

    def watch(self, interval: float = 0.3, file: Optional[IO[str]] = None) -> "Pipeline":
        """Print per-stage throughput, queue fill and busy copies every ``interval`` seconds
        while the pipeline runs (in a background thread); returns the pipeline."""
        out = file or sys.stdout
        self.start()

        def loop() -> None:
            last: Dict[str, Tuple[float, int]] = {}
            while not self.done:
                try:
                    stages = self.stage_status()
                except Exception:
                    return
                now = time.monotonic()
                lines = []
                for s in stages:
                    t0, n0 = last.get(s["name"], (now, s["items_out"]))
                    rate = (s["items_out"] - n0) / (now - t0) if now > t0 else 0.0
                    last[s["name"]] = (now, s["items_out"])
                    lines.append(f"  {s['name'][:24]:<24} busy {s['busy']}/{s['copies']}  "
                                 f"queue {s['queued']}/{s['bound']}  out {s['items_out']}  "
                                 f"{rate:,.0f}/s")
                if lines:
                    print(f"pipeline {self.name[:60]}:\n" + "\n".join(lines), file=out, flush=True)
                time.sleep(interval)

        self._watcher = threading.Thread(target=loop, daemon=True, name="achilles-watch")
        self._watcher.start()
        return self

    def graph(self) -> Dict[str, Any]:
        """The structure as JSON: stages (name, copies, resources, on_error, source) and
        edges, from ``"input"`` to stage ids to ``"output"``."""
        edges: List[List[Any]] = []
        if self.inputs is not None:
            edges += [["input", leaf if leaf != "out" else "output"] for leaf in _leaves(self.entry)]
        for i, spec in enumerate(self.specs):
            edges += [[i, leaf if leaf != "out" else "output"] for leaf in _leaves(spec["route"])]
        stages = [{"id": i, "name": s["name"], "copies": len(s["codes"]),
                   "resources": s["resources"], "on_error": s["on_error"], "source": s["source"],
                   "route": s["route"]} for i, s in enumerate(self.specs)]
        graph = {"name": self.name, "ordered": self.ordered, "input": self.inputs is not None,
                 "entry": self.entry if self.inputs is not None else None, "stages": stages,
                 "edges": edges}
        json.dumps(graph)
        return graph


def pipeline(*stages: Any, cluster: Any = None, ordered: bool = False, on_error: str = "fail",
             batch: int = DEFAULT_BATCH, name: Optional[str] = None,
             forward_output: Optional[bool] = None) -> Pipeline:
    """Build a stage pipeline (mpyx's ``EZ``): the first element may be an input iterable
    (read lazily; a generator function is called) or a source stage; the rest are stages or
    nested structures (``[]`` serial, ``()`` parallel, ``{}`` broadcast). Runs on ``cluster``
    (default: the default connection) when started or read.

    ``on_error``: ``"fail"`` (the stage's exception is raised by ``items()``), ``"skip"``
    (logged on the node and counted) or ``"collect"`` (:class:`StageError` objects come out
    alongside the results); a ``Stage`` subclass may set its own. ``batch``: items per
    message between stages. What stage copies print or log is printed here, prefixed with the
    node, stage and copy, while the outputs are read, unless ``forward_output=False``
    (default: the cluster's ``forward_output``).
    """
    return Pipeline(stages, cluster=cluster, ordered=ordered, on_error=on_error, batch=batch,
                    name=name, forward_output=forward_output)


EZ = pipeline
