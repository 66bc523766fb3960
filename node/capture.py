"""Capturing a task's output inside a worker process, bounded, for the node to forward.

While a chunk runs with output forwarding on, ``sys.stdout`` and ``sys.stderr`` are streams
of this module that split what is written into lines, and the log records Python would have
printed by itself (``logging.lastResort``, WARNING and above when nothing is configured) are
lines too; log handlers the task configures write to ``sys.stderr`` and are caught there.
Output written straight to the file descriptors (C code, subprocesses) is not captured: it
goes where the node's own output goes, as does everything while forwarding is off.

Lines are not sent one by one: a background thread sends what gathered every
:data:`~achilles.core.output.FLUSH_INTERVAL` seconds, ``flush()`` (``print(..., flush=True)``)
sends at once (up to :data:`FLUSHES` times a second), and the chunk's end sends the rest
before its result. So a worker sends at most about twenty messages a second, plus one per
chunk that wrote something. A token bucket (:data:`~achilles.core.output.RATE` lines per second after
a burst of :data:`~achilles.core.output.BURST`, per worker process) bounds what leaves the
worker; lines over it are counted and the count travels with the next message. The last
:data:`~achilles.core.output.TAIL_LINES` lines of a chunk are kept whatever the limit, and
sent when the chunk fails.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, TextIO

from achilles.core.output import BURST, FLUSH_INTERVAL, RATE, TAIL_LINES, clip, MAX_LINE

#: ``send(kind, data)``: one message to the parent (see :class:`Capture`).
Sender = Callable[[str, Any], None]
#: Explicit ``flush()`` calls that send at once, per second (and at once after a pause).
FLUSHES = 10


class _Stream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` of a worker: captured while a chunk runs with
    forwarding on, the original stream otherwise."""

    def __init__(self, capture: "Capture", name: str, original: TextIO) -> None:
        super().__init__()
        self._capture = capture
        self._name = name
        self.original = original

    def write(self, text: str) -> int:
        if self._capture.write(self._name, text):
            return len(text)
        return self.original.write(text)

    def flush(self) -> None:
        if self._capture.active:
            self._capture.flush()
        else:
            self.original.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def buffer(self) -> "_Binary":
        """Bytes written here are text too (decoded as UTF-8)."""
        return _Binary(self)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", None) or "utf-8"

    @property
    def errors(self) -> Optional[str]:  # type: ignore[override]
        return getattr(self.original, "errors", None)


class _Binary(io.RawIOBase):
    """``sys.stdout.buffer`` of a captured stream: bytes decoded and written as text."""

    def __init__(self, text: _Stream) -> None:
        super().__init__()
        self._text = text

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if not self._text._capture.active:
            return int(self._text.original.buffer.write(data))
        self._text.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        self._text.flush()


