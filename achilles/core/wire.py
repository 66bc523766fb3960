"""The wire protocol: frame header, limits and the message registry, free of I/O.

A frame is a 5-byte header ``!BI`` (message code, body length) followed by the body. Before
authentication bodies are small JSON objects (at most :data:`PREAUTH_MAX_FRAME` bytes); after
it they are C-pickled tuples of plain fields, and every frame ends with a tag that binds it to
the session (:mod:`achilles.core.session`). Messages declared with ``payload=True`` end with a task
payload (opaque bytes that only worker processes and the controller unpickle), carried raw
after the pickled fields — ``!I`` fields length, fields, payload — so the server relays it
without pickling it again. Between processes proven to share a host, a large ``CHUNK``,
``TASK`` or ``RESULT`` payload of a map job may instead be a shared-memory reference
(:mod:`achilles.core.shm`; it starts with ``0x00``, a pickle never does).

Every message is declared once in :data:`REGISTRY` (code, typed fields, raw payload or not,
which role may send it to which, and in which phase); encoding, decoding and validation all
read that declaration, so a frame whose fields have the wrong number or types is a
:class:`ProtocolError` before any handler runs. Adding a message is two edits: its
declaration here and a ``@handles`` method on the role that receives it.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import AbstractSet, Any, Dict, FrozenSet, List, NoReturn, Tuple

from achilles.core.errors import ProtocolError
from achilles.core.session import TAG_SIZE, FrameOpener

PROTOCOL_VERSION = 3
HEADER = struct.Struct("!BI")
PREAUTH_MAX_FRAME = 512
#: The largest post-auth frame, by default (ACHILLES_MAX_FRAME).
DEFAULT_MAX_FRAME = 256 << 20
PICKLE_PROTOCOL = 5

#: Chunks a controller may send for a new job before the first WANT (saves a round trip).
INITIAL_CREDIT = 2
#: Seconds of silence after which a peer counts as dead (ACHILLES_HEARTBEAT).
DEFAULT_HEARTBEAT = 10.0
#: A chunk whose item kills its worker this many times fails with WorkerCrashed (ACHILLES_MAX_CRASHES).
DEFAULT_MAX_CRASHES = 3

ROLES = ("server", "node", "controller")


class Msg(IntEnum):
    """Message codes. Pre-auth codes are below 16."""

    HELLO = 1
    AUTH = 2
    AUTH_OK = 3
    AUTH_FAIL = 4
    NODE_READY = 16
    SUBMIT = 17
    CHUNK = 18
    END = 19
    WANT = 20
    RESULT = 21
    CANCEL = 22
    JOB_FAILED = 23
    TASK = 24
    JOB_CODE = 25
    JOB_DONE = 26
    STATUS = 27
    STATUS_REPLY = 28
    KILL = 29
    KILL_DONE = 30
    SHUTDOWN = 31
    PING = 32
    PONG = 33
    GRAPH = 34
    TASK_DONE = 35
    GRAPH_DONE = 36
    NODE_LOAD = 37
    TASK_PROGRESS = 40
    JOB_PROGRESS = 41
    WATCH = 42
    TASK_ERROR = 44
    BATCH = 54
    PIPE_START = 55
    PIPE_FEED = 56
    PIPE_WORK = 57
    PIPE_OUT = 58
    PIPE_RESULT = 59
    OUTPUT = 48
    OUTPUT_TAIL = 49
    PIPE_OUTPUT = 62
    SHM_PROBE = 63
    SHM_OK = 64


@dataclass(frozen=True)
class Field:
    """One field of a message: its name and the Python types it may hold."""

    name: str
    types: Tuple[type, ...]


@dataclass(frozen=True)
class Message:
    """The declaration of one message type."""

    code: Msg
    fields: Tuple[Field, ...]
    routes: FrozenSet[Tuple[str, str]]  # (sender role, receiver role)
    payload: bool = False  # the last field is a raw payload, carried after the pickled fields
    preauth: bool = False  # a JSON frame of the handshake (fields are its keys)
    doc: str = ""
    #: Each field's accepted types, in order (kept: :func:`validate` runs per message).
    types: Tuple[Tuple[type, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "types", tuple(f.types for f in self.fields))

    @property
    def name(self) -> str:
        return self.code.name


STR: Tuple[type, ...] = (str,)
INT: Tuple[type, ...] = (int,)
NUM: Tuple[type, ...] = (int, float)
OPT_NUM: Tuple[type, ...] = (int, float, type(None))
BOOL: Tuple[type, ...] = (bool,)
BYTES: Tuple[type, ...] = (bytes,)
DICT: Tuple[type, ...] = (dict,)
LIST: Tuple[type, ...] = (list, tuple)
ANY: Tuple[type, ...] = (object,)
PAYLOAD: Tuple[type, ...] = (bytes, bytearray, memoryview)

S, N, C = "server", "node", "controller"
TO_PEERS = frozenset({(S, N), (S, C)})
FROM_PEERS = frozenset({(N, S), (C, S)})
EITHER_WAY = TO_PEERS | FROM_PEERS

REGISTRY: Dict[int, Message] = {}


def declare(code: Msg, *fields: Tuple[str, Tuple[type, ...]],
            routes: AbstractSet[Tuple[str, str]],
            payload: bool = False, preauth: bool = False, doc: str = "") -> Message:
    """Add one message to :data:`REGISTRY`."""
    if code in REGISTRY:
        raise ValueError(f"{code.name} is declared twice")
    message = Message(code, tuple(Field(n, t) for n, t in fields), frozenset(routes), payload,
                      preauth, doc)
    REGISTRY[code] = message
    return message


# --- pre-auth: small JSON objects (see achilles.core.handshake) ---------------------------
declare(Msg.HELLO, ("achilles", INT), ("proto", INT), ("nonce", STR), ("max_frame", INT),
        routes=TO_PEERS,
        preauth=True, doc="the server opens the handshake")
declare(Msg.AUTH, ("proto", INT), ("role", STR), ("user", STR), ("nonce", STR), ("proof", STR),
        routes=FROM_PEERS, preauth=True, doc="the peer proves the secret")
declare(Msg.AUTH_OK, ("proof", STR), routes=TO_PEERS, preauth=True,
        doc="the server proves the secret")
declare(Msg.AUTH_FAIL, ("reason", STR), routes=TO_PEERS, preauth=True,
        doc="the server refuses the peer and closes")

# --- post-auth: pickled tuples -----------------------------------------------------------
declare(Msg.NODE_READY, ("name", STR), ("processes", INT), ("hostname", STR), ("pid", INT),
        ("resources", DICT), routes={(N, S)}, doc="a node announces itself")
declare(Msg.SUBMIT, ("job_id", STR), ("function", STR), ("func_bytes", BYTES),
        ("callback_bytes", BYTES), ("options", DICT), routes={(C, S)}, doc="start a map job")
declare(Msg.CHUNK, ("job_id", STR), ("chunk_id", INT), ("n_items", INT), ("payload", PAYLOAD),
        routes={(C, S)}, payload=True, doc="a slice of a job's input")
declare(Msg.END, ("job_id", STR), ("n_chunks", INT), routes={(C, S)},
        doc="the job's input is exhausted after n_chunks chunks on this connection")
declare(Msg.WANT, ("job_id", STR), ("n_chunks", INT), ("processes", INT), ("capacity", INT),
        routes={(S, C)}, doc="the server asks for more input")
declare(Msg.RESULT, ("job_id", STR), ("chunk_id", INT), ("status", INT), ("elapsed", NUM),
        ("node", STR), ("payload", PAYLOAD), routes={(N, S), (S, C)}, payload=True,
        doc="a chunk's results (status OK), error record (ITEM_ERROR) or crash record (CRASHED)")
declare(Msg.CANCEL, ("job_id", STR), ("reason", STR), routes={(C, S), (S, N)},
        doc="drop a job; nodes kill its running tasks")
declare(Msg.JOB_FAILED, ("job_id", STR), ("message", STR), routes={(S, C)},
        doc="the server refused or dropped a job")
declare(Msg.TASK, ("job_id", STR), ("chunk_id", INT), ("careful", BOOL), ("timeout", OPT_NUM),
        ("payload", PAYLOAD), routes={(S, N)}, payload=True, doc="run a chunk")
declare(Msg.JOB_CODE, ("job_id", STR), ("func_bytes", BYTES), ("callback_bytes", BYTES),
        ("options", DICT), routes={(S, N)}, doc="a job's function, sent before its first TASK")
declare(Msg.JOB_DONE, ("job_ids", LIST), routes={(S, N)},
        doc="forget finished jobs' code (one message for every job that finished lately)")
declare(Msg.STATUS, ("request_id", INT), routes={(C, S)}, doc="ask for the cluster status")
declare(Msg.STATUS_REPLY, ("request_id", INT), ("status", DICT), routes={(S, C)},
        doc="the cluster status")
declare(Msg.KILL, ("request_id", INT), routes={(C, S)}, doc="stop every node and the server")
declare(Msg.KILL_DONE, ("request_id", INT), ("nodes_stopped", INT), routes={(S, C)},
        doc="the cluster is stopping")
declare(Msg.SHUTDOWN, ("reason", STR), routes={(S, N)}, doc="the node must exit")
declare(Msg.PING, ("token", INT), routes=EITHER_WAY, doc="heartbeat")
declare(Msg.PONG, ("token", INT), routes=EITHER_WAY, doc="heartbeat answer")
declare(Msg.GRAPH, ("graph_id", STR), ("funcs", BYTES), ("tasks", LIST), ("outputs", LIST),
        routes={(C, S)},
        doc="a call graph; tasks: [(task_id, name, deps, options, func_key, args)], args as "
            "achilles.core.taskrefs ships them")
declare(Msg.TASK_DONE, ("graph_id", STR), ("task_id", INT), ("status", INT), ("node", STR),
        ("elapsed", NUM), ("payload", PAYLOAD), routes={(S, C)}, payload=True,
        doc="an output task's value, or a task's failure")
declare(Msg.GRAPH_DONE, ("graph_id", STR), ("report", DICT), routes={(S, C)},
        doc="{task_id: {state, node, duration, attempts}}")
declare(Msg.NODE_LOAD, ("load1", NUM), ("cpus", INT), ("mem_total", INT), ("mem_available", INT),
        routes={(N, S)}, doc="the node host's load average, CPUs and memory (bytes; 0: unknown)")
declare(Msg.TASK_ERROR, ("job_id", STR), ("chunk_id", INT), ("index", INT), ("type_name", STR),
        ("message", STR), ("traceback", STR), ("output", LIST), routes={(N, S)},
        doc="plain text of a task's error, sent before its ITEM_ERROR result so the server can "
            "show it without unpickling anything; output: the task's last lines, if captured")
declare(Msg.PIPE_START, ("pipe_id", STR), ("name", STR), ("stages", LIST), ("options", DICT),
        routes={(C, S)},
        doc="start a stage pipeline; stages: [{name, codes, resources, route, source}]")
declare(Msg.PIPE_FEED, ("pipe_id", STR), ("batch", INT), ("n_items", INT), ("consumed", INT),
        ("end", BOOL), ("payload", PAYLOAD), routes={(C, S)}, payload=True,
        doc="source items (n_items > 0), result batches the caller consumed, end of input")
declare(Msg.PIPE_WORK, ("pipe_id", STR), ("stage", INT), ("copy", INT), ("incarnation", INT),
        ("seq", INT), ("op", STR), ("payload", PAYLOAD), routes={(S, N)}, payload=True,
        doc="a stage copy's next request: start, items, pull, end")
declare(Msg.PIPE_OUT, ("pipe_id", STR), ("stage", INT), ("copy", INT), ("incarnation", INT),
        ("seq", INT), ("status", INT), ("n_items", INT), ("skipped", INT), ("exhausted", BOOL),
        ("errors", BYTES), ("payload", PAYLOAD), routes={(N, S)}, payload=True,
        doc="a stage copy's answer to one request: its outputs, or its failure")
declare(Msg.PIPE_RESULT, ("pipe_id", STR), ("origin", INT), ("key", LIST), ("last", BOOL),
        ("kind", INT), ("payload", PAYLOAD), routes={(S, C)}, payload=True,
        doc="final outputs of a source batch (kind 0), collected errors (1), failure (2), done (3)")
declare(Msg.OUTPUT, ("job_id", STR), ("chunk_id", INT), ("node", STR), ("dropped", INT),
        ("payload", PAYLOAD), routes={(N, S), (S, C)}, payload=True,
        doc="lines a running chunk or graph task printed or logged (UTF-8 JSON, see "
            "achilles.core.output), and how many more the node's rate limit dropped")
declare(Msg.OUTPUT_TAIL, ("job_id", STR), ("chunk_id", INT), ("node", STR),
        ("payload", PAYLOAD), routes={(N, S), (S, C)}, payload=True,
        doc="the last lines of a failed chunk's output, sent just before its failed result")
declare(Msg.PIPE_OUTPUT, ("pipe_id", STR), ("stage", INT), ("copy", INT), ("node", STR),
        ("dropped", INT), ("payload", PAYLOAD), routes={(N, S), (S, C)}, payload=True,
        doc="lines a pipeline's stage copy printed or logged (as OUTPUT's payload), and how "
            "many more its rate limit dropped")
declare(Msg.TASK_PROGRESS, ("job_id", STR), ("chunk_id", INT), ("n", NUM), routes={(N, S)},
        doc="a running chunk's task called report_progress: n more items' worth is done")
declare(Msg.WATCH, ("job_id", STR), routes={(C, S)},
        doc="send JOB_PROGRESS for this job (after its SUBMIT or GRAPH)")
declare(Msg.JOB_PROGRESS, ("job_id", STR), ("done", NUM), ("failed", INT), ("skipped", INT),
        ("retried", INT), ("by_name", DICT), routes={(S, C)},
        doc="a watched job's progress, coalesced: items done (with reported parts of running "
            "chunks), failed and skipped chunks or tasks, re-runs; graphs: {task name: "
            "[done, failed or skipped, total]}")

declare(Msg.SHM_PROBE, ("name", STR), ("digest", BYTES), routes=TO_PEERS,
        doc="right after the handshake: the server's shared-memory probe segment and the "
            "SHA-256 of its bytes (achilles.core.shm)")
declare(Msg.SHM_OK, ("shared", BOOL), routes=FROM_PEERS,
        doc="whether the peer read the probe: then CHUNK and RESULT payloads between it and the "
            "server may be shared-memory references")

declare(Msg.BATCH, ("payload", PAYLOAD), routes=EITHER_WAY, payload=True,
        doc="several post-auth messages of one sender's reactor turn under one session tag: "
            "each as encode_message makes it (header, body), in order; never nested")

# Module-level names for every code (``wire.SUBMIT`` is ``Msg.SUBMIT``), spelled out so
# type checkers see them.
HELLO = Msg.HELLO
AUTH = Msg.AUTH
AUTH_OK = Msg.AUTH_OK
AUTH_FAIL = Msg.AUTH_FAIL
NODE_READY = Msg.NODE_READY
SUBMIT = Msg.SUBMIT
CHUNK = Msg.CHUNK
END = Msg.END
WANT = Msg.WANT
RESULT = Msg.RESULT
CANCEL = Msg.CANCEL
JOB_FAILED = Msg.JOB_FAILED
TASK = Msg.TASK
JOB_CODE = Msg.JOB_CODE
JOB_DONE = Msg.JOB_DONE
STATUS = Msg.STATUS
STATUS_REPLY = Msg.STATUS_REPLY
KILL = Msg.KILL
KILL_DONE = Msg.KILL_DONE
SHUTDOWN = Msg.SHUTDOWN
PING = Msg.PING
PONG = Msg.PONG
GRAPH = Msg.GRAPH
TASK_DONE = Msg.TASK_DONE
GRAPH_DONE = Msg.GRAPH_DONE
NODE_LOAD = Msg.NODE_LOAD
TASK_ERROR = Msg.TASK_ERROR
PIPE_START = Msg.PIPE_START
PIPE_FEED = Msg.PIPE_FEED
PIPE_WORK = Msg.PIPE_WORK
PIPE_OUT = Msg.PIPE_OUT
PIPE_RESULT = Msg.PIPE_RESULT
OUTPUT = Msg.OUTPUT
OUTPUT_TAIL = Msg.OUTPUT_TAIL
PIPE_OUTPUT = Msg.PIPE_OUTPUT
TASK_PROGRESS = Msg.TASK_PROGRESS
JOB_PROGRESS = Msg.JOB_PROGRESS
WATCH = Msg.WATCH
SHM_PROBE = Msg.SHM_PROBE
SHM_OK = Msg.SHM_OK
BATCH = Msg.BATCH
assert all(globals().get(m.name) is m for m in Msg), "a Msg code has no module-level name"

NAMES: Dict[int, str] = {code: message.name for code, message in REGISTRY.items()}
ALL_CODES = frozenset(REGISTRY)
PREAUTH_CODES = frozenset(c for c, m in REGISTRY.items() if m.preauth)
POSTAUTH_CODES = ALL_CODES - PREAUTH_CODES
PAYLOAD_CODES = frozenset(c for c, m in REGISTRY.items() if m.payload)
META = struct.Struct("!I")
#: Frames this large or larger are handed out of :class:`FrameDecoder` without a copy.
LARGE_FRAME = 1 << 16


def frame_size(pieces: List[bytes]) -> int:
    """The size of an encoded message (header included)."""
    return sum(map(len, pieces))


_LENGTH = struct.Struct("!xI")


def message_size(pieces: List[bytes]) -> int:
    """The size of an encoded message (header included), as its header says: what the
    receiver's frame limit is checked against."""
    return HEADER.size + _LENGTH.unpack_from(pieces[0])[0]


