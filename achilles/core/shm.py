"""Large payloads through shared memory between processes proven to share a host.

A payload of at least :func:`threshold` bytes between two such processes is written to a file
in the shared-memory directory (``/dev/shm``, ``ACHILLES_SHM_DIR``), created ``0600`` with
``O_EXCL`` under an unguessable name, and only a small *reference* travels in the
(authenticated, session-bound) frame: :data:`MAGIC`, a fresh 96-bit nonce, an AES-GMAC tag,
the size and the name. The tag is over the name, the content and the size, under a key
derived with HKDF from the cluster's shared key (:func:`segment_key`); a reader copies the
segment into its own memory and checks the tag there before anything unpickles it, so a
segment altered or replaced after it was written is refused (:class:`ShmError`).

Names are ``achilles-<pid namespace>-<owner pid>-<128 random bits, hex>`` (a node's result
segments: 64 random bits drawn once per process and a counter, :class:`Names`): :func:`sweep`
removes segments whose owner process is gone (in this pid namespace), so what a killed process
left behind does not stay. A real payload is always a pickle (it starts with ``0x80``), so a
payload that starts with :data:`MAGIC` (``0x00``) is a reference, never data.

"Same host" is proven, not guessed: the server publishes a :class:`Probe` (random bytes in a
segment) and tells each authenticated peer its name and the bytes' SHA-256; a peer that can
read the segment and finds those bytes shares the server's shared-memory directory
(:func:`check_probe`), and says so. Each hop decides on its own: a reference goes on only to a
peer that proved the probe on its current connection; any other peer gets the bytes (the
server reads and checks the segment and inlines them). A segment that cannot be written (no
room in shared memory) is simply not used: the bytes travel in the frame as before.

Lifetime rules (who creates, who unlinks):

* Argument segments (a map job's ``CHUNK`` payload) are created by the controller process
  (the owner in their name) and only read by the server and workers. The controller unlinks
  one when its chunk's result arrives (whatever its status), and all of a job's that are
  left when the job ends, fails, is cancelled, or its connection is lost for good. A chunk
  the server re-runs (its node died, its worker crashed) keeps the same segment, so it stays
  until the one result the server delivers reaches the controller. The controller keeps the
  pickled bytes too (as it always did for resubmission): after a reconnect to a server it
  has not proven to share memory with, it resends bytes.
* Result segments (an ``OK`` map ``RESULT`` payload) are written by a worker under a name
  owned by its node daemon. The node unlinks one whose reference does not go out (the worker
  died or timed out, the chunk was cancelled, the connection changed). The server unlinks one
  it drops (a late or duplicate result, a job gone) or inlines (the controller did not prove
  the probe). Otherwise the controller unlinks it right after copying it, and a result that
  arrives for a job it no longer reads is unlinked on arrival or when the job is closed.
* The probe is created and unlinked by the server.
* A process killed with ``SIGKILL`` leaves its segments behind: :func:`sweep` removes every
  segment whose owner pid is gone (or a zombie). The server sweeps at start, a second after
  a node or controller connection is lost, every minute, and when it stops; a node sweeps at
  start and removes its own segments when it stops.

``ACHILLES_MAX_FRAME`` still bounds a payload that travels as a segment (a larger one goes
as bytes and fails as before), so the server can always inline one for a peer that did not
prove the probe. ``ACHILLES_SHM_DIR=off`` turns the whole path off (every payload travels in frames);
``ACHILLES_SHM_MIN`` sets the smallest payload sent as a segment.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import re
import secrets
import stat
import struct
import time
from typing import Any, NamedTuple, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from achilles.core.config import DEFAULT_SHM_DIR, DEFAULT_SHM_MIN
from achilles.core.errors import AchillesError

#: The first bytes of a reference payload (a pickle starts with 0x80, never 0x00).
MAGIC = b"\x00ASHM1"
_REF = struct.Struct("!6s12s16sQ")  # magic, nonce, tag, size; the name follows (ASCII)
_SIZE = struct.Struct("!Q")
#: The smallest payload sent through shared memory, by default (ACHILLES_SHM_MIN).
DEFAULT_THRESHOLD = DEFAULT_SHM_MIN
DEFAULT_DIR = DEFAULT_SHM_DIR
#: Settings that turn shared memory off.
OFF = ("", "off", "0", "no", "false", "none")
PREFIX = "achilles-"
_NAME = re.compile(r"achilles-([0-9]+)-([0-9]+)-([0-9a-f]{32})\Z")
#: A reference is never longer than this (the name is short).
MAX_REF = 160
#: Room left for a message's other fields when a segment's size is held against the frame
#: limit (ACHILLES_MAX_FRAME still bounds a payload, whichever way it travels).
FRAME_SLACK = 4096


def fits(ref: Any, limit: int) -> bool:
    """Whether the payload ``ref`` refers to would fit a frame of ``limit`` bytes inline."""
    return parse(ref).size + FRAME_SLACK <= limit
_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


class ShmError(AchillesError):
    """A shared-memory payload could not be used: missing, of the wrong size or owner, or
    altered (its tag does not match). Nothing in it was unpickled."""


class Ref(NamedTuple):
    """A parsed reference."""

    name: str
    size: int
    nonce: bytes
    tag: bytes


def directory(setting: Optional[str] = None) -> Optional[str]:
    """The shared-memory directory (``setting``, else ``ACHILLES_SHM_DIR``, default
    ``/dev/shm``), or None when shared memory is off (``off``) or there is no such
    directory."""
    path = os.environ.get("ACHILLES_SHM_DIR", DEFAULT_DIR) if setting is None else setting
    if path.strip().lower() in OFF:
        return None
    return path if os.path.isdir(path) else None


def threshold(setting: Optional[int] = None) -> int:
    """Payloads of at least this many bytes go through shared memory (``setting``, else
    ``ACHILLES_SHM_MIN``)."""
    if setting is not None:
        return max(1, int(setting))
    try:
        return max(1, int(os.environ.get("ACHILLES_SHM_MIN", DEFAULT_THRESHOLD)))
    except ValueError:
        return DEFAULT_THRESHOLD


def segment_key(auth_key: bytes) -> bytes:
    """The key of segment tags: HKDF-SHA256 of the cluster's shared key (32 bytes)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"achilles shared-memory segment tag v1").derive(auth_key)


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_NS = _pid_namespace()


