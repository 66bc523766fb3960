"""The I/O-free mutual HMAC handshake: ServerHandshake and PeerHandshake, frames in, frames out."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from achilles.core import handshake, wire
from achilles.core.errors import AuthenticationError, ProtocolError
from achilles.core.handshake import (
    MAX_USERNAME, NONCE_BYTES, PeerHandshake, ServerHandshake, derive_key,
)

pytestmark = pytest.mark.timeout(60)

USER = "tester"
SECRET = "s3cret-Key-that-must-never-leak-0123456789"
KEY = derive_key(USER, SECRET)


@functools.lru_cache(maxsize=None)
def key_for(user: str, secret: str) -> bytes:
    """derive_key, memoised: scrypt is deliberately slow."""
    return derive_key(user, secret)


def unframe(data: bytes):
    """Decode exactly one pre-auth frame with a real pre-auth FrameDecoder."""
    decoder = wire.FrameDecoder()
    frames = decoder.frames(data)
    assert len(frames) == 1 and decoder.buffered == 0, frames
    return frames[0]


def one(frames):
    """The single frame in a list of encoded frames, decoded."""
    assert len(frames) == 1, frames
    return unframe(frames[0])


def run_to_auth(server: ServerHandshake, peer: PeerHandshake):
    """Run HELLO -> AUTH; return the AUTH frame (code, body) the peer produced."""
    hello = one(server.start())
    assert hello[0] == wire.HELLO
    auth = one(peer.receive(*hello))
    assert auth[0] == wire.AUTH
    return auth


def valid_auth_obj(server: ServerHandshake, role="node", user=USER, secret=SECRET):
    """A correct AUTH body (as a dict) for ``server``, built by a real PeerHandshake."""
    peer = PeerHandshake(role, user, key_for(user, secret))
    _, body = run_to_auth(server, peer)
    return json.loads(body)


def auth_body(obj) -> bytes:
    return json.dumps(obj).encode()


# --- success ----------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["node", "controller"])
def test_handshake_completes_with_same_credentials(role):
    """Matching credentials authenticate both sides; the server learns the peer's role."""
    server = ServerHandshake(USER, KEY)
    peer = PeerHandshake(role, USER, KEY)
    assert server.state == "start" and peer.state == "start"
    auth = run_to_auth(server, peer)
    assert server.state == "sent_hello" and peer.state == "sent_auth"
    ok = one(server.receive(*auth))
    assert ok[0] == wire.AUTH_OK
    assert server.state == "done"
    assert server.role == role
    assert server.failure is None
    assert peer.receive(*ok) == []
    assert peer.state == "done"


def test_hello_and_auth_carry_documented_fields():
    """HELLO carries achilles/proto/nonce/max_frame, exactly the registry's declaration; AUTH
    carries proto/role/user/nonce/proof, no secret. The peer keeps the server's frame limit."""
    server = ServerHandshake(USER, KEY, max_frame=12345678)
    peer = PeerHandshake("controller", USER, KEY)
    hello = json.loads(unframe(server.start()[0])[1])
    assert hello == {"achilles": 1, "proto": wire.PROTOCOL_VERSION, "nonce": server.nonce,
                     "max_frame": 12345678}
    assert set(hello) == {f.name for f in wire.REGISTRY[wire.HELLO].fields}
    assert len(bytes.fromhex(server.nonce)) == NONCE_BYTES
    _, raw = one(peer.receive(wire.HELLO, json.dumps(hello).encode()))
    auth = json.loads(raw)
    assert set(auth) == {"proto", "role", "user", "nonce", "proof"}
    assert set(auth) == {f.name for f in wire.REGISTRY[wire.AUTH].fields}
    assert peer.server_max_frame == 12345678
    assert auth["proto"] == wire.PROTOCOL_VERSION
    assert auth["role"] == "controller" and auth["user"] == USER
    assert auth["nonce"] == peer.nonce != server.nonce
    assert SECRET not in raw.decode()
    assert KEY.hex() not in raw.decode()


def test_nonces_are_fresh():
    """Each handshake object draws a new random nonce."""
    nonces = {ServerHandshake(USER, KEY).nonce for _ in range(20)}
    nonces |= {PeerHandshake("node", USER, KEY).nonce for _ in range(20)}
    assert len(nonces) == 40


