"""Mutual HMAC authentication, as I/O-free state machines (frames in, frames out).

1. server -> peer ``HELLO``    ``{"achilles": 1, "proto": V, "nonce": Ns, "max_frame": M}``
2. peer -> server ``AUTH``     ``{"proto": V, "role": R, "user": U, "nonce": Np,
                                  "proof": HMAC(key, "peer" | Ns | Np | R | U)}``
3. server -> peer ``AUTH_OK``  ``{"proof": HMAC(key, "server" | Ns | Np | R | U)}``
   or ``AUTH_FAIL`` ``{"reason": ...}`` and the connection closes.

Each side is authenticated only once it has checked the other's proof; before that only these
small JSON frames are accepted. Fresh random nonces on both sides make a recorded handshake
useless for a replay, and the direction label stops a proof being reflected back.

``key`` is :func:`derive_key` (scrypt of the secret key, salted with the user name), computed
once per process and handed to every handshake: a captured AUTH frame lets an attacker test
guesses of the secret offline, and scrypt makes each guess cost memory and time.

Both ends then derive two session keys from the same inputs, one per direction
(:func:`session_keys`); :mod:`achilles.core.session` tags every later frame with them, so a
relayed handshake gives a man in the middle nothing it can use.
"""

from __future__ import annotations

import json

import hashlib
import hmac
import secrets
from typing import List, Optional, Tuple

from achilles.core import wire
from achilles.core.config import check_secret
from achilles.core.errors import AuthenticationError, ProtocolError
from achilles.core.logs import printable

NONCE_BYTES = 32
ROLES = ("node", "controller")
MAX_USERNAME = 128

Frame = Tuple[int, bytes]


#: scrypt cost: 16 MiB and tens of milliseconds per guess (RFC 7914's interactive setting).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
KEY_BYTES = 32


def derive_key(username: str, secret_key: str) -> bytes:
    """The HMAC key for ``username`` and ``secret_key`` (both must match on each side).

    Deliberately slow (scrypt): derive it once per process, not per connection. Raises
    :class:`ConfigError` for a secret too short to resist guessing.
    """
    check_secret(secret_key)
    return hashlib.scrypt(
        secret_key.encode("utf-8"), salt=b"achilles-v2 scrypt\0" + username.encode("utf-8"),
        n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=KEY_BYTES,
    )


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise TypeError("a handshake takes the derived key (derive_key(username, secret_key)), "
                        "not the secret key itself")
    return key


def _proof(key: bytes, label: str, server_nonce: str, peer_nonce: str, role: str, user: str) -> str:
    msg = "|".join((label, server_nonce, peer_nonce, role, user)).encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def session_keys(key: bytes, server_nonce: str, peer_nonce: str, role: str,
                 user: str) -> Tuple[bytes, bytes]:
    """The keys that tag post-auth frames: ``(server -> peer, peer -> server)``."""

    def one(label: str) -> bytes:
        msg = "|".join(("achilles-frames-v1", label, server_nonce, peer_nonce, role, user))
        return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()

    return one("server->peer"), one("peer->server")


def _proof_field(obj: dict) -> str:
    """The ``proof`` field: exactly 64 lowercase hex characters, or a ProtocolError."""
    proof = obj.get("proof")
    if (not isinstance(proof, str) or len(proof) != 64
            or any(c not in "0123456789abcdef" for c in proof)):
        raise ProtocolError("handshake field 'proof' is missing or malformed")
    return proof


def _nonce(obj: dict, name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise ProtocolError(f"handshake field {name!r} is missing or malformed")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"handshake field {name!r} is not hex") from None
    return value


