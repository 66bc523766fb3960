"""The wire protocol: frame header, limits and message codes, free of I/O.

A frame is a 5-byte header ``!BI`` (message code, body length) followed by the body. Before
authentication bodies are small JSON objects (at most :data:`PREAUTH_MAX_FRAME` bytes); after
it they are C-pickled tuples of plain fields. The messages in :data:`PAYLOAD_CODES` end with a
task payload (opaque bytes that only worker processes and the controller unpickle), carried
raw after the pickled fields — ``!I`` fields length, fields, payload — so the server relays it
without pickling it again.
"""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any, Dict, List, Tuple

from achilles.errors import ProtocolError

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!BI")
PREAUTH_MAX_FRAME = 512
DEFAULT_MAX_FRAME = 1 << 30
PICKLE_PROTOCOL = 5

#: Chunks a controller may send for a new job before the first WANT (saves a round trip).
INITIAL_CREDIT = 2
#: Seconds of silence after which a peer counts as dead (ACHILLES_HEARTBEAT).
DEFAULT_HEARTBEAT = 10.0
#: A chunk whose item kills its worker this many times fails with WorkerCrashed (ACHILLES_MAX_CRASHES).
DEFAULT_MAX_CRASHES = 3

# --- pre-auth (JSON bodies) ---------------------------------------------------------------
HELLO = 1          # server -> peer: {"achilles", "proto", "nonce"}
AUTH = 2           # peer -> server: {"proto", "role", "user", "nonce", "proof"}
AUTH_OK = 3        # server -> peer: {"proof"}
AUTH_FAIL = 4      # server -> peer: {"reason"}
PREAUTH_CODES = frozenset({HELLO, AUTH, AUTH_OK, AUTH_FAIL})

# --- post-auth (pickled tuple bodies); the comment gives the fields ------------------------
NODE_READY = 16    # node -> server: (name, processes, hostname, pid, resources)
SUBMIT = 17        # controller -> server: (job_id, function_name, func_bytes, callback_bytes, options)
CHUNK = 18         # controller -> server: (job_id, chunk_id, n_items | payload)
END = 19           # controller -> server: (job_id, n_chunks)
WANT = 20          # server -> controller: (job_id, n_chunks, cluster_processes, capacity)
RESULT = 21        # node -> server -> controller: (job_id, chunk_id, status, elapsed, node | payload)
                   # status CRASHED: payload is pickled (exitcode, item or None[, crashes])
CANCEL = 22        # controller -> server, server -> node: (job_id, reason)
JOB_FAILED = 23    # server -> controller: (job_id, message)
TASK = 24          # server -> node: (job_id, chunk_id, payload, careful)
JOB_CODE = 25      # server -> node: (job_id, func_bytes, callback_bytes, options)
JOB_DONE = 26      # server -> node: (job_id,)
STATUS = 27        # controller -> server: (request_id,)
STATUS_REPLY = 28  # server -> controller: (request_id, status_dict)
KILL = 29          # controller -> server: (request_id,)
KILL_DONE = 30     # server -> controller: (request_id, nodes_stopped)
SHUTDOWN = 31      # server -> node: (reason,)
PING = 32          # either way: (token,)
PONG = 33          # either way: (token,)
GRAPH = 34         # controller -> server: (graph_id, funcs_bytes, tasks, outputs)
                   # tasks: [(task_id, name, deps, options, func_key, args_bytes)]
TASK_DONE = 35     # server -> controller: (graph_id, task_id, status, node, elapsed | payload)
GRAPH_DONE = 36    # server -> controller: (graph_id, report {task_id: {state, node, duration, attempts}})

#: Messages whose last field is a raw payload (``| payload`` above).
PAYLOAD_CODES = frozenset({CHUNK, RESULT, TASK, TASK_DONE})
META = struct.Struct("!I")

NAMES: Dict[int, str] = {
    value: name for name, value in globals().items() if name.isupper() and isinstance(value, int)
    and name not in ("PROTOCOL_VERSION", "PREAUTH_MAX_FRAME", "DEFAULT_MAX_FRAME", "PICKLE_PROTOCOL",
                     "INITIAL_CREDIT", "DEFAULT_MAX_CRASHES")
}

# Result status codes carried in RESULT.
OK = 0
ITEM_ERROR = 1
CRASHED = 2
TIMED_OUT = 3