def test_key_depends_on_username_and_secret():
    """derive_key differs when either the user name or the secret differs."""
    assert derive_key(USER, SECRET) == KEY
    assert derive_key(USER + "x", SECRET) != KEY
    assert derive_key(USER, SECRET + "x") != KEY
    # the user name salts the secret: ("ab", "c...") does not collide with ("a", "bc...")
    assert derive_key("ab", "c" + SECRET) != derive_key("a", "bc" + SECRET)


# --- refusals ---------------------------------------------------------------------------------

def _refused(server: ServerHandshake, peer: PeerHandshake, secret_in_peer: str):
    auth = run_to_auth(server, peer)
    with pytest.raises(AuthenticationError):
        server.receive(*auth)
    assert server.state == "failed"
    assert server.role is None
    code, body = unframe(server.fail_frame())
    assert code == wire.AUTH_FAIL
    reason = wire.decode_json(body)["reason"]
    assert reason and reason == server.failure
    for secret in (SECRET, secret_in_peer):
        assert secret not in body.decode()
        assert key_for(USER, secret).hex() not in body.decode()
    with pytest.raises(AuthenticationError, match="refused") as info:
        peer.receive(code, body)
    assert reason in str(info.value)
    assert peer.state == "failed"
    return reason


def test_wrong_secret_is_refused():
    """A peer with a different secret key is refused with a reason that leaks no secret."""
    wrong = "not-the-" + SECRET
    reason = _refused(ServerHandshake(USER, KEY), PeerHandshake("node", USER, key_for(USER, wrong)), wrong)
    assert "wrong username or secret key" in reason


def test_wrong_username_is_refused():
    """A peer with the right secret but another user name is refused the same way."""
    reason = _refused(ServerHandshake(USER, KEY),
                      PeerHandshake("controller", "mallory", key_for("mallory", SECRET)), SECRET)
    assert "wrong username or secret key" in reason


def test_fail_frame_without_failure_says_refused():
    """fail_frame before any failure still produces a small, valid AUTH_FAIL frame."""
    code, body = unframe(ServerHandshake(USER, KEY).fail_frame())
    assert code == wire.AUTH_FAIL
    assert wire.decode_json(body) == {"reason": "refused"}


def test_fail_frame_fits_the_preauth_cap_whatever_the_peer_sent():
    """A refusal quoting peer text that JSON escapes to 6 bytes a character (found by the
    fuzz test) still gives an AUTH_FAIL within the pre-auth cap, its reason cut, not an error."""
    server = ServerHandshake(USER, KEY)
    obj = valid_auth_obj(server)
    obj["role"] = "\u2603" * 150
    with pytest.raises((ProtocolError, AuthenticationError)):
        server.receive(wire.AUTH, auth_body(obj))
    frame = server.fail_frame()
    code, body = unframe(frame)
    assert code == wire.AUTH_FAIL
    assert len(body) <= wire.PREAUTH_MAX_FRAME
    assert wire.decode_json(body)["reason"].startswith("unknown role")


def test_fake_server_with_other_secret_is_detected():
    """A server that answers AUTH_OK with a proof made from a different secret is refused."""
    fake = ServerHandshake(USER, key_for(USER, "the-fake-servers-secret"))
    peer = PeerHandshake("node", USER, KEY)
    auth = json.loads(run_to_auth(fake, peer)[1])
    forged = handshake._proof(key_for(USER, "the-fake-servers-secret"), "server",
                              fake.nonce, auth["nonce"], "node", USER)
    with pytest.raises(AuthenticationError, match="failed to prove"):
        peer.receive(wire.AUTH_OK, auth_body({"proof": forged}))
    assert peer.state == "failed"


def test_reflected_proof_is_refused():
    """A fake server echoing the peer's own proof back as AUTH_OK is refused (direction label)."""
    fake = ServerHandshake(USER, KEY)
    peer = PeerHandshake("node", USER, KEY)
    auth = json.loads(run_to_auth(fake, peer)[1])
    with pytest.raises(AuthenticationError):
        peer.receive(wire.AUTH_OK, auth_body({"proof": auth["proof"]}))
    assert peer.state == "failed"


@pytest.mark.parametrize("body", [{}, {"proof": None}, {"proof": 12}, {"proof": ""}])
def test_auth_ok_without_valid_proof_is_refused(body):
    """AUTH_OK with a missing, non-string or empty proof fails authentication."""
    peer = PeerHandshake("node", USER, KEY)
    run_to_auth(ServerHandshake(USER, KEY), peer)
    with pytest.raises(AuthenticationError):
        peer.receive(wire.AUTH_OK, auth_body(body))
    assert peer.state == "failed"