def inbound(local: str, peer: str) -> FrozenSet[int]:
    """Post-auth codes that ``peer`` may send to ``local``."""
    return frozenset(c for c, m in REGISTRY.items()
                     if not m.preauth and (peer, local) in m.routes)


def name_of(code: int) -> str:
    """A message's name, or its number when it has none."""
    return NAMES.get(code, str(code))


def validate(message: Message, fields: Tuple[Any, ...]) -> None:
    """Raise :class:`ProtocolError` unless ``fields`` match the declaration."""
    types = message.types
    if len(fields) == len(types) and all(map(isinstance, fields, types)):
        return
    spec = message.fields
    if len(fields) != len(spec):
        raise ProtocolError(f"malformed {message.name}: {len(fields)} fields, expected "
                            f"{len(spec)} ({', '.join(f.name for f in spec)})")
    for value, f in zip(fields, spec):
        if not isinstance(value, f.types):
            raise ProtocolError(f"malformed {message.name}: field {f.name!r} is "
                                f"{type(value).__name__}, expected "
                                f"{' or '.join(t.__name__ for t in f.types)}")


# Result status codes carried in RESULT.
OK = 0
ITEM_ERROR = 1
CRASHED = 2
TIMED_OUT = 3
STATUSES = frozenset({OK, ITEM_ERROR, CRASHED, TIMED_OUT})