def new_name(owner: int) -> str:
    """A fresh segment name owned by process ``owner`` (its pid)."""
    return f"{PREFIX}{_NS}-{owner}-{secrets.token_hex(16)}"


class Names:
    """Fresh segment names owned by this process, cheaper than :func:`new_name` per name (a
    node names one per map chunk it runs): 64 random bits chosen once, then a counter.
    Unguessable enough: a segment is also ``0600``, created with ``O_EXCL`` and tagged."""

    def __init__(self) -> None:
        self.prefix = f"{PREFIX}{_NS}-{os.getpid()}-{secrets.token_hex(8)}"
        self.count = itertools.count()

    def __call__(self) -> str:
        """The next name."""
        return f"{self.prefix}{next(self.count):016x}"


def is_ref(payload: Any) -> bool:
    """Whether a payload is a reference to a segment."""
    return (0 < len(payload) <= MAX_REF and payload[0] == 0
            and bytes(payload[:len(MAGIC)]) == MAGIC)


def parse(payload: Any) -> Ref:
    """The reference in ``payload``; :class:`ShmError` if it is malformed."""
    data = bytes(payload)
    if len(data) <= _REF.size or len(data) > MAX_REF:
        raise ShmError("malformed shared-memory reference")
    magic, nonce, tag, size = _REF.unpack_from(data)
    try:
        name = data[_REF.size:].decode("ascii")
    except UnicodeDecodeError:
        raise ShmError("malformed shared-memory reference") from None
    if magic != MAGIC or not _NAME.match(name):
        raise ShmError("malformed shared-memory reference")
    return Ref(name, size, nonce, tag)


class _Writer:
    """A new segment being written: a file object for :mod:`pickle` that tags what it writes.
    The tag covers the name, the content and (at :meth:`seal`) the size."""

    def __init__(self, path: str, key: bytes, name: str) -> None:
        self.path, self.name = path, name
        self.fd = os.open(os.path.join(path, name),
                          os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600)
        self.nonce = os.urandom(12)
        self.gmac = Cipher(algorithms.AES(key), modes.GCM(self.nonce)).encryptor()
        self.gmac.authenticate_additional_data(name.encode("ascii"))
        self.size = 0

    def write(self, data: Any) -> int:
        """Append ``data`` (bytes-like) to the segment and to the tag."""
        view = memoryview(data).cast("B")
        self.gmac.authenticate_additional_data(view)
        done, size = 0, len(view)
        while done < size:
            done += os.write(self.fd, view[done:])
        self.size += size
        return size

    def seal(self) -> bytes:
        """Close the segment and return its reference."""
        os.close(self.fd)
        self.fd = -1
        self.gmac.authenticate_additional_data(_SIZE.pack(self.size))
        self.gmac.finalize()
        return (_REF.pack(MAGIC, self.nonce, self.gmac.tag, self.size)
                + self.name.encode("ascii"))

    def abandon(self) -> None:
        """Close and unlink the unfinished segment."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        discard(self.path, self.name)


def write(path: str, key: bytes, data: Any, name: str) -> bytes:
    """Write ``data`` to a new segment ``name`` in ``path`` (0600, never an existing file)
    and return its reference; raises ``OSError`` (nothing left behind) if it cannot."""
    writer = _Writer(path, key, name)
    try:
        writer.write(data)
        return writer.seal()
    except BaseException:
        writer.abandon()
        raise


def dump(path: str, key: bytes, obj: Any, name: str, protocol: int = 5) -> bytes:
    """Pickle ``obj`` straight into a new segment ``name`` (large buffers such as ``bytes``
    go from the object to the segment without an in-memory pickle) and return its reference.
    Raises ``OSError`` if the segment cannot be written, or the pickler's own error; either
    way nothing is left behind."""
    writer = _Writer(path, key, name)
    try:
        pickle.Pickler(writer, protocol=protocol).dump(obj)
        return writer.seal()
    except BaseException:
        writer.abandon()
        raise


#: Read buffers up to this size are kept for the next read (:class:`ReadBuffer`).
KEEP_BUFFER = 64 << 20


class ReadBuffer:
    """A buffer reused by successive :func:`read` calls of one thread, so reading a segment
    does not fault in fresh pages every time; what a read returns is valid until the next."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def get(self, size: int) -> Optional[memoryview]:
        """A writable view of ``size`` bytes, or None (too large to keep: read fresh)."""
        if size > KEEP_BUFFER:
            return None
        if len(self.buf) < size:
            self.buf = bytearray(max(size, 2 * len(self.buf)))
        return memoryview(self.buf)[:size]


