"""Pipeline stage copies on a node: one long-lived process each, fed by a supervising thread.

The server starts a copy with a ``start`` request and then sends it ``items``, ``pull`` and
``end`` requests (:mod:`achilles.core.stagerun` runs them in the process). The copy's thread
hands each request to the process in order and each answer to ``on_out``; when the process
dies, ``on_out`` gets one ``CRASHED`` answer for the copy and the copy is forgotten (the server
re-queues what it held and starts a new incarnation, here or on another node).

What a copy prints or logs comes between its answers as ``("out", (lines, dropped))``
messages (:mod:`achilles.node.capture` runs in the copy's process) and goes to ``on_output``.

Stopping a pipeline (its job was cancelled, finished, or the server is gone) drops the copies'
queued requests and asks each process to run ``teardown`` and exit; one still busy after
:data:`STOP_GRACE` seconds is killed.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from multiprocess.connection import wait

from achilles.core import wire
from achilles.node.pool import _PROCESS_LOCK, _context

log = logging.getLogger("achilles.node")

#: Seconds a stopping stage copy has to finish ``teardown`` before it is killed.
STOP_GRACE = 3.0
_STOP = ("stop", -1, b"")

#: (session, pipe id, stage, copy, incarnation)
CopyKey = Tuple[int, str, int, int, int]
#: ``on_out(key, seq, status, n_items, skipped, exhausted, errors, payload)``, from a thread.
OutHandler = Callable[[CopyKey, int, int, int, int, bool, bytes, bytes], None]
#: ``on_output(key, lines, dropped)``: lines a stage copy wrote, from a thread.
LinesHandler = Callable[[CopyKey, List[list], int], None]


def stage_process(conn: Any) -> None:
    """A stage copy process's target: :func:`~achilles.core.stagerun.stage_main` with the
    node's output capture."""
    from achilles.core.stagerun import stage_main
    from achilles.node.capture import Capture

    stage_main(conn, Capture)


@dataclass(eq=False)
class StageCopy:
    """One stage copy: its process, pipe and queue of requests."""

    key: CopyKey
    requests: "queue.Queue[Tuple[str, int, bytes]]" = field(default_factory=queue.Queue)
    proc: Any = None
    conn: Any = None
    thread: Optional[threading.Thread] = None
    stopping: bool = False

    @property
    def pid(self) -> Optional[int]:
        """The process id, once started."""
        return None if self.proc is None else self.proc.pid


