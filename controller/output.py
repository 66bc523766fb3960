"""Task output in the caller: printed as it arrives, and attached to a failure.

A job's or graph's run hands each :class:`~achilles.controller.events.Output` to
:meth:`OutputPrinter.show`, which prints every line with a short prefix naming the node and
the item (``(node-1 item 17) text``) or graph task (``(node-1 task add#3) text``): ``print``
output to ``sys.stdout``, ``sys.stderr`` and log records to ``sys.stderr``, and a notice when
the node's rate limit dropped lines (tqdm progress bars are cleared around them). :class:`~achilles.controller.events.OutputTail` (the
last lines of a chunk whose failure comes next) is kept until :meth:`OutputPrinter.attach`
puts it on the exception: as a note, and as the attribute ``task_output`` (a list of lines).
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Dict, List, Optional, TextIO, Tuple

from achilles.controller.events import Output, OutputTail
from achilles.core.errors import ProtocolError
from achilles.core.logs import printable
from achilles.core.output import MAX_LINE, RATE, Line, decode_lines

log = logging.getLogger("achilles.controller")

#: ``label(item)``: what a line's prefix names besides the node (``item 17``, ``task f#3``);
#: ``item`` is the index inside the chunk, or None.
Label = Callable[[Optional[int]], str]


def _decode(payload: bytes, chunk_id: int) -> List[Line]:
    try:
        return decode_lines(payload)
    except ProtocolError as exc:
        log.warning("ignored malformed output of chunk %d: %s", chunk_id, exc)
        return []


def _write(stream: TextIO, text: str) -> None:
    """Write ``text``; progress bars drawn by tqdm (``progress=True``) are cleared first and
    redrawn after, so lines and bars do not run into each other."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        stream.write(text)
        return
    with tqdm_module.tqdm.external_write_mode(file=stream):
        stream.write(text)


class OutputPrinter:
    """Prints one job's forwarded output and keeps its failing chunks' last lines."""

    def __init__(self) -> None:
        self._tails: Dict[int, Tuple[str, List[Line]]] = {}

    def show(self, event: Output, label: Label) -> None:
        """Print the event's lines with their prefix, and say how many were dropped."""
        out: List[str] = []
        err: List[str] = []
        for item, stream, text in _decode(event.payload, event.chunk_id):
            (out if stream == "stdout" else err).append(f"({event.node} {label(item)}) {text}\n")
        if event.dropped:
            err.append(f"({event.node} {label(None)}) [achilles: {event.dropped} more line(s) "
                       f"of output dropped: the node forwards at most {RATE:g} lines/s per "
                       "worker process]\n")
        if out:
            _write(sys.stdout, "".join(out))
        if err:
            _write(sys.stderr, "".join(err))

    def keep_tail(self, event: OutputTail) -> None:
        """Remember the last lines of a chunk whose failure comes next."""
        self._tails[event.chunk_id] = (event.node, _decode(event.payload, event.chunk_id))

    def forget(self, chunk_id: int) -> None:
        """The chunk is answered: drop what was kept for it."""
        self._tails.pop(chunk_id, None)

    def attach(self, exc: BaseException, chunk_id: int, label: Label) -> None:
        """Put the chunk's last lines of output on its exception (as ``exc.task_output``
        and a note), if any came."""
        node, lines = self._tails.pop(chunk_id, ("", []))
        if not lines:
            return
        try:
            exc.task_output = [text for _, _, text in lines]  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with __slots__
            pass
        if hasattr(exc, "add_note"):
            shown = "\n".join(f"  {label(item)}: {printable(text, MAX_LINE)}"
                              for item, _, text in lines)
            exc.add_note(f"last {len(lines)} line(s) of its output (node {node}):\n{shown}")
