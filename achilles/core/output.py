"""Task output on the wire: the lines a task printed or logged, as UTF-8 JSON text.

A node captures what each task writes to ``sys.stdout``/``sys.stderr`` and the log records
Python would have shown (:mod:`achilles.node.capture`) and sends them as ``OUTPUT`` messages
(live, rate-limited) and ``OUTPUT_TAIL`` (the last lines of a chunk that failed); the server
relays them to the controller that owns the job. Both carry a list of lines encoded here:
``[[item, stream, text], ...]``, where ``item`` is the line's item index inside its chunk
(None for a graph task, or output outside an item) and ``stream`` one of :data:`STREAMS`.
JSON, not pickle: nothing in it is ever code.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

from achilles.core.errors import ProtocolError

#: Where a line came from: ``print``/``sys.stdout``, ``sys.stderr``, or a log record.
STREAMS = ("stdout", "stderr", "log")
#: Longest line kept (longer ones are cut and marked).
MAX_LINE = 1024
#: Lines of a failing chunk's output attached to its exception (and kept by the server).
TAIL_LINES = 20
#: Lines per second each worker process may forward; the rest are counted as dropped.
RATE = 100.0
#: Lines a worker may forward at once before :data:`RATE` applies.
BURST = 200
#: Seconds a worker gathers lines before it sends them as one message.
FLUSH_INTERVAL = 0.1
#: The most lines one message may carry (a bound the receivers check).
MAX_LINES = 2 * BURST + TAIL_LINES

Line = Tuple[Optional[int], str, str]


def clip(text: str) -> str:
    """``text`` cut to :data:`MAX_LINE` characters, saying how much was cut."""
    if len(text) <= MAX_LINE:
        return text
    return f"{text[:MAX_LINE]}... [{len(text) - MAX_LINE} more characters]"


def encode_lines(lines: List[Any]) -> bytes:
    """``[(item, stream, text), ...]`` as the UTF-8 JSON a message carries."""
    return json.dumps(lines, ensure_ascii=False, separators=(",", ":")).encode("utf-8",
                                                                              "surrogatepass")


def decode_lines(payload: Any) -> List[Line]:
    """The lines of an ``OUTPUT``/``OUTPUT_TAIL`` payload; :class:`ProtocolError` unless it is
    a JSON list of at most :data:`MAX_LINES` ``[item, stream, text]`` entries."""
    try:
        data = json.loads(bytes(payload).decode("utf-8", "replace"))
    except ValueError:
        raise ProtocolError("task output is not JSON") from None
    if not isinstance(data, list) or len(data) > MAX_LINES:
        raise ProtocolError("task output is not a list of at most "
                            f"{MAX_LINES} lines")
    lines: List[Line] = []
    for entry in data:
        if not (isinstance(entry, list) and len(entry) == 3
                and (entry[0] is None or type(entry[0]) is int)
                and entry[1] in STREAMS and isinstance(entry[2], str)):
            raise ProtocolError("malformed line in task output")
        lines.append((entry[0], entry[1], clip(entry[2])))
    return lines
