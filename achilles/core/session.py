"""Frame authentication after the handshake: every post-auth frame is bound to its session.

The handshake gives both ends two fresh keys, one per direction
(:func:`achilles.core.handshake.session_keys`). Each post-auth frame ends with a 16-byte AES-GMAC
tag over its header and body, under the sending direction's key and a nonce that is the
frame's sequence number on that connection. The sequence number is never sent: each end
counts, so a frame that is forged, altered, replayed, reordered, dropped or moved from another
connection fails the receiver's check, and the connection closes before the frame is decoded.
"""

from __future__ import annotations

import struct
from typing import List, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from achilles.core.errors import ProtocolError

TAG_SIZE = 16
KEY_SIZE = 32
_HEADER = struct.Struct("!BI")  # wire.HEADER; the header's length field counts the tag
#: Frames this large are tagged piece by piece (the same tag, without joining the pieces
#: first); below it, joining and tagging in one call is cheaper.
PIECEWISE = 1 << 18


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "big")


class FrameSealer:
    """The sending end: appends each frame's tag, counting frames."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("session keys are 32 bytes")
        self._aead = AESGCM(key)
        self._key = key
        self._seq = 0

    def seal(self, pieces: Sequence[bytes]) -> List[bytes]:
        """Turn an encoded message (header first, as :func:`achilles.core.wire.encode_message`
        returns it) into the pieces of a sealed frame."""
        head = pieces[0]
        code, length = _HEADER.unpack(head)
        nonce = _nonce(self._seq)
        self._seq += 1
        head = _HEADER.pack(code, length + TAG_SIZE)
        if length < PIECEWISE:
            data = b"".join([head, *pieces[1:]])
            return [data, self._aead.encrypt(nonce, b"", data)]
        # GMAC over the pieces in turn equals GMAC over their concatenation.
        gmac = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        out = [head, *pieces[1:]]
        for piece in out:
            gmac.authenticate_additional_data(piece)
        gmac.finalize()
        out.append(gmac.tag)
        return out


class FrameOpener:
    """The receiving end: checks each frame's tag in order."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("session keys are 32 bytes")
        self._aead = AESGCM(key)
        self._seq = 0

    def check(self, frame: memoryview, tag: "bytes | memoryview") -> None:
        """Raise :class:`ProtocolError` unless ``tag`` is the next frame's tag over ``frame``
        (header and body, without the tag)."""
        try:
            self._aead.decrypt(_nonce(self._seq), tag, frame)
        except InvalidTag:
            raise ProtocolError(
                "a frame failed authentication: it was forged, altered, replayed, reordered or "
                "taken from another connection") from None
        self._seq += 1
