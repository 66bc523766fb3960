"""Shared-memory references on the server: the probe, and each hop's ref-or-bytes decision.

A map job's ``CHUNK`` payload from a controller and a ``RESULT`` payload from a node may be a
reference to a segment (:mod:`achilles.core.shm`). A reference goes on only to a peer that
proved it shares this host's shared memory (it read the probe: ``SHM_OK``); any other peer
gets the bytes, read and checked against the reference's tag here (a result segment is then
unlinked: this server was its last reader). A result the server drops (late, duplicate, job
gone) has its segment unlinked here too. Argument segments are the controller's: it unlinks
them when the chunk's result arrives or the job ends. What a killed process left behind is
swept (:func:`achilles.core.shm.sweep`) shortly after a peer's connection is lost, every
:data:`SWEEP_EVERY` seconds, and when the server stops (the lifetime rules are in
:mod:`achilles.core.shm`).
"""

from __future__ import annotations

import logging
from typing import Any, Tuple

from achilles.core import shm, wire
from achilles.core.logs import printable
from achilles.core.serialization import error_record

log = logging.getLogger("achilles.server")

#: Seconds between sweeps of segments whose owner is gone.
SWEEP_EVERY = 60.0
#: Seconds after a lost connection before the sweep (the peer's process may still be exiting).
SWEEP_AFTER_LOSS = 1.0


class ShmRelay:
    """This server's probe and segment key, and the per-hop decisions."""

    def __init__(self, path: str, auth_key: bytes, clock: Any = None) -> None:
        self.path = path
        self.key = shm.segment_key(auth_key)
        self.probe = shm.Probe(path)
        self.clock = clock
        self._soon: Any = None
        self._timer: Any = None
        if clock is not None:
            self._timer = clock.callLater(SWEEP_EVERY, self._periodic)

    def close(self) -> None:
        """Unlink the probe and every segment whose owner is gone (the cluster stopped)."""
        for call in (self._soon, self._timer):
            if call is not None and call.active():
                call.cancel()
        self._soon = self._timer = None
        self.probe.remove()
        shm.sweep(self.path)

    def sweep(self) -> int:
        """Remove the segments of processes that are gone now; how many."""
        self._soon = None
        removed = shm.sweep(self.path)
        if removed:
            log.info("removed %d shared-memory segment(s) of processes that are gone", removed)
        return removed

    def _periodic(self) -> None:
        self.sweep()
        self._timer = self.clock.callLater(SWEEP_EVERY, self._periodic)

    def peer_lost(self) -> None:
        """A node or controller connection ended: sweep soon (a killed peer's segments)."""
        if self.clock is not None and self._soon is None:
            self._soon = self.clock.callLater(SWEEP_AFTER_LOSS, self.sweep)

    def to_node(self, node: Any, payload: Any) -> Any:
        """A ``TASK`` payload for ``node``: the reference if it shares this host, else the
        bytes. Raises :class:`~achilles.core.shm.ShmError`, saying why, when the node needs
        the bytes and the segment cannot be read (the chunk then fails with that error)."""
        if not shm.is_ref(payload):
            return payload
        if getattr(node.peer, "shm_ok", False):
            node.shm_tasks += 1
            return payload
        try:
            return bytes(shm.read(self.path, self.key, payload))
        except shm.ShmError as exc:
            log.warning("cannot inline a chunk for node %s: %s", node.name,
                        printable(str(exc)))
            raise shm.ShmError(
                f"the server could not read the chunk's shared-memory segment to send its "
                f"bytes to node {node.name}, which does not share memory with it: {exc}"
            ) from None

    def to_controller(self, peer: Any, node: Any, status: int,
                      payload: Any) -> Tuple[int, Any]:
        """A map chunk's ``RESULT`` for the controller on ``peer``: as is, unless it is a
        reference and the controller does not share this host: then its bytes (the segment
        unlinked), or an error record saying why they are lost."""
        if status != wire.OK or not shm.is_ref(payload):
            return status, payload
        node.shm_results += 1
        if getattr(peer, "shm_ok", False):
            return status, payload
        try:
            return status, bytes(shm.read(self.path, self.key, payload))
        except shm.ShmError as exc:
            return wire.ITEM_ERROR, error_record(0, exc, [])
        finally:
            shm.discard(self.path, payload)

    def drop(self, status: int, payload: Any) -> None:
        """A result nobody will read: unlink its segment, if it has one."""
        if status == wire.OK and shm.is_ref(payload):
            shm.discard(self.path, payload)
