"""Writing frames' pieces to a transport: straight to the socket when that keeps the order.

Twisted's TCP transport takes only ``bytes``, joins everything queued into one string before
each send, and registers a writer with epoll for every write. :func:`write_pieces` hands the
pieces (header, fields, payload, tag of one or more frames; payload memoryviews included) to
the socket in one scatter-gather ``sendmsg`` when the transport is a plain TCP connection with
nothing queued, so a large payload is not copied in this process at all and a small message
costs one system call; only what the socket did not take then goes through Twisted, as one
``bytes`` (a copy of that remainder only). Anything else (TLS, data already queued, a closing
connection, a transport that is not plain TCP) takes Twisted's own path with the pieces as
``bytes``. The bytes on the wire are the same either way, in order.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Union

from twisted.internet import tcp

Piece = Union[bytes, bytearray, memoryview]

#: Buffers one ``sendmsg`` call passes at most (Linux's IOV_MAX is 1024).
MAX_IOVEC = 512
#: Transport types that are plain TCP connections.
TCP_TYPES = (tcp.Server, tcp.Client)


def _idle_socket(transport: Any) -> Any:
    """The socket of ``transport`` when it is a plain TCP connection (no TLS), open, without a
    producer and with nothing queued to send, so that writing to it keeps the byte order;
    else None."""
    if (type(transport) not in TCP_TYPES or transport.TLS or not transport.connected
            or transport.disconnecting or transport.producer is not None):
        return None
    # Twisted's private write-buffer state; a Twisted without it gets its own write path.
    queued = getattr(transport, "_tempDataLen", None)
    buffer = getattr(transport, "dataBuffer", None)
    offset = getattr(transport, "offset", None)
    if queued is None or buffer is None or offset is None or queued or len(buffer) > offset:
        return None
    return getattr(transport, "socket", None)


def write_pieces(transport: Any, pieces: Sequence[Piece]) -> None:
    """Write ``pieces`` to ``transport``, in order."""
    sock = _idle_socket(transport) if len(pieces) <= MAX_IOVEC else None
    if sock is None:
        transport.writeSequence([p if type(p) is bytes else bytes(p) for p in pieces])
        return
    try:
        sent = sock.sendmsg(pieces)
    except OSError:  # full (EAGAIN), or failing: Twisted's own write then finds out and closes
        sent = 0
    rest: List[Piece] = []
    for piece in pieces:
        n = len(piece)
        if sent >= n:
            sent -= n
            continue
        rest.append(memoryview(piece)[sent:] if sent else piece)
        sent = 0
    if rest:
        transport.write(rest[0] if len(rest) == 1 and type(rest[0]) is bytes
                        else b"".join(rest))