def test_replayed_auth_fails_against_new_server():
    """An AUTH frame recorded from a successful handshake is refused by a fresh ServerHandshake."""
    first = ServerHandshake(USER, KEY)
    peer = PeerHandshake("node", USER, KEY)
    recorded = run_to_auth(first, peer)
    first.receive(*recorded)
    assert first.state == "done"
    second = ServerHandshake(USER, KEY)
    second.start()
    assert second.nonce != first.nonce
    with pytest.raises(AuthenticationError):
        second.receive(*recorded)
    assert second.state == "failed"


def test_auth_ok_cannot_be_replayed_to_new_peer():
    """An AUTH_OK recorded from one handshake does not authenticate a server to a new peer."""
    server = ServerHandshake(USER, KEY)
    peer = PeerHandshake("node", USER, KEY)
    recorded_ok = one(server.receive(*run_to_auth(server, peer)))
    # a new connection: the attacker replays the old HELLO (same server nonce) and the old AUTH_OK
    peer2 = PeerHandshake("node", USER, KEY)
    peer2.receive(wire.HELLO, auth_body({"achilles": 1, "proto": wire.PROTOCOL_VERSION,
                                         "nonce": server.nonce}))
    with pytest.raises(AuthenticationError):
        peer2.receive(*recorded_ok)


def test_second_auth_after_done_is_refused():
    """Once done, the server handshake accepts no further frames."""
    server = ServerHandshake(USER, KEY)
    auth = run_to_auth(server, PeerHandshake("node", USER, KEY))
    server.receive(*auth)
    with pytest.raises(ProtocolError):
        server.receive(*auth)
    assert server.state == "failed"


def test_auth_before_hello_is_refused():
    """The server refuses an AUTH before it has sent HELLO (no nonce on the wire yet)."""
    server = ServerHandshake(USER, KEY)
    with pytest.raises(ProtocolError):
        server.receive(wire.AUTH, b"{}")
    assert server.state == "failed"


@pytest.mark.parametrize("code", [wire.HELLO, wire.AUTH_OK, wire.AUTH_FAIL, wire.TASK, 200])
def test_server_refuses_other_codes(code):
    """The server handshake accepts only AUTH after HELLO."""
    server = ServerHandshake(USER, KEY)
    server.start()
    with pytest.raises(ProtocolError, match="during handshake"):
        server.receive(code, b"{}")
    assert server.state == "failed"


@pytest.mark.parametrize("code", [wire.AUTH, wire.AUTH_OK, wire.AUTH_FAIL, wire.TASK])
def test_peer_refuses_frames_out_of_order(code):
    """Before HELLO the peer accepts nothing else; AUTH_OK cannot skip the exchange."""
    peer = PeerHandshake("node", USER, KEY)
    with pytest.raises(ProtocolError):
        peer.receive(code, auth_body({"proof": "00" * 32, "reason": "x"}))
    assert peer.state == "failed"


def test_peer_refuses_second_hello():
    """A second HELLO after the peer sent AUTH is a protocol error."""
    server = ServerHandshake(USER, KEY)
    peer = PeerHandshake("node", USER, KEY)
    hello = one(server.start())
    peer.receive(*hello)
    with pytest.raises(ProtocolError):
        peer.receive(*hello)
    assert peer.state == "failed"


def test_peer_rejects_bad_role():
    """PeerHandshake only plays the node or controller role."""
    with pytest.raises(ValueError):
        PeerHandshake("server", USER, KEY)


# --- versions and malformed frames ------------------------------------------------------------

@pytest.mark.parametrize("proto", [0, 1, 99, "2", None])
def test_server_reports_version_mismatch(proto):
    """An AUTH with another protocol version is refused, naming both versions."""
    server = ServerHandshake(USER, KEY)
    obj = valid_auth_obj(server)
    if proto is None:
        del obj["proto"]
    else:
        obj["proto"] = proto
    with pytest.raises(AuthenticationError, match="protocol version mismatch") as info:
        server.receive(wire.AUTH, auth_body(obj))
    assert str(wire.PROTOCOL_VERSION) in str(info.value)
    assert server.state == "failed"
    reason = wire.decode_json(unframe(server.fail_frame())[1])["reason"]
    assert "protocol version mismatch" in reason