class StageHost:
    """Every stage copy on this node, by :data:`CopyKey`."""

    def __init__(self, node_name: str, on_out: OutHandler,
                 on_output: Optional[LinesHandler] = None) -> None:
        self.node_name = node_name
        self.on_out = on_out
        self.on_output = on_output
        self._ctx = _context()
        self._lock = threading.Lock()
        self._copies: Dict[CopyKey, StageCopy] = {}
        self._closed = False

    def work(self, key: CopyKey, seq: int, op: str, payload: bytes) -> None:
        """Queue a request for the copy ``key`` (``start`` creates it). A request for a copy
        this node does not have is answered ``CRASHED`` so the server starts it again."""
        with self._lock:
            copy = self._copies.get(key)
            if op == "start" and copy is None and not self._closed:
                copy = self._copies[key] = StageCopy(key)
                copy.thread = threading.Thread(target=self._supervise, args=(copy,), daemon=True,
                                               name=f"achilles-stage-{key[2]}.{key[3]}")
                copy.requests.put((op, seq, payload))
                copy.thread.start()
                return
            if copy is not None and not copy.stopping:
                copy.requests.put((op, seq, payload))
                return
        self.on_out(key, seq, wire.CRASHED, 0, 0, False, b"", b"")

    def stop_pipe(self, session: int, pipe_id: str) -> int:
        """Stop every copy of one pipeline of this server session; how many were running."""
        with self._lock:
            copies = [c for k, c in self._copies.items() if k[0] == session and k[1] == pipe_id]
        for copy in copies:
            self._stop(copy)
        return len(copies)

    def stop_all(self) -> int:
        """Stop every copy (the server connection is gone); how many were running."""
        with self._lock:
            copies = list(self._copies.values())
        for copy in copies:
            self._stop(copy)
        return len(copies)

    def pids(self) -> List[int]:
        """Process ids of the running copies."""
        with self._lock:
            return [c.pid for c in self._copies.values() if c.pid is not None]

    def close(self, timeout: float = STOP_GRACE + 2.0) -> None:
        """Stop every copy and wait for their threads."""
        with self._lock:
            self._closed = True
            copies = list(self._copies.values())
        for copy in copies:
            self._stop(copy)
        for copy in copies:
            if copy.thread is not None:
                copy.thread.join(timeout)

    def _stop(self, copy: StageCopy) -> None:
        copy.stopping = True
        while True:
            try:
                copy.requests.get_nowait()
            except queue.Empty:
                break
        copy.requests.put(_STOP)
        timer = threading.Timer(STOP_GRACE, self._kill, args=(copy,))
        timer.daemon = True
        timer.start()

    @staticmethod
    def _kill(copy: StageCopy) -> None:
        proc = copy.proc
        if proc is not None:
            try:
                with _PROCESS_LOCK:
                    if proc.exitcode is None:
                        proc.kill()
            except (OSError, AttributeError, ValueError):
                pass

    def _forget(self, copy: StageCopy) -> None:
        with self._lock:
            if self._copies.get(copy.key) is copy:
                del self._copies[copy.key]

    def _start_process(self, copy: StageCopy) -> None:
        copy.conn, child = self._ctx.Pipe(duplex=True)
        copy.proc = self._ctx.Process(target=stage_process, args=(child,), daemon=True)
        try:
            with _PROCESS_LOCK:
                copy.proc.start()
        finally:
            child.close()

    def _supervise(self, copy: StageCopy) -> None:
        """Feed the copy's requests to its process, one at a time, until it ends or dies."""
        try:
            self._start_process(copy)
        except Exception as exc:
            log.error("cannot start a process for stage copy %d.%d of pipeline %s: %s",
                      copy.key[2], copy.key[3], copy.key[1][:8], exc)
            self._forget(copy)
            self.on_out(copy.key, -1, wire.CRASHED, 0, 0, False, b"", b"")
            return
        try:
            self._serve(copy)
        finally:
            self._forget(copy)
            try:
                copy.conn.close()
            except OSError:
                pass
            with _PROCESS_LOCK:
                copy.proc.join(0)

    def _serve(self, copy: StageCopy) -> None:
        while True:
            op, seq, payload = copy.requests.get()
            if op == "stop":
                try:
                    copy.conn.send_bytes(pickle.dumps(_STOP[:2] + (None,), protocol=5))
                    copy.conn.send_bytes(b"")
                except (OSError, EOFError):
                    pass
                wait([copy.proc.sentinel], STOP_GRACE)
                self._kill(copy)
                wait([copy.proc.sentinel], 5.0)
                return
            try:
                copy.conn.send_bytes(pickle.dumps((op, seq, self.node_name), protocol=5))
                copy.conn.send_bytes(payload)
                answer = self._answer(copy)
            except (OSError, EOFError):
                answer = None
            if answer is None:
                if not copy.stopping:
                    wait([copy.proc.sentinel], 1.0)
                    with _PROCESS_LOCK:
                        exitcode = copy.proc.exitcode
                    log.warning("stage copy %d.%d of pipeline %s (pid %s) died (exit code %s)",
                                copy.key[2], copy.key[3], copy.key[1][:8], copy.proc.pid,
                                exitcode)
                    self.on_out(copy.key, seq, wire.CRASHED, 0, 0, False, b"", b"")
                return
            header, out = answer
            a_seq, status, n_items, skipped, exhausted, errors = header
            if not copy.stopping:
                self.on_out(copy.key, a_seq, status, n_items, skipped, exhausted, errors, out)
            if op == "end" and status == wire.OK:
                wait([copy.proc.sentinel], 5.0)
                return

    def _answer(self, copy: StageCopy) -> Optional[Tuple[tuple, bytes]]:
        """The process's reply to the request just sent (output lines before it go to
        ``on_output``), or None if it died first."""
        while True:
            if copy.conn not in wait([copy.conn, copy.proc.sentinel]):
                return None
            header = pickle.loads(copy.conn.recv_bytes())
            if header[0] != "out":
                break
            if self.on_output is not None and not copy.stopping:
                lines, dropped = header[1]
                self.on_output(copy.key, lines, dropped)
        if copy.conn not in wait([copy.conn, copy.proc.sentinel]):
            return None
        return header, copy.conn.recv_bytes()
