"""Receiving a large message from a worker pipe into one buffer.

``multiprocess``'s ``Connection.recv_bytes`` reads a message with repeated ``os.read(fd,
remaining)`` calls: each allocates a buffer the size of everything still to come (fresh pages
that the kernel must map and zero) before the socket hands over its next few hundred KiB, and
then copies the pieces once more into a ``BytesIO``. :func:`recv_buffer` reads the same
framing (a ``!i`` length, or ``-1`` and a ``!Q`` length, then the data) straight into one
``bytearray`` of the announced size.
"""

from __future__ import annotations

import os
import struct
from typing import Any

_SIZE = struct.Struct("!i")
_LONG = struct.Struct("!Q")


def _read_into(fd: int, view: memoryview) -> None:
    got, size = 0, len(view)
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            if got == 0:
                raise EOFError
            raise OSError("got end of file during message")
        got += n


def recv_buffer(conn: Any) -> bytearray:
    """The next message on ``conn`` (a ``multiprocess`` Connection), as a ``bytearray``; raises
    ``EOFError`` when the other end closed the pipe."""
    fd = conn.fileno()
    head = bytearray(_SIZE.size)
    _read_into(fd, memoryview(head))
    (size,) = _SIZE.unpack(head)
    if size == -1:
        head = bytearray(_LONG.size)
        _read_into(fd, memoryview(head))
        (size,) = _LONG.unpack(head)
    buf = bytearray(size)
    if size:
        _read_into(fd, memoryview(buf))
    return buf