def test_peer_reports_version_mismatch():
    """A HELLO with another protocol version tells the peer to install the same version."""
    peer = PeerHandshake("node", USER, KEY)
    hello = {"achilles": 1, "proto": wire.PROTOCOL_VERSION + 1, "nonce": "ab" * NONCE_BYTES}
    with pytest.raises(AuthenticationError, match="protocol version mismatch") as info:
        peer.receive(wire.HELLO, auth_body(hello))
    assert "same Achilles version" in str(info.value)
    assert peer.state == "failed"


@pytest.mark.parametrize("hello", [
    {"proto": wire.PROTOCOL_VERSION, "nonce": "ab" * NONCE_BYTES},
    {"achilles": 2, "proto": wire.PROTOCOL_VERSION, "nonce": "ab" * NONCE_BYTES},
    {"achilles": 1, "proto": wire.PROTOCOL_VERSION},
    {"achilles": 1, "proto": wire.PROTOCOL_VERSION, "nonce": "ab" * (NONCE_BYTES - 1)},
    {"achilles": 1, "proto": wire.PROTOCOL_VERSION, "nonce": "zz" * NONCE_BYTES},
    {"achilles": 1, "proto": wire.PROTOCOL_VERSION, "nonce": 5},
])
def test_peer_rejects_malformed_hello(hello):
    """A HELLO that is not from an Achilles server or has a bad nonce is a ProtocolError."""
    peer = PeerHandshake("controller", USER, KEY)
    with pytest.raises(ProtocolError):
        peer.receive(wire.HELLO, auth_body(hello))
    assert peer.state == "failed"


@pytest.mark.parametrize("body", [b"", b"\x80\x04pickle", b"[1]", b'"hello"'])
def test_peer_rejects_non_json_hello(body):
    """A HELLO body that is not a JSON object is a ProtocolError."""
    peer = PeerHandshake("node", USER, KEY)
    with pytest.raises(ProtocolError):
        peer.receive(wire.HELLO, body)


DELETE = object()
MALFORMED = [
    ("nonce", "ab" * (NONCE_BYTES - 1) + "a"),  # odd and short
    ("nonce", "ab" * (NONCE_BYTES + 1)),         # too long
    ("nonce", "zz" * NONCE_BYTES),               # right length, not hex
    ("nonce", 1234),
    ("nonce", None),
    ("nonce", DELETE),
    ("role", "admin"),
    ("role", "server"),
    ("role", None),
    ("role", ["node"]),
    ("proof", DELETE),
    ("proof", None),
    ("proof", 42),
    ("proof", ["00"]),
    ("user", "u" * (MAX_USERNAME + 1)),
    ("user", 7),
    ("user", None),
    ("user", DELETE),
]


@pytest.mark.parametrize("field,value", MALFORMED,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(MALFORMED)])
def test_server_rejects_malformed_auth_fields(field, value):
    """AUTH with a bad nonce, unknown role, missing proof or bad user name is a ProtocolError."""
    server = ServerHandshake(USER, KEY)
    obj = valid_auth_obj(server)
    if value is DELETE:
        del obj[field]
    else:
        obj[field] = value
    with pytest.raises(ProtocolError):
        server.receive(wire.AUTH, auth_body(obj))
    assert server.state == "failed"
    assert server.failure


def test_long_username_rejected_even_when_server_uses_it():
    """A user name over MAX_USERNAME is malformed even if it is the configured one."""
    long_user = "u" * (MAX_USERNAME + 1)
    server = ServerHandshake(long_user, key_for(long_user, SECRET))
    peer = PeerHandshake("node", long_user, key_for(long_user, SECRET))
    with pytest.raises(ProtocolError, match="user"):
        server.receive(*run_to_auth(server, peer))


@pytest.mark.parametrize("body", [b"", b"\xff", b"[]", b"null", b"\x80\x05N."])
def test_server_rejects_non_json_auth(body):
    """An AUTH body that is not a JSON object is a ProtocolError."""
    server = ServerHandshake(USER, KEY)
    server.start()
    with pytest.raises(ProtocolError):
        server.receive(wire.AUTH, body)
    assert server.state == "failed"


def test_server_rejects_non_ascii_proof_cleanly():
    """A proof string with non-ASCII characters is refused with AuthenticationError or
    ProtocolError (the handshake's documented errors), never another exception type."""
    server = ServerHandshake(USER, KEY)
    obj = valid_auth_obj(server)
    obj["proof"] = "\u00e9" * 64
    with pytest.raises((AuthenticationError, ProtocolError)):
        server.receive(wire.AUTH, auth_body(obj))
    assert server.state == "failed"


