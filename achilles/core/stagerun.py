"""The loop a pipeline stage copy runs in its own process on a node.

A stage copy is one long-lived process holding its stage object from ``setup`` to
``teardown``. Its parent (``achilles.node.stages``) sends requests over a pipe, each a pickled
``(op, seq, extra)`` header and a raw payload, and gets exactly one reply per request (except
``stop``): a pickled ``(seq, status, n_items, skipped, exhausted, errors)`` header and the
outputs as a raw payload, ``dumps_data((items, metas))``.

Requests:

- ``start``: payload is a pickled spec ``{code, name, copy, on_error, skip, source, batch}``;
  the stage is loaded and ``setup(*args)`` runs. A *source* stage runs ``setup`` in a thread
  whose ``put`` blocks while ``batch`` items wait, so an endless source holds constant memory;
  after a restart its first ``skip`` items are dropped (they were delivered already).
- ``items``: payload is ``(items, metas)``; ``do(item)`` runs on each, its ``put``\\ s are the
  outputs. Errors follow the copy's policy: ``fail`` (reply ``ITEM_ERROR`` with the error
  record), ``skip`` (logged and counted) or ``collect`` (error records returned in ``errors``).
- ``pull`` (source stages): up to ``batch`` generated items; ``exhausted`` once setup returned.
- ``end``: ``teardown()`` runs (its ``put``\\ s are outputs), the reply is sent, the process exits.
- ``stop``: ``teardown()`` runs where possible, outputs are discarded, the process exits.

With ``forward`` in the spec and a capture factory given to :func:`stage_main` (the node's
:class:`~achilles.node.capture.Capture`), what the copy prints or logs from ``start`` on is
captured, and sent between replies as a one-piece message, a pickled ``("out", (lines,
dropped))``; whole lines gathered so far go just before each reply.

The stage object is duck-typed: the runtime sets ``_achilles_emit`` (called by ``put`` with the
item and its meta), ``copy_index``, ``node_name``, and ``meta`` before each call; ``setup`` gets ``_achilles_args`` and
``_achilles_kwargs``.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from achilles.core import wire
from achilles.core.serialization import dumps_data, error_record, loads_code, loads_data

#: Seconds a pull waits for more generated items after the first one, to fill its batch.
PULL_LINGER = 0.02
_DONE = object()


class SourceStopped(BaseException):
    """Raised inside a source's ``put`` when the pipeline is stopped (ends its ``setup``)."""


class _Runner:
    """One stage object and the outputs of the request being served."""

    def __init__(self, spec: Dict[str, Any], node: str) -> None:
        self.name = str(spec["name"])
        self.copy = int(spec["copy"])
        self.node = node
        self.on_error = str(spec.get("on_error") or "fail")
        self.batch = max(1, int(spec.get("batch") or 16))
        self.skip = int(spec.get("skip") or 0)
        self.source = bool(spec.get("source"))
        self.stage = loads_code(spec["code"])
        self.items: List[Any] = []
        self.metas: List[Any] = []
        self.any_meta = False
        self.stage._achilles_emit = self.emit
        self.stage.meta = {}
        self.stage.copy_index = self.copy
        self.stage.node_name = node
        self.generated: "queue.Queue[Any]" = queue.Queue(maxsize=self.batch)
        self.stopping = False
        self.setup_error: Optional[BaseException] = None
        self.exhausted = False

    # --- outputs ----------------------------------------------------------------------------
    def emit(self, item: Any, meta: Optional[dict]) -> None:
        """``put`` of the stage: collect an output (a source blocks while its queue is full)."""
        meta = dict(meta) if meta else None
        if self.source and threading.current_thread() is not threading.main_thread():
            if self.skip > 0:
                self.skip -= 1
                return
            while True:
                if self.stopping:
                    raise SourceStopped()
                try:
                    self.generated.put((item, meta), timeout=0.1)
                    return
                except queue.Full:
                    continue
        self.items.append(item)
        self.metas.append(meta)
        if meta:
            self.any_meta = True

    def take(self) -> bytes:
        """The collected outputs as a payload; the collection starts afresh."""
        payload = dumps_data((self.items, self.metas if self.any_meta else None))
        self.items, self.metas, self.any_meta = [], [], False
        return payload

    def where(self) -> str:
        return f"stage {self.name} copy {self.copy} on node {self.node}"

    def failure(self, exc: BaseException, index: int = 0) -> bytes:
        """An error record for ``exc`` whose note names this stage copy."""
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised in {self.where()}")
        return error_record(index, exc, [])

    # --- lifecycle --------------------------------------------------------------------------
    def setup(self) -> None:
        args = getattr(self.stage, "_achilles_args", ())
        kwargs = getattr(self.stage, "_achilles_kwargs", {})
        setup = getattr(self.stage, "setup", None)
        if self.source:
            thread = threading.Thread(target=self._generate, args=(setup, args, kwargs),
                                      daemon=True, name="achilles-source")
            thread.start()
        elif setup is not None:
            setup(*args, **kwargs)

    def _generate(self, setup: Any, args: tuple, kwargs: dict) -> None:
        try:
            if setup is not None:
                setup(*args, **kwargs)
        except SourceStopped:
            pass
        except BaseException as exc:
            self.setup_error = exc
        self.generated.put(_DONE)

    def do(self, payload: bytes) -> Tuple[int, int, bytes]:
        """Run ``do`` on a batch: ``(status, skipped, errors)``; outputs stay collected."""
        items, metas = loads_data(payload)
        do = self.stage.do
        skipped = 0
        errors: List[Tuple[str, int, str, bytes, str]] = []
        for index, item in enumerate(items):
            self.stage.meta = dict(metas[index]) if metas and metas[index] else {}
            try:
                do(item)
            except Exception as exc:
                if self.on_error == "skip":
                    skipped += 1
                    sys.stderr.write(f"achilles: {self.where()} skipped an item: "
                                     f"{type(exc).__name__}: {exc}\n")
                elif self.on_error == "collect":
                    errors.append((self.name, self.copy, self.node, self.failure(exc),
                                   _safe_repr(item)))
                else:
                    self.items, self.metas = [], []
                    return wire.ITEM_ERROR, skipped, self.failure(exc, index)
        return wire.OK, skipped, pickle.dumps(errors, protocol=5) if errors else b""

    def pull(self) -> bool:
        """Collect up to ``batch`` generated items; whether the source is exhausted."""
        got = 0
        deadline: Optional[float] = None
        while got < self.batch:
            try:
                if deadline is None:
                    entry = self.generated.get()
                else:
                    entry = self.generated.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is _DONE:
                self.exhausted = True
                break
            item, meta = entry
            self.items.append(item)
            self.metas.append(meta)
            self.any_meta = self.any_meta or bool(meta)
            got += 1
            if deadline is None:
                deadline = time.monotonic() + PULL_LINGER
        return self.exhausted

    def teardown(self) -> None:
        self.stage.meta = {}
        teardown = getattr(self.stage, "teardown", None)
        if teardown is not None:
            teardown()