def read(path: str, key: bytes, payload: Any, into: Optional[ReadBuffer] = None) -> Any:
    """The content of the segment ``payload`` refers to, copied into this process and its
    tag checked; :class:`ShmError` if it is missing, not what was written, or not ours. With
    ``into`` the content lands in that buffer (a memoryview valid until its next use), else
    in a new bytearray."""
    ref = parse(payload)
    full = os.path.join(path, ref.name)
    try:
        fd = os.open(full, os.O_RDONLY | _FLAGS)
    except OSError as exc:
        raise ShmError(f"shared-memory segment {ref.name} cannot be opened ({exc.strerror}); "
                       "its payload is lost") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != ref.size:
            raise ShmError(f"shared-memory segment {ref.name} is not the one that was written "
                           "(wrong type, owner or size): refused, nothing in it was unpickled")
        view = into.get(ref.size) if into is not None else None
        buf: Any = view
        if view is None:
            buf = bytearray(ref.size)
            view = memoryview(buf)
        got = 0
        while got < ref.size:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise ShmError(f"shared-memory segment {ref.name} was cut short")
            got += n
    finally:
        os.close(fd)
    check = Cipher(algorithms.AES(key), modes.GCM(ref.nonce, ref.tag)).decryptor()
    check.authenticate_additional_data(ref.name.encode("ascii"))
    check.authenticate_additional_data(view)
    check.authenticate_additional_data(_SIZE.pack(ref.size))
    try:
        check.finalize()
    except InvalidTag:
        raise ShmError(f"shared-memory segment {ref.name} failed its integrity check (altered "
                       "or replaced after it was written): refused, nothing in it was "
                       "unpickled") from None
    return buf


def discard(path: str, name_or_ref: Any) -> None:
    """Unlink a segment (by name or reference) if it is still there."""
    if isinstance(name_or_ref, str):
        name = name_or_ref
    else:
        try:
            name = parse(name_or_ref).name
        except ShmError:
            return
    if not _NAME.match(name):
        return
    try:
        os.unlink(os.path.join(path, name))
    except OSError:
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a zombie writes nothing more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep(path: Optional[str], min_age: float = 0.0) -> int:
    """Remove segments (of this pid namespace) whose owner process is gone and that are at
    least ``min_age`` seconds old; returns how many."""
    if path is None or not _NS:
        return 0
    removed = 0
    try:
        names = os.listdir(path)
    except OSError:
        return 0
    now = time.time()
    for name in names:
        m = _NAME.match(name)
        if m is None or int(m.group(1)) != _NS or _alive(int(m.group(2))):
            continue
        full = os.path.join(path, name)
        try:
            if min_age and now - os.lstat(full).st_mtime < min_age:
                continue
            os.unlink(full)
            removed += 1
        except OSError:
            pass
    return removed


def remove_owned(path: Optional[str], owner: int) -> None:
    """Remove every segment of this pid namespace owned by ``owner``."""
    if path is None:
        return
    head = f"{PREFIX}{_NS}-{owner}-"
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        if name.startswith(head) and _NAME.match(name):
            discard(path, name)


class Probe:
    """The server's proof-of-host segment: 32 random bytes, 0600, named like a segment of
    the server's own."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = new_name(os.getpid())
        content = secrets.token_bytes(32)
        fd = os.open(os.path.join(path, self.name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        self.digest = hashlib.sha256(content).digest()

    def remove(self) -> None:
        """Unlink the probe."""
        discard(self.path, self.name)


def check_probe(path: Optional[str], name: str, digest: bytes) -> bool:
    """Whether this process can read the server's probe ``name`` in ``path`` and it holds the
    bytes whose SHA-256 is ``digest`` (then both share that directory: the same host)."""
    if path is None or not _NAME.match(name):
        return False
    try:
        fd = os.open(os.path.join(path, name), os.O_RDONLY | _FLAGS)
    except OSError:
        return False
    try:
        content = os.read(fd, 64)
    except OSError:
        return False
    finally:
        os.close(fd)
    return secrets.compare_digest(hashlib.sha256(content).digest(), digest)