class ServerHandshake:
    """The server's side. States: ``start`` -> ``sent_hello`` -> ``done`` | ``failed``."""

    def __init__(self, username: str, key: bytes, nonce: Optional[str] = None,
                 max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self._key = _check_key(key)
        self._username = username
        self.max_frame = max_frame
        self.nonce = nonce or secrets.token_hex(NONCE_BYTES)
        self.state = "start"
        self.role: Optional[str] = None
        self.failure: Optional[str] = None
        self._keys: Tuple[bytes, bytes] = (b"", b"")

    def start(self) -> List[bytes]:
        """Frames to send when the connection opens."""
        assert self.state == "start"
        self.state = "sent_hello"
        return [wire.encode_json(
            wire.HELLO, {"achilles": 1, "proto": wire.PROTOCOL_VERSION, "nonce": self.nonce,
                         "max_frame": self.max_frame}
        )]

    def receive(self, code: int, body: bytes) -> List[bytes]:
        """Handle the peer's AUTH frame; returns frames to send. Raises on any failure.

        On :class:`AuthenticationError` the state is ``failed`` and :attr:`failure` says why;
        the caller should send :meth:`fail_frame` and close.
        """
        if self.state != "sent_hello" or code != wire.AUTH:
            self.state = "failed"
            raise ProtocolError(f"unexpected {wire.NAMES.get(code, code)} during handshake")
        try:
            obj = wire.decode_json(body)
            proto = obj.get("proto")
            if proto != wire.PROTOCOL_VERSION:
                raise AuthenticationError(
                    f"protocol version mismatch: server speaks {wire.PROTOCOL_VERSION}, peer {proto!r}"
                )
            role, user = obj.get("role"), obj.get("user")
            if role not in ROLES:
                raise ProtocolError(f"unknown role {role!r}")
            if not isinstance(user, str) or len(user) > MAX_USERNAME:
                raise ProtocolError("handshake field 'user' is missing or malformed")
            try:
                user.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError("handshake field 'user' is not valid text") from None
            peer_nonce = _nonce(obj, "nonce")
            proof = _proof_field(obj)
            expected = _proof(self._key, "peer", self.nonce, peer_nonce, role, user)
            if user != self._username or not hmac.compare_digest(proof, expected):
                raise AuthenticationError("wrong username or secret key")
        except (ProtocolError, AuthenticationError) as exc:
            self.state = "failed"
            self.failure = str(exc)
            raise
        self.state = "done"
        self.role = role
        self._keys = session_keys(self._key, self.nonce, peer_nonce, role, user)
        reply = _proof(self._key, "server", self.nonce, peer_nonce, role, user)
        return [wire.encode_json(wire.AUTH_OK, {"proof": reply})]

    def session_keys(self) -> Tuple[bytes, bytes]:
        """``(send key, receive key)`` for this side, once the handshake is done."""
        if self.state != "done":
            raise ProtocolError("no session keys before the handshake is done")
        to_peer, to_server = self._keys
        return to_peer, to_server

    def fail_frame(self) -> bytes:
        """The AUTH_FAIL frame telling the peer why it was refused (never secret material)."""
        reason = (self.failure or "refused")[:200]
        while True:  # peer text escaped in JSON can take 6 bytes a character: cut to fit
            body = {"reason": reason}
            if len(json.dumps(body, separators=(",", ":"))) <= wire.PREAUTH_MAX_FRAME:
                return wire.encode_json(wire.AUTH_FAIL, body)
            reason = reason[:len(reason) // 2]


class PeerHandshake:
    """A node's or controller's side. States: ``start`` -> ``sent_auth`` -> ``done`` | ``failed``."""

    def __init__(self, role: str, username: str, key: bytes, nonce: Optional[str] = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        self.role = role
        self._username = username
        self._key = _check_key(key)
        self.nonce = nonce or secrets.token_hex(NONCE_BYTES)
        self.server_nonce: Optional[str] = None
        #: The largest frame the server accepts, as its HELLO says (None: not said).
        self.server_max_frame: Optional[int] = None
        self.state = "start"
        self._keys: Tuple[bytes, bytes] = (b"", b"")

    def receive(self, code: int, body: bytes) -> List[bytes]:
        """Handle HELLO, AUTH_OK or AUTH_FAIL; returns frames to send. Raises on failure."""
        try:
            if self.state == "start" and code == wire.HELLO:
                obj = wire.decode_json(body)
                if obj.get("achilles") != 1:
                    raise ProtocolError("the server is not an Achilles server")
                if obj.get("proto") != wire.PROTOCOL_VERSION:
                    raise AuthenticationError(
                        f"protocol version mismatch: server speaks {printable(repr(obj.get('proto')), 40)}, "
                        f"this {self.role} {wire.PROTOCOL_VERSION}; install the same Achilles version"
                    )
                self.server_nonce = _nonce(obj, "nonce")
                announced = obj.get("max_frame")
                if isinstance(announced, int) and not isinstance(announced, bool) and announced > 0:
                    self.server_max_frame = announced
                proof = _proof(self._key, "peer", self.server_nonce, self.nonce, self.role, self._username)
                self.state = "sent_auth"
                return [wire.encode_json(wire.AUTH, {
                    "proto": wire.PROTOCOL_VERSION, "role": self.role, "user": self._username,
                    "nonce": self.nonce, "proof": proof,
                })]
            if self.state == "sent_auth" and code == wire.AUTH_FAIL:
                reason = printable(wire.decode_json(body).get("reason", "refused"))
                raise AuthenticationError(
                    f"the server refused this {self.role}: {reason}; check ACHILLES_USERNAME "
                    "and ACHILLES_SECRET_KEY match the server's"
                )
            if self.state == "sent_auth" and code == wire.AUTH_OK:
                obj = wire.decode_json(body)
                assert self.server_nonce is not None
                expected = _proof(self._key, "server", self.server_nonce, self.nonce, self.role, self._username)
                try:
                    proof = _proof_field(obj)
                except ProtocolError:
                    proof = ""
                if not hmac.compare_digest(proof.encode("ascii"), expected.encode("ascii")):
                    raise AuthenticationError(
                        "the server failed to prove the shared secret; it is not the server you "
                        "configured, or its ACHILLES_SECRET_KEY differs from this machine's"
                    )
                self.state = "done"
                self._keys = session_keys(self._key, self.server_nonce, self.nonce, self.role,
                                          self._username)
                return []
            raise ProtocolError(f"unexpected {wire.NAMES.get(code, code)} during handshake")
        except (ProtocolError, AuthenticationError):
            self.state = "failed"
            raise

    def session_keys(self) -> Tuple[bytes, bytes]:
        """``(send key, receive key)`` for this side, once the handshake is done."""
        if self.state != "done":
            raise ProtocolError("no session keys before the handshake is done")
        to_peer, to_server = self._keys
        return to_server, to_peer