def test_server_rejects_lone_surrogate_username_cleanly():
    """A user name that JSON decodes to a lone surrogate is refused with a handshake error,
    not a UnicodeEncodeError."""
    server = ServerHandshake(USER, KEY)
    obj = valid_auth_obj(server)
    body = auth_body(obj).replace(b'"user": "tester"', b'"user": "\\ud800"')
    assert b"\\ud800" in body
    with pytest.raises((AuthenticationError, ProtocolError)):
        server.receive(wire.AUTH, body)
    assert server.state == "failed"


def test_peer_rejects_non_ascii_server_proof_cleanly():
    """A (fake) server's AUTH_OK with a non-ASCII proof fails authentication on the peer
    with AuthenticationError, not another exception type."""
    peer = PeerHandshake("node", USER, KEY)
    run_to_auth(ServerHandshake(USER, KEY), peer)
    with pytest.raises(AuthenticationError):
        peer.receive(wire.AUTH_OK, auth_body({"proof": "\u00e9" * 64}))
    assert peer.state == "failed"


# --- fuzzing ----------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=70),
                         st.floats(allow_nan=False))
JSON_ANY = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)


_GONE = object()
FIELDS = ("proto", "role", "user", "nonce", "proof", "extra")
REPLACEMENT = st.one_of(st.just(_GONE), JSON_ANY, st.text(max_size=130),
                        st.text(alphabet="0123456789abcdefABCDEF ", max_size=70))


@st.composite
def _auth_frames(draw):
    """(code, body builder) pairs: random bytes, random JSON, or, mostly, a genuine AUTH
    with up to three fields deleted or replaced by junk (zero mutations: a valid AUTH)."""
    code = draw(st.one_of(st.just(wire.AUTH), st.integers(0, 255)))
    kind = draw(st.sampled_from(["bytes", "json", "mutate", "mutate", "mutate", "mutate"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=wire.PREAUTH_MAX_FRAME))
        return code, lambda server: body
    if kind == "json":
        value = draw(JSON_ANY)
        return code, lambda server: json.dumps(value).encode()
    role = draw(st.sampled_from(handshake.ROLES))
    mutations = draw(st.lists(st.tuples(st.sampled_from(FIELDS), REPLACEMENT), max_size=3))
    extra_key = draw(st.text(max_size=8))

    def build(server):
        obj = valid_auth_obj(server, role=role)
        for name, value in mutations:
            key = extra_key if name == "extra" else name
            if value is _GONE:
                obj.pop(key, None)
            else:
                obj[key] = value
        return json.dumps(obj).encode()

    return code, build


@pytest.mark.timeout(300)  # a hang guard: 1,000 examples take ~15 s on a quiet machine
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_auth_frames(), st.booleans())
def test_fuzz_server_receive(case, started):
    """Whatever frame reaches ServerHandshake.receive, only ProtocolError or
    AuthenticationError escape; on error the state is ``failed`` and fail_frame is valid."""
    code, build = case
    server = ServerHandshake(USER, KEY)
    body = build(server)  # draws HELLO (server.start) when building a field-wise body
    if started and server.state == "start":
        server.start()
    note(f"code={code} body={body!r}")
    try:
        replies = server.receive(code, body)
    except (ProtocolError, AuthenticationError):
        assert server.state == "failed"
        assert server.role is None
        fcode, fbody = unframe(server.fail_frame())
        assert fcode == wire.AUTH_FAIL
        assert SECRET not in fbody.decode()
    else:
        assert server.state == "done"
        assert server.role in handshake.ROLES
        assert one(replies)[0] == wire.AUTH_OK


def test_fail_frame_fits_the_preauth_cap_whatever_the_peer_sent() -> None:
    """A refusal whose reason quotes the peer's text (here a protocol version of characters
    that JSON escapes as 12 bytes each) still makes an AUTH_FAIL frame within the pre-auth cap."""
    server = ServerHandshake("user", derive_key("user", "a-secret-of-enough-length"))
    server.start()
    auth = wire.encode_json(wire.AUTH, {"proto": ["\U0001cf00" * 40]})
    code, body = wire.FrameDecoder().frames(auth)[0]
    with pytest.raises(AuthenticationError):
        server.receive(code, body)
    frame = server.fail_frame()
    assert len(frame) <= wire.HEADER.size + wire.PREAUTH_MAX_FRAME
    assert wire.FrameDecoder().frames(frame)[0][0] == wire.AUTH_FAIL
