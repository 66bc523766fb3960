"""One stage pipeline as seen by the caller's thread: feed source items on credit, gather outputs.

The server runs the stages (:mod:`achilles.server.pipelines`); only the source input and the
final outputs cross this connection. Input is read lazily, only as the server grants credit
(``WANT``) and, with ``ordered=True``, while fewer than a window of source batches are still
open, so an endless generator holds a bounded amount here. Outputs are acknowledged to the
server as the caller consumes them (unordered), which is what slows the last stages down when
the caller reads slowly. What stage copies print or log (``PIPE_OUTPUT``) is printed here as it
comes, prefixed with the node, stage and copy.
"""

from __future__ import annotations

import collections
import itertools
import queue
import uuid
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from achilles.core import wire
from achilles.core.errors import ConnectionLost, JobCancelled
from achilles.core.serialization import dumps_data, load_error, loads_data
from achilles.controller.events import (Cancelled, ConnectionLostEvent, Event, JobFailed, JobLink,
                                        Output, PipeOutput, PipeResult, Want)
from achilles.controller.output import OutputPrinter

#: PIPE_RESULT kinds (see :mod:`achilles.server.pipelines`).
ITEMS, ERRORS, FAILED, DONE = 0, 1, 2, 3
#: Source batches open at once with ``ordered=True`` (at least; grows with the cluster).
MIN_ORDERED_WINDOW = 8
#: Acknowledgements held back to ride on the next input batch (well below the server's window
#: of 8 unacknowledged result batches, so the last stages never wait for them).
ACK_EVERY = 4


@dataclass(frozen=True)
class StageError:
    """An error a stage raised on one item under ``on_error="collect"``; it comes out of
    ``items()`` alongside the results. ``exception`` is the stage's own exception (remote
    traceback as ``__cause__``); ``item`` is the input's ``repr``."""

    stage: str
    copy: int
    node: str
    exception: BaseException
    item: str

    def __repr__(self) -> str:
        return (f"StageError(stage={self.stage!r}, copy={self.copy}, node={self.node!r}, "
                f"exception={self.exception!r}, item={self.item})")