def frame(code: int, body: bytes) -> bytes:
    """Encode one frame."""
    return HEADER.pack(code, len(body)) + body


def encode_json(code: int, obj: Dict[str, Any]) -> bytes:
    """Encode a pre-auth JSON frame; refuses bodies over the pre-auth cap."""
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(body) > PREAUTH_MAX_FRAME:
        raise ProtocolError(f"pre-auth frame of {len(body)} bytes exceeds {PREAUTH_MAX_FRAME}")
    return frame(code, body)


def decode_json(body: bytes) -> Dict[str, Any]:
    """Decode a pre-auth JSON body; anything but a small JSON object is a ProtocolError."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("pre-auth frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("pre-auth frame is not a JSON object")
    return obj


def encode_message(code: int, fields: Tuple[Any, ...]) -> List[bytes]:
    """Encode a post-auth message as pieces for ``writeSequence`` (no join, no payload copy
    unless the payload is a memoryview)."""
    if code in PAYLOAD_CODES:
        payload = fields[-1]
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        meta = pickle.dumps(fields[:-1], protocol=PICKLE_PROTOCOL)
        return [HEADER.pack(code, META.size + len(meta) + len(payload)), META.pack(len(meta)),
                meta, payload]
    body = pickle.dumps(fields, protocol=PICKLE_PROTOCOL)
    return [HEADER.pack(code, len(body)), body]


def decode_message(body: bytes, code: int = 0) -> Tuple[Any, ...]:
    """Decode a post-auth message body. Only call this once the peer has proven the secret.

    For :data:`PAYLOAD_CODES` the payload comes last, as a zero-copy ``memoryview`` of ``body``.
    """
    if code in PAYLOAD_CODES:
        if len(body) < META.size:
            raise ProtocolError("message body too short")
        (n,) = META.unpack_from(body, 0)
        view = memoryview(body)
        if META.size + n > len(body):
            raise ProtocolError("message fields overrun the body")
        fields = pickle.loads(view[META.size:META.size + n])
        if not isinstance(fields, tuple):
            raise ProtocolError("message body is not a tuple")
        return fields + (view[META.size + n:],)
    fields = pickle.loads(body)
    if not isinstance(fields, tuple):
        raise ProtocolError("message body is not a tuple")
    return fields


class FrameDecoder:
    """Bytes in, ``(code, body)`` frames out. Raises :class:`ProtocolError` on a bad frame.

    Feed received bytes with :meth:`feed`, then take frames one at a time with :meth:`next_frame`
    so that a handshake frame can raise the limits (:meth:`set_limit`) before the next is read.
    After a ProtocolError the decoder is dead: every later call raises again.
    """

    def __init__(self, max_frame: int = PREAUTH_MAX_FRAME, allowed: frozenset = PREAUTH_CODES):
        self._buf = bytearray()
        self._pos = 0
        self._error: "ProtocolError | None" = None
        self.max_frame = max_frame
        self.allowed = allowed

    def set_limit(self, max_frame: int, allowed: frozenset) -> None:
        """Change the size cap and the accepted codes (after the handshake)."""
        self.max_frame = max_frame
        self.allowed = allowed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        if self._error is not None:
            raise self._error
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> "Tuple[int, bytes] | None":
        """Return the next complete frame, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER.size:
            return None
        code, length = HEADER.unpack_from(buf, pos)
        if code not in self.allowed:
            hint = " (a TLS handshake? this end is not using TLS)" if code == 0x16 else ""
            self._fail(f"unexpected message code {code}{hint}")
        if length > self.max_frame:
            self._fail(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        end = pos + HEADER.size + length
        if end > len(buf):
            return None
        with memoryview(buf) as view:
            body = bytes(view[pos + HEADER.size:end])
        self._pos = end
        return code, body

    def _fail(self, reason: str) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._error = ProtocolError(reason)
        raise self._error

    def frames(self, data: bytes) -> List[Tuple[int, bytes]]:
        """Feed ``data`` and return every complete frame (limits stay as they are)."""
        self.feed(data)
        out = []
        while True:
            f = self.next_frame()
            if f is None:
                return out
            out.append(f)


ALL_CODES = frozenset(NAMES)
POSTAUTH_CODES = frozenset(c for c in NAMES if c not in PREAUTH_CODES)