class _LastResort(logging.Handler):
    """Stands in for ``logging.lastResort``: the records Python would print when no handler
    is configured become captured lines (the original handler prints them otherwise)."""

    def __init__(self, capture: "Capture", original: Optional[logging.Handler]) -> None:
        super().__init__(logging.WARNING)
        self._capture = capture
        self.original = original
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def handle(self, record: logging.LogRecord) -> bool:
        if not self._capture.active:
            return bool(self.original.handle(record)) if self.original is not None else False
        return bool(super().handle(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._capture.write_lines("log", text.split("\n"))


class Capture:
    """One worker process's output capture. :meth:`start` before a chunk, :meth:`finish`
    after it; ``send(kind, data)`` writes one message to the parent (``"out"`` with
    ``(lines, dropped)``, ``"tail"`` with the lines) and is only called with :attr:`lock`
    held, which the worker also holds to send a result."""

    def __init__(self, send: Sender) -> None:
        self.send = send
        self.lock = threading.Lock()
        self.active = False
        self._results: Optional[list] = None  # the running chunk's results: len() is the item
        # text written since the stream's last newline, and the item that wrote its start
        self._partial: Dict[str, str] = {"stdout": "", "stderr": ""}
        self._partial_item: Dict[str, Optional[int]] = {"stdout": None, "stderr": None}
        self._pending: List[list] = []
        self._dropped = 0
        self._tail: Deque[list] = collections.deque(maxlen=TAIL_LINES)
        self._kept: List[list] = []  # lines of failed items of the chunk (keep_lines_of)
        self._tokens = float(BURST)
        self._stamp = time.monotonic()
        self._flushes = float(FLUSHES)  # a token bucket for explicit flushes
        self._flush_stamp = self._stamp
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stdout = _Stream(self, "stdout", sys.stdout)
        self.stderr = _Stream(self, "stderr", sys.stderr)
        self.last_resort = _LastResort(self, logging.lastResort)
        sys.stdout = self.stdout
        sys.stderr = self.stderr
        logging.lastResort = self.last_resort
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        # A process the task forks writes to the node's streams: the lock may have been held
        # by another thread at the fork, and its lines would have no chunk.
        self.lock = threading.Lock()
        self.active = False
        self._thread = None

    def start(self, results: Optional[list]) -> None:
        """A chunk starts; ``results`` is its results list (None for a graph task)."""
        if sys.stdout is not self.stdout:
            sys.stdout = self.stdout
        if sys.stderr is not self.stderr:
            sys.stderr = self.stderr
        logging.lastResort = self.last_resort
        with self.lock:
            self._results = results
            self.active = True

    def keep_lines_of(self, item: int) -> None:
        """Item ``item`` failed: its lines among the last ones are what :meth:`finish` sends
        as the tail (with those of other items kept so), however many lines come after."""
        with self.lock:
            self._kept.extend(line for line in self._tail if line[0] == item)

    def track(self, results: list) -> None:
        """From now on the running task's index is ``len(results)`` (a batch of graph tasks
        tells each line's task this way)."""
        with self.lock:
            self._results = results

    def write(self, stream: str, text: str) -> bool:
        """Text written to ``stream``: whole lines become captured lines, the rest waits.
        False (nothing taken) when no chunk is being captured."""
        with self.lock:
            if not self.active:
                return False
            old = self._partial[stream]
            item = self._partial_item[stream] if old else self._item()
            buf = old + text
            if "\n" not in buf and len(buf) <= MAX_LINE:
                self._partial[stream] = buf
                self._partial_item[stream] = item
                return True
            lines = buf.split("\n")
            rest = lines.pop()
            if len(rest) > MAX_LINE:
                lines.append(rest)
                rest = ""
            self._add(stream, lines, item)
            self._partial[stream] = rest
            self._partial_item[stream] = self._item()
            return True

    def write_lines(self, stream: str, lines: List[str]) -> None:
        """Whole lines for ``stream``."""
        with self.lock:
            if self.active:
                self._add(stream, lines, self._item())

    def _item(self) -> Optional[int]:
        """The index in its chunk of the item running now (None in a graph task)."""
        return None if self._results is None else len(self._results)

    def _add(self, stream: str, lines: List[str], item: Optional[int]) -> None:
        now = time.monotonic()
        self._tokens = min(float(BURST), self._tokens + (now - self._stamp) * RATE)
        self._stamp = now
        for text in lines:
            if "\r" in text:  # a progress bar redraws its line: keep what was shown last
                text = text.rstrip("\r").rsplit("\r", 1)[-1]
            line = [item, stream, clip(text)]
            self._tail.append(line)
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                self._pending.append(line)
            else:
                self._dropped += 1
        if self._pending or self._dropped:
            if self._thread is None:
                self._thread = threading.Thread(target=self._flusher, daemon=True,
                                                name="achilles-output")
                self._thread.start()
            self._wake.set()

    def flush(self) -> None:
        """Send the whole lines gathered so far now (``print(..., flush=True)``), up to
        :data:`FLUSHES` times a second; more often, the background thread sends them."""
        with self.lock:
            if not (self.active and self._pending):
                return
            now = time.monotonic()
            self._flushes = min(float(FLUSHES), self._flushes + (now - self._flush_stamp) * FLUSHES)
            self._flush_stamp = now
            if self._flushes >= 1.0:
                self._flushes -= 1.0
                self._flush()
            else:
                self._wake.set()

    def _flusher(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(FLUSH_INTERVAL)
            with self.lock:
                self._wake.clear()
                if self.active:
                    self._flush()

    def send_lines(self) -> None:
        """Send the whole lines gathered so far (call with :attr:`lock` held); a stage copy
        does so before each answer, so its lines arrive ahead of the outputs they precede."""
        if self.active:
            self._flush()

    def _flush(self) -> None:
        """Send the gathered lines and the drop count (call with :attr:`lock` held)."""
        if self._pending or self._dropped:
            pending, self._pending = self._pending, []
            dropped, self._dropped = self._dropped, 0
            self.send("out", (pending, dropped))

    def finish(self, failed: bool) -> None:
        """The chunk ended (call with :attr:`lock` held, then send its result): send what is
        left, and with ``failed`` its last lines."""
        if not self.active:
            return
        for stream, rest in self._partial.items():
            if rest:
                self._partial[stream] = ""
                self._add(stream, [rest], self._partial_item[stream])
        self._flush()
        if failed and (self._kept or self._tail):
            self.send("tail", self._kept[-TAIL_LINES:] if self._kept else list(self._tail))
        self._tail.clear()
        self._kept = []
        self._results = None
        self.active = False
