"""Messages on a worker pipe, in ``multiprocess``'s framing (a ``!i`` length, or ``-1`` and a
``!Q`` length, then the data).

The node's reactor reads its end without blocking through :class:`FrameReader` and writes
:func:`frame`'s pieces. A worker reads a large payload with :func:`recv_buffer`, because

``multiprocess``'s ``Connection.recv_bytes`` reads a message with repeated ``os.read(fd,
remaining)`` calls: each allocates a buffer the size of everything still to come (fresh pages
that the kernel must map and zero) before the socket hands over its next few hundred KiB, and
then copies the pieces once more into a ``BytesIO``. :func:`recv_buffer` reads the same
framing straight into one ``bytearray`` of the announced size.
"""

from __future__ import annotations

import os
import struct
from typing import Any, List, Optional, Tuple

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


#: Bytes asked of the pipe per read while between messages.
READ_SIZE = 256 << 10


def frame(data: "bytes | bytearray | memoryview") -> List["bytes | bytearray | memoryview"]:
    """``data`` with ``multiprocess``'s length prefix in front, as pieces for ``os.writev``."""
    size = len(data)
    if size > 0x7FFFFFFF:
        return [_SIZE.pack(-1) + _LONG.pack(size), data]
    return [_SIZE.pack(size), data]


class FrameReader:
    """The node's end of a worker pipe, read without blocking: :meth:`read` returns the whole
    messages that have arrived (``multiprocess``'s framing, as :func:`recv_buffer` reads it),
    keeping a partial one for the next call. A message longer than what one read brings is read
    straight into a ``bytearray`` of its announced size."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._body: Optional[bytearray] = None  # a long message being filled
        self._got = 0

    def read(self, fd: int, drain: bool = False) -> Tuple[List[bytearray], bool]:
        """``(messages, eof)``: the messages completed by what ``fd`` (non-blocking) has now,
        and whether the other end has closed it. One read unless ``drain`` (read until the pipe
        is empty)."""
        out: List[bytearray] = []
        while True:
            try:
                if self._body is not None:
                    n = os.readv(fd, [memoryview(self._body)[self._got:]])
                    if n == 0:
                        return out, True
                    self._got += n
                    if self._got == len(self._body):
                        out.append(self._body)
                        self._body = None
                else:
                    data = os.read(fd, READ_SIZE)
                    if not data:
                        return out, True
                    self._buf += data
                    self._split(out)
            except (BlockingIOError, InterruptedError):
                return out, False
            if not drain and self._body is None:
                return out, False

    def _split(self, out: List[bytearray]) -> None:
        buf = self._buf
        start = 0
        while len(buf) - start >= _SIZE.size:
            (size,) = _SIZE.unpack_from(buf, start)
            head = _SIZE.size
            if size == -1:
                if len(buf) - start < _SIZE.size + _LONG.size:
                    break
                (size,) = _LONG.unpack_from(buf, start + _SIZE.size)
                head += _LONG.size
            end = start + head + size
            if end <= len(buf):
                out.append(buf[start + head:end])
                start = end
                continue
            if size > READ_SIZE:  # a long one: the rest goes straight into its own buffer
                body = bytearray(size)
                have = len(buf) - start - head
                body[:have] = buf[start + head:]
                self._body, self._got = body, have
                start = len(buf)
            break
        del buf[:start]
