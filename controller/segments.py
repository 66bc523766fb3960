"""The controller's end of the shared-memory path (:mod:`achilles.core.shm`).

One :class:`Segments` per :class:`~achilles.controller.cluster.Cluster`: it writes a map
job's large chunk payloads as segments owned by this process, reads result references
(checking their tag before anything is unpickled) and unlinks what it read, and keeps, per
job, the result references that have arrived but are not read yet, so a job that stops
reading (closed, cancelled, failed) has them unlinked instead of left in shared memory.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, Optional, Set

from achilles.core import shm


class Segments:
    """Shared-memory settings of one cluster connection and the result references in flight."""

    def __init__(self, path: str, key: bytes, threshold: int) -> None:
        self.path = path
        self.key = key
        #: Payloads of at least this many bytes go as segments.
        self.threshold = threshold
        self._lock = threading.Lock()
        self._unread: Dict[str, Set[str]] = {}
        self._local = threading.local()

    @classmethod
    def create(cls, auth_key: bytes, path: Optional[str] = None,
               threshold: Optional[int] = None) -> Optional["Segments"]:
        """Segments for a cluster whose shared key gives ``auth_key`` (``path`` and
        ``threshold``: the configured ``ACHILLES_SHM_DIR`` and ``ACHILLES_SHM_MIN``), or None
        when shared memory is off (``off``) or there is no such directory here."""
        where = shm.directory(path)
        if where is None:
            return None
        return cls(where, shm.segment_key(auth_key), shm.threshold(threshold))

    def write(self, payload: bytes) -> Optional[bytes]:
        """Write ``payload`` as a new segment owned by this process; its reference, or None
        when it cannot be written (no room in shared memory: the bytes go in the frame)."""
        try:
            return shm.write(self.path, self.key, payload, shm.new_name(os.getpid()))
        except OSError:
            return None

    def dump(self, obj: Any) -> Optional[bytes]:
        """Pickle ``obj`` straight into a new segment owned by this process; its reference,
        or None when it cannot (no room in shared memory, or the C pickler refuses ``obj``:
        the caller pickles it the usual way)."""
        try:
            return shm.dump(self.path, self.key, obj, shm.new_name(os.getpid()))
        except Exception:
            return None

    def read(self, ref: Any) -> bytes:
        """The content of a segment this process wrote (to resend it as bytes)."""
        return bytes(shm.read(self.path, self.key, ref))

    def _buffer(self) -> shm.ReadBuffer:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = shm.ReadBuffer()
        return buf

    def discard(self, ref: Any) -> None:
        """Unlink the segment of ``ref`` if it is still there."""
        shm.discard(self.path, ref)

    # --- result references ------------------------------------------------------------------
    def arrived(self, job_id: str, ref: Any) -> None:
        """Reactor thread: a result reference for ``job_id`` was handed to its reader."""
        try:
            name = shm.parse(ref).name
        except shm.ShmError:
            return
        with self._lock:
            self._unread.setdefault(job_id, set()).add(name)

    def _claim(self, job_id: str, ref: Any) -> Optional[str]:
        """The segment name of ``ref``, no longer counted as unread."""
        try:
            name: Optional[str] = shm.parse(ref).name
        except shm.ShmError:
            return None
        with self._lock:
            names = self._unread.get(job_id)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._unread[job_id]
        return name

    def take(self, job_id: str, ref: Any) -> Any:
        """The content of result reference ``ref`` of ``job_id``, tag checked (else
        :class:`~achilles.core.shm.ShmError`): a view of this thread's read buffer, valid
        until its next call here, so unpickle it at once. The segment is unlinked either
        way."""
        name = self._claim(job_id, ref)
        try:
            return shm.read(self.path, self.key, ref, self._buffer())
        finally:
            if name is not None:
                shm.discard(self.path, name)

    def drop(self, job_id: str, ref: Any) -> None:
        """Unlink result reference ``ref`` of ``job_id`` unread (nobody wants it)."""
        name = self._claim(job_id, ref)
        if name is not None:
            shm.discard(self.path, name)

    def forget(self, job_id: str) -> None:
        """Reactor thread, once ``job_id``'s events stop being routed: unlink its result
        segments nobody will read."""
        with self._lock:
            names = self._unread.pop(job_id, ())
        for name in names:
            shm.discard(self.path, name)

    def unread(self) -> int:
        """How many result segments have arrived and are not read yet (for tests)."""
        with self._lock:
            return sum(len(v) for v in self._unread.values())