def frame(code: int, body: bytes) -> bytes:
    """Encode one frame."""
    return HEADER.pack(code, len(body)) + body


def encode_json(code: int, obj: Dict[str, Any]) -> bytes:
    """Encode a pre-auth JSON frame; refuses bodies over the pre-auth cap. (Tests use it to
    build hostile frames too, so it does not insist on the declared keys; the handshake
    sends exactly those.)"""
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(body) > PREAUTH_MAX_FRAME:
        raise ProtocolError(f"pre-auth frame of {len(body)} bytes exceeds {PREAUTH_MAX_FRAME}")
    return frame(code, body)


def decode_json(body: bytes) -> Dict[str, Any]:
    """Decode a pre-auth JSON body; anything but a small JSON object is a ProtocolError.
    The handshake checks each key itself (:mod:`achilles.core.handshake`)."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("pre-auth frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("pre-auth frame is not a JSON object")
    return obj


def encode_message(code: int, fields: Tuple[Any, ...]) -> List[bytes]:
    """Encode a post-auth message as pieces (no join, no payload copy: a payload stays the
    bytes, bytearray or memoryview it is; :mod:`achilles.core.socketwrite` sends the pieces).
    The fields must match the declaration."""
    message = REGISTRY.get(code)
    if message is None or message.preauth:
        raise ProtocolError(f"{name_of(code)} is not a post-auth message")
    types = message.types
    if len(fields) != len(types) or not all(map(isinstance, fields, types)):
        validate(message, fields)
    if message.payload:
        payload = fields[-1]
        meta = pickle.dumps(fields[:-1], protocol=PICKLE_PROTOCOL)
        return [HEADER.pack(code, META.size + len(meta) + len(payload)), META.pack(len(meta)),
                meta, payload]
    body = pickle.dumps(fields, protocol=PICKLE_PROTOCOL)
    return [HEADER.pack(code, len(body)), body]


_NO_FIELDS = pickle.dumps((), protocol=PICKLE_PROTOCOL)


def encode_batch(messages: List[List[bytes]]) -> List[bytes]:
    """Encode several encoded messages (none a BATCH) as the pieces of one BATCH message."""
    inner = [piece for m in messages for piece in m]
    size = META.size + len(_NO_FIELDS) + sum(map(len, inner))
    return [HEADER.pack(BATCH, size), META.pack(len(_NO_FIELDS)), _NO_FIELDS, *inner]


def split_batch(messages: Any) -> List[Tuple[int, memoryview]]:
    """The ``(code, body)`` of each message in a BATCH's payload, bodies as views of it.
    A truncated message or a nested BATCH raises :class:`ProtocolError`."""
    view = memoryview(messages)
    out: List[Tuple[int, memoryview]] = []
    pos, end, size = 0, len(view), HEADER.size
    while pos < end:
        if end - pos < size:
            raise ProtocolError("malformed BATCH: a message header is cut short")
        code, length = HEADER.unpack_from(view, pos)
        pos += size
        if length > end - pos:
            raise ProtocolError("malformed BATCH: a message overruns it")
        if code == BATCH:
            raise ProtocolError("malformed BATCH: a BATCH inside a BATCH")
        out.append((code, view[pos:pos + length]))
        pos += length
    return out


def _unpickle_tuple(data: Any, message: Message) -> Tuple[Any, ...]:
    try:
        fields = pickle.loads(data)
    except Exception as exc:
        raise ProtocolError(f"malformed {message.name}: cannot decode fields ({exc})") from None
    if not isinstance(fields, tuple):
        raise ProtocolError(f"malformed {message.name}: body is not a tuple")
    return fields


def decode_message(body: "bytes | memoryview", code: int) -> Tuple[Any, ...]:
    """Decode and validate a post-auth message body. Only call this once the frame has been
    authenticated (the peer proved the secret and the frame's tag checked out).

    For messages with a raw payload, the payload comes last, as a zero-copy ``memoryview`` of
    ``body``. Fields that do not match the declaration raise :class:`ProtocolError`.
    """
    message = REGISTRY.get(code)
    if message is None or message.preauth:
        raise ProtocolError(f"{name_of(code)} is not a post-auth message")
    if message.payload:
        if len(body) < META.size:
            raise ProtocolError(f"malformed {message.name}: body too short")
        (n,) = META.unpack_from(body, 0)
        view = memoryview(body)
        if META.size + n > len(body):
            raise ProtocolError(f"malformed {message.name}: fields overrun the body")
        fields = _unpickle_tuple(view[META.size:META.size + n], message) + (view[META.size + n:],)
    else:
        fields = _unpickle_tuple(body, message)
    types = message.types
    if len(fields) != len(types) or not all(map(isinstance, fields, types)):
        validate(message, fields)
    return fields


class FrameDecoder:
    """Bytes in, ``(code, body)`` frames out. Raises :class:`ProtocolError` on a bad frame.

    Feed received bytes with :meth:`feed`, then take frames one at a time with :meth:`next_frame`
    so that a handshake frame can raise the limits (:meth:`set_limit`) before the next is read.
    After a ProtocolError the decoder is dead: every later call raises again.
    """

    def __init__(self, max_frame: int = PREAUTH_MAX_FRAME,
                 allowed: FrozenSet[int] = PREAUTH_CODES) -> None:
        self._buf = bytearray()
        self._pos = 0
        #: The reads of a large frame, collected whole before one join (see :meth:`feed`).
        self._parts: "List[bytes] | None" = None
        self._have = 0
        self._need = 0
        self._error: "ProtocolError | None" = None
        self._opener: "FrameOpener | None" = None
        self.max_frame = max_frame
        self.allowed = allowed

    def set_limit(self, max_frame: int, allowed: FrozenSet[int],
                  opener: "FrameOpener | None" = None) -> None:
        """Change the size cap and the accepted codes (after the handshake); with ``opener``,
        every later frame must end with a valid session tag (:mod:`achilles.core.session`)."""
        self.max_frame = max_frame
        self.allowed = allowed
        self._opener = opener

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos + self._have

    def feed(self, data: bytes) -> None:
        """Add received bytes. While a large frame is incomplete its reads are only kept (no
        copy, no growing buffer); it is joined once, when complete."""
        if self._error is not None:
            raise self._error
        if self._parts is not None:
            self._parts.append(data)
            self._have += len(data)
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> "Tuple[int, bytes | memoryview] | None":
        """Return the next complete frame, or None when more bytes are needed. The body of a
        frame of :data:`LARGE_FRAME` bytes or more is a ``memoryview`` of the bytes it arrived
        in (no copy out); smaller bodies are ``bytes``."""
        if self._error is not None:
            raise self._error
        if self._parts is not None:
            return self._large_frame()
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER.size:
            return None
        code, length = HEADER.unpack_from(buf, pos)
        if code not in self.allowed:
            hint = " (a TLS handshake? this end is not using TLS)" if code == 0x16 else ""
            self._fail(f"unexpected message code {code} ({name_of(code)}){hint}")
        if length > self.max_frame:
            self._fail(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        if self._opener is not None and length < TAG_SIZE:
            self._fail("frame too short to carry its session tag")
        end = pos + HEADER.size + length
        if end > len(buf):
            if length >= LARGE_FRAME:
                self._parts = [bytes(buf[pos:])]
                self._have = len(buf) - pos
                self._need = HEADER.size + length
                self._buf = bytearray()
                self._pos = 0
            return None
        if length < LARGE_FRAME:
            with memoryview(buf) as view:
                body = bytes(self._open(view[pos:end]))
            self._pos = end
            return code, body
        # A large frame that arrived in one read is not copied out either: the buffer becomes
        # its body, and only what follows it moves to a new buffer (the old one is never
        # resized while the body views it).
        self._buf = buf[end:]
        self._pos = 0
        return code, self._open(memoryview(buf)[pos:end])

    def _large_frame(self) -> "Tuple[int, memoryview] | None":
        """The collected large frame, once all of it is here."""
        assert self._parts is not None
        if self._have < self._need:
            return None
        whole = b"".join(self._parts)
        self._parts = None
        self._have = 0
        need = self._need
        self._buf = bytearray(memoryview(whole)[need:])
        self._pos = 0
        return whole[0], self._open(memoryview(whole)[:need])

    def _open(self, frame: memoryview) -> memoryview:
        """The body of one whole frame (header, body and, once keyed, tag), its tag checked."""
        opener = self._opener
        if opener is None:
            return frame[HEADER.size:]
        end = len(frame) - TAG_SIZE
        try:
            opener.check(frame[:end], frame[end:])
        except ProtocolError as exc:
            self._fail(str(exc))
        return frame[HEADER.size:end]

    def _fail(self, reason: str) -> NoReturn:
        self._buf = bytearray()
        self._pos = 0
        self._parts = None
        self._have = 0
        self._error = ProtocolError(reason)
        raise self._error

    def frames(self, data: bytes) -> "List[Tuple[int, bytes | memoryview]]":
        """Feed ``data`` and return every complete frame (limits stay as they are)."""
        self.feed(data)
        out: "List[Tuple[int, bytes | memoryview]]" = []
        while True:
            f = self.next_frame()
            if f is None:
                return out
            out.append(f)


