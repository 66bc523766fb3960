"""A blocking, scriptable peer for tests: it authenticates like a real node or controller
(same handshake, same session tags) and then sends whatever the test says, well-formed or
not, so tests can play a faulty or hostile authenticated peer against real daemons."""

from __future__ import annotations

import pickle
import socket
from collections import deque
from typing import Any, Deque, Optional, Tuple

from achilles.core import wire
from achilles.core.handshake import PeerHandshake, derive_key
from achilles.core.session import FrameOpener, FrameSealer


class RawPeer:
    """One authenticated connection to a real server."""

    def __init__(self, port: int, role: str, secret: str, username: str = "tester",
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.decoder = wire.FrameDecoder()
        hs = PeerHandshake(role, username, derive_key(username, secret))
        code, body = self._next()
        for out in hs.receive(code, body):
            self.sock.sendall(out)
        code, body = self._next()
        hs.receive(code, body)
        send_key, recv_key = hs.session_keys()
        self.sealer = FrameSealer(send_key)
        self.decoder.set_limit(wire.DEFAULT_MAX_FRAME, wire.inbound(role, "server"),
                               FrameOpener(recv_key))
        self.batched: Deque[Tuple[int, Tuple[Any, ...]]] = deque()  # the rest of a BATCH

    def _next(self) -> Tuple[int, bytes]:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.decoder.feed(data)

    def send(self, code: int, *fields: Any) -> None:
        """Send a well-formed message."""
        self.sock.sendall(b"".join(self.sealer.seal(wire.encode_message(code, fields))))

    def send_raw(self, code: int, fields: Any, payload: Optional[bytes] = None) -> None:
        """Send any pickled ``fields`` under ``code`` (with ``payload`` raw after them, as
        payload messages carry it), correctly tagged but not checked against the registry."""
        meta = pickle.dumps(fields, protocol=wire.PICKLE_PROTOCOL)
        if payload is None:
            pieces = [wire.HEADER.pack(code, len(meta)), meta]
        else:
            pieces = [wire.HEADER.pack(code, wire.META.size + len(meta) + len(payload)),
                      wire.META.pack(len(meta)), meta, payload]
        self.sock.sendall(b"".join(self.sealer.seal(pieces)))

    def receive(self, timeout: float = 10.0) -> Tuple[int, Tuple[Any, ...]]:
        """The next message from the server, decoded (PINGs are answered and skipped, so is
        the shared-memory probe; the messages of a BATCH frame come one by one)."""
        self.sock.settimeout(timeout)
        while True:
            if self.batched:
                code, fields = self.batched.popleft()
            else:
                code, body = self._next()
                fields = wire.decode_message(body, code)
                if code == wire.BATCH:
                    self.batched.extend((inner, wire.decode_message(part, inner))
                                        for inner, part in wire.split_batch(fields[0]))
                    continue
            if code == wire.PING:
                self.send(wire.PONG, fields[0])
                continue
            if code == wire.SHM_PROBE:  # never answered: this peer gets bytes, not segments
                continue
            return code, fields

    @property
    def address(self) -> str:
        """This end's ``host:port``, as the server's log names the connection."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """Whether the server closes this connection within ``timeout`` seconds (nothing is
        answered meanwhile: a server's heartbeat would close it too, ``heartbeat`` seconds
        after this peer last sent anything)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()