class PipeRun:
    """Starts a pipeline on creation; :meth:`batches` yields lists of outputs."""

    def __init__(self, link: JobLink, name: str, stages: List[Dict[str, Any]], entry: Any,
                 inputs: Optional[Iterable[Any]], ordered: bool, batch: int,
                 forward_output: bool = True) -> None:
        self.link = link
        self.ordered = ordered
        self.batch = max(1, int(batch))
        self.pipe_id = uuid.uuid4().hex
        self.events: "queue.Queue[Event]" = queue.Queue()
        self._conn = link.register(self.pipe_id, self.events)
        self._input = iter(inputs) if inputs is not None else None
        self.exhausted = inputs is None
        self.credit = 0
        self.size = 1
        self.batches_sent = 0
        self.items_sent = 0
        self.window = MIN_ORDERED_WINDOW
        self.open: Set[int] = set()  # source batches sent whose outputs are not all out yet
        self.pieces: Dict[int, List[Tuple[tuple, int, list]]] = collections.defaultdict(list)
        self.complete: Set[int] = set()
        self.next_origin = 0
        self.arrival = itertools.count()
        self.ready: Deque[Tuple[list, bool]] = collections.deque()  # (outputs, acknowledged)
        self.error: Optional[BaseException] = None
        self.done = False
        self.closed = False
        self.stats: Dict[str, Any] = {}
        self.unsent_acks = 0
        self.stage_names = [str(s.get("name", i)) for i, s in enumerate(stages)]
        self.printer = OutputPrinter()
        options: Dict[str, Any] = {"entry": entry, "batch": self.batch}
        if not forward_output:
            options["output"] = False
        self.link.send([wire.encode_message(wire.PIPE_START, (
            self.pipe_id, name, stages, options))])

    # --- input ------------------------------------------------------------------------------
    def _fill(self) -> None:
        messages = []
        while (self.credit > 0 and not self.exhausted and self._input is not None
               and (not self.ordered or len(self.open) + len(self.ready) < self.window)):
            items = list(itertools.islice(self._input, self.size))
            end = len(items) < self.size
            if items:
                batch_id = self.batches_sent
                self.batches_sent += 1
                self.items_sent += len(items)
                self.open.add(batch_id)
                self.credit -= 1
                acks, self.unsent_acks = self.unsent_acks, 0
                messages.append(wire.encode_message(wire.PIPE_FEED, (
                    self.pipe_id, batch_id, len(items), acks, end, dumps_data((items, None)))))
            elif end:
                acks, self.unsent_acks = self.unsent_acks, 0
                messages.append(wire.encode_message(wire.PIPE_FEED, (
                    self.pipe_id, 0, 0, acks, True, b"")))
            self.size = min(self.batch, self.size * 2)
            if end:
                self.exhausted = True
        if messages:
            self.link.send(messages)

    def _ack(self, n: int) -> None:
        """Acknowledge ``n`` result batches: with the next input batch while input is still
        being read and fewer than :data:`ACK_EVERY` wait, else now."""
        self.unsent_acks += n
        if self.unsent_acks and (self.exhausted or self.unsent_acks >= ACK_EVERY):
            n, self.unsent_acks = self.unsent_acks, 0
            if not self.done and not self.closed:
                self.link.send([wire.encode_message(wire.PIPE_FEED, (self.pipe_id, 0, 0, n,
                                                                     False, b""))])

    # --- results ----------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        match event:
            case Want(n=n, processes=processes):
                self.credit += n
                self.window = max(MIN_ORDERED_WINDOW, 4 * processes)
            case PipeResult():
                self._result(event)
            case PipeOutput(stage=stage, copy=copy):
                name = (self.stage_names[stage] if 0 <= stage < len(self.stage_names)
                        else f"stage{stage}")
                self.printer.show(Output(stage, event.node, event.dropped, event.payload),
                                  lambda _item: f"stage {name}.{copy}")
            case Cancelled():
                self.closed = True
            case JobFailed(message=message):
                raise JobCancelled(f"pipeline {self.pipe_id[:8]} failed on the server: {message}")
            case ConnectionLostEvent(reason=reason, conn_id=conn_id) if conn_id == self._conn:
                self.done = True
                raise ConnectionLost(
                    f"lost the connection to the server ({reason}) while pipeline "
                    f"{self.pipe_id[:8]} ran; a pipeline's stage state lives on the cluster, "
                    "so it is not resumed: run it again")

    def _result(self, event: PipeResult) -> None:
        if event.kind == FAILED:
            _, exc, _ = load_error(event.payload)
            if self.error is None:
                self.error = exc
            self.done = True
            return
        if event.kind == DONE:
            self.stats = loads_data(event.payload) if event.payload else {}
            self.done = True
            return
        values: list
        if event.kind == ERRORS:
            values = [StageError(stage, copy, node, load_error(record)[1], item)
                      for stage, copy, node, record, item in loads_data(event.payload)]
        else:
            values = loads_data(event.payload)[0] if event.payload else []
        if not self.ordered or event.origin < 0:
            if values:
                self.ready.append((values, False))  # acknowledged when the caller takes it
            else:
                self._ack(1)
            return
        # Ordered: acknowledged at once (an early origin may wait for a late one); the input
        # window bounds what is held here.
        self._ack(1)
        self.pieces[event.origin].append((event.key, next(self.arrival), values))
        if event.last:
            self.complete.add(event.origin)
        while self.next_origin in self.complete:
            origin = self.next_origin
            self.complete.discard(origin)
            self.open.discard(origin)
            parts = sorted(self.pieces.pop(origin, []), key=lambda p: (p[0], p[1]))
            merged = [v for _, _, vs in parts for v in vs]
            if merged:
                self.ready.append((merged, True))
            self.next_origin += 1

    def batches(self) -> Iterator[list]:
        """Yield lists of outputs as they come (``ordered``: in source order); raise the
        pipeline's failure once the outputs before it are out."""
        try:
            while True:
                while self.ready:
                    values, acked = self.ready.popleft()
                    if not acked:
                        self._ack(1)
                    yield values
                if self.error is not None:
                    raise self.error
                if self.done or self.closed:
                    return
                self._fill()
                self._handle(self.events.get())
        finally:
            self.close()

    def close(self, reason: str = "stopped by the caller") -> None:
        """Stop the pipeline on the server if it has not finished; stop listening for it. A
        reader blocked in :meth:`batches` in another thread returns."""
        if not self.done and not self.closed:
            self.link.send([wire.encode_message(wire.CANCEL, (self.pipe_id, reason))])
        self.closed = True
        self.events.put(Cancelled(reason))  # wakes a reader blocked in another thread
        self.link.unregister(self.pipe_id)