def _safe_repr(item: Any) -> str:
    try:
        text = repr(item)
    except Exception:
        text = f"<unprintable {type(item).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."


class _Channel:
    """The pipe to the node: replies, and captured output lines between them."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.capture: Any = None  # a Capture while output is forwarded
        self._lock = threading.Lock()

    def forward(self, make_capture: Callable[[Callable[[str, Any], None]], Any]) -> None:
        """Capture this process's output from now on."""
        self.capture = make_capture(self._send_out)
        self._lock = self.capture.lock
        self.capture.start(None)

    def _send_out(self, kind: str, data: Any) -> None:
        # Called by the capture with its lock held; "tail" is never asked for (lines go live).
        if kind == "out":
            self.conn.send_bytes(pickle.dumps(("out", data), protocol=5))

    def end_output(self) -> None:
        """Send what is left of the output, partial lines too; nothing is captured after."""
        if self.capture is not None:
            with self._lock:
                self.capture.finish(False)

    def reply(self, seq: int, status: int, n_items: int, skipped: int, exhausted: bool,
              errors: bytes, payload: bytes) -> None:
        """One reply, after the output lines gathered so far."""
        header = pickle.dumps((seq, status, n_items, skipped, exhausted, errors), protocol=5)
        with self._lock:
            if self.capture is not None:
                self.capture.send_lines()
            self.conn.send_bytes(header)
            self.conn.send_bytes(payload)


def _stop(runner: Optional[_Runner]) -> None:
    """Run ``teardown`` where possible (outputs are discarded) and exit."""
    if runner is not None:
        runner.stopping = True
        try:
            runner.teardown()
        except Exception as exc:
            sys.stderr.write(f"achilles: teardown of {runner.where()} failed while stopping: "
                             f"{type(exc).__name__}: {exc}\n")
    os._exit(0)


def stage_main(conn: Any, make_capture: Optional[Callable[..., Any]] = None) -> None:
    """Serve one stage copy's requests from ``conn`` until ``end``, ``stop`` or a closed pipe;
    ``make_capture(send)`` makes the output capture used when the spec asks to forward."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runner: Optional[_Runner] = None
    channel = _Channel(conn)
    _reply = channel.reply
    while True:
        try:
            op, seq, extra = pickle.loads(conn.recv_bytes())
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)
        try:
            if op == "stop":
                _stop(runner)
            if op == "start":
                spec = pickle.loads(payload)
                if spec.get("forward") and make_capture is not None:
                    channel.forward(make_capture)
                runner = _Runner(spec, str(extra))
                try:
                    runner.setup()
                except Exception as exc:
                    _reply(seq, wire.ITEM_ERROR, 0, 0, False, b"", runner.failure(exc))
                    continue
                n = len(runner.items)
                _reply(seq, wire.OK, n, 0, False, b"", runner.take())
            elif runner is None:
                raise RuntimeError(f"stage request {op!r} before start")
            elif op == "items":
                status, skipped, errors = runner.do(payload)
                if status != wire.OK:
                    _reply(seq, status, 0, skipped, False, b"", errors)
                    continue
                n = len(runner.items)
                _reply(seq, wire.OK, n, skipped, False, errors, runner.take())
            elif op == "pull":
                exhausted = runner.pull()
                if runner.setup_error is not None:
                    runner.items, runner.metas = [], []
                    _reply(seq, wire.ITEM_ERROR, 0, 0, False, b"",
                           runner.failure(runner.setup_error))
                    continue
                n = len(runner.items)
                _reply(seq, wire.OK, n, 0, exhausted, b"", runner.take())
            elif op == "end":
                try:
                    runner.teardown()
                except Exception as exc:
                    channel.end_output()
                    _reply(seq, wire.ITEM_ERROR, 0, 0, True, b"", runner.failure(exc))
                    os._exit(0)
                n = len(runner.items)
                channel.end_output()
                _reply(seq, wire.OK, n, 0, True, b"", runner.take())
                conn.close()
                os._exit(0)
            else:
                raise RuntimeError(f"unknown stage request {op!r}")
        except (EOFError, OSError):
            os._exit(0)
        except BaseException as exc:  # an unpicklable output, a bad request: the copy's error
            try:
                where = runner.where() if runner is not None else "a stage copy"
                if hasattr(exc, "add_note"):
                    exc.add_note(f"raised in {where}")
                _reply(seq, wire.ITEM_ERROR, 0, 0, False, b"", error_record(0, exc, []))
            except (EOFError, OSError):
                os._exit(0)
