"""The wire format: frames, the incremental FrameDecoder, JSON and pickled message bodies."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from achilles.core import wire
from achilles.core.errors import ProtocolError

pytestmark = pytest.mark.timeout(60)


SAMPLE_FRAMES = [
    (wire.HELLO, json.dumps({"achilles": 1, "proto": 1, "nonce": "ab" * 32}).encode()),
    (wire.AUTH, b"{}"),
    (wire.AUTH_OK, b""),
    (wire.AUTH_FAIL, b'{"reason":"nope"}'),
    (wire.HELLO, b"x" * wire.PREAUTH_MAX_FRAME),
]


# --- frames -----------------------------------------------------------------------------------

def test_frame_layout():
    """A frame is a one-byte code, a four-byte big-endian body length, then the body."""
    data = wire.frame(wire.AUTH, b"hello")
    assert data == bytes([wire.AUTH, 0, 0, 0, 5]) + b"hello"
    assert wire.HEADER.size == 5


def test_frame_round_trip():
    """Frames encoded with ``frame`` come out of a FrameDecoder with the same code and body."""
    decoder = wire.FrameDecoder()
    for code, body in SAMPLE_FRAMES:
        assert decoder.frames(wire.frame(code, body)) == [(code, body)]
    assert decoder.buffered == 0


def test_decoder_reassembles_at_every_split_point():
    """A stream of frames split in two at any byte boundary decodes to the same frames."""
    stream = b"".join(wire.frame(c, b) for c, b in SAMPLE_FRAMES)
    for cut in range(len(stream) + 1):
        decoder = wire.FrameDecoder()
        got = decoder.frames(stream[:cut]) + decoder.frames(stream[cut:])
        assert got == SAMPLE_FRAMES, f"split at byte {cut}"
        assert decoder.buffered == 0


def test_decoder_reassembles_byte_by_byte():
    """Feeding one byte at a time yields each frame exactly when its last byte arrives."""
    stream = b"".join(wire.frame(c, b) for c, b in SAMPLE_FRAMES)
    ends = []
    offset = 0
    for code, body in SAMPLE_FRAMES:
        offset += wire.HEADER.size + len(body)
        ends.append(offset)
    decoder = wire.FrameDecoder()
    got, completed_at = [], []
    for i in range(len(stream)):
        new = decoder.frames(stream[i:i + 1])
        got += new
        completed_at += [i + 1] * len(new)
    assert got == SAMPLE_FRAMES
    assert completed_at == ends


def test_many_frames_in_one_feed():
    """Hundreds of frames delivered in a single feed all come out, in order."""
    frames = [(wire.AUTH, json.dumps({"i": i}).encode()) for i in range(500)]
    decoder = wire.FrameDecoder()
    assert decoder.frames(b"".join(wire.frame(c, b) for c, b in frames)) == frames
    assert decoder.buffered == 0


def test_partial_frame_stays_buffered():
    """A header with an incomplete body yields nothing and keeps the bytes buffered."""
    data = wire.frame(wire.AUTH, b"0123456789")
    decoder = wire.FrameDecoder()
    assert decoder.frames(data[:8]) == []
    assert decoder.buffered == 8
    assert decoder.frames(data[8:]) == [(wire.AUTH, b"0123456789")]


def test_frame_at_preauth_limit_is_accepted():
    """A body of exactly PREAUTH_MAX_FRAME bytes is within the pre-auth limit."""
    body = b"y" * wire.PREAUTH_MAX_FRAME
    assert wire.FrameDecoder().frames(wire.frame(wire.AUTH, body)) == [(wire.AUTH, body)]


def test_oversized_preauth_frame_raises_from_header_alone():
    """A header announcing more than 512 bytes is refused before any of the body arrives."""
    decoder = wire.FrameDecoder()
    header = wire.HEADER.pack(wire.AUTH, wire.PREAUTH_MAX_FRAME + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.frames(header)


def test_decoder_stays_dead_after_error():
    """After a ProtocolError every later feed and next_frame raises, even with valid input."""
    decoder = wire.FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.frames(wire.HEADER.pack(wire.AUTH, 10_000) + b"z" * 100)
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    with pytest.raises(ProtocolError):
        decoder.feed(wire.frame(wire.AUTH, b"{}"))
    with pytest.raises(ProtocolError):
        decoder.frames(wire.frame(wire.AUTH, b"{}"))
    # lifting the limit does not revive it either
    decoder.set_limit(wire.DEFAULT_MAX_FRAME, wire.ALL_CODES)
    with pytest.raises(ProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize("code", [0, 5, 15, 99, 255, wire.SUBMIT, wire.TASK, wire.RESULT])
def test_unknown_or_postauth_code_raises_before_auth(code):
    """Before authentication any code but HELLO/AUTH/AUTH_OK/AUTH_FAIL is a ProtocolError."""
    decoder = wire.FrameDecoder()
    with pytest.raises(ProtocolError, match="unexpected message code"):
        decoder.frames(wire.frame(code, b"{}"))
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_bad_code_is_refused_from_header_alone():
    """A bad code is refused as soon as the header is in, without waiting for the body."""
    decoder = wire.FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.frames(wire.HEADER.pack(wire.TASK, 400))


def test_set_limit_lifts_size_limit_and_changes_codes():
    """After set_limit a post-auth decoder takes big frames of post-auth codes only."""
    decoder = wire.FrameDecoder()
    decoder.set_limit(wire.DEFAULT_MAX_FRAME, wire.POSTAUTH_CODES)
    body = b"b" * (wire.PREAUTH_MAX_FRAME * 10)
    assert decoder.frames(wire.frame(wire.TASK, body)) == [(wire.TASK, body)]
    with pytest.raises(ProtocolError):
        decoder.frames(wire.frame(wire.AUTH, b"{}"))


def test_set_limit_between_frames_of_one_feed():
    """A big post-auth frame pipelined behind the handshake frame decodes once the limit is lifted."""
    big = b"p" * 10_000
    decoder = wire.FrameDecoder()
    decoder.feed(wire.frame(wire.AUTH, b"{}") + wire.frame(wire.CHUNK, big))
    assert decoder.next_frame() == (wire.AUTH, b"{}")
    decoder.set_limit(wire.DEFAULT_MAX_FRAME, wire.POSTAUTH_CODES)
    assert decoder.next_frame() == (wire.CHUNK, big)
    assert decoder.next_frame() is None


def test_postauth_limit_still_enforced():
    """set_limit installs a new cap rather than removing the cap."""
    decoder = wire.FrameDecoder()
    decoder.set_limit(1000, wire.POSTAUTH_CODES)
    with pytest.raises(ProtocolError, match="exceeds the limit of 1000"):
        decoder.frames(wire.HEADER.pack(wire.TASK, 1001))


def test_code_sets_partition_the_names():
    """Every named code is either pre-auth or post-auth, never both."""
    assert wire.PREAUTH_CODES | wire.POSTAUTH_CODES == wire.ALL_CODES
    assert not wire.PREAUTH_CODES & wire.POSTAUTH_CODES
    assert wire.PREAUTH_CODES == {wire.HELLO, wire.AUTH, wire.AUTH_OK, wire.AUTH_FAIL}
    assert wire.NAMES[wire.TASK] == "TASK"


def test_large_body_in_small_pieces():
    """A 5 MiB body fed in 64 KiB pieces arrives intact, and only after its last piece."""
    body = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    assert len(body) == 5 * 1024 * 1024
    data = b"".join(wire.encode_message(wire.CHUNK, ("job", 1, 3, body)))
    decoder = wire.FrameDecoder()
    decoder.set_limit(wire.DEFAULT_MAX_FRAME, wire.POSTAUTH_CODES)
    piece = 64 * 1024
    got = []
    for start in range(0, len(data), piece):
        got += decoder.frames(data[start:start + piece])
        if start + piece < len(data):
            assert got == []
    assert len(got) == 1
    code, raw = got[0]
    assert code == wire.CHUNK
    fields = wire.decode_message(raw, code)
    assert fields[:3] == ("job", 1, 3) and bytes(fields[3]) == body
    assert decoder.buffered == 0


# --- JSON bodies ------------------------------------------------------------------------------

def test_encode_json_round_trip():
    """encode_json frames a compact JSON object that decode_json reads back."""
    obj = {"proto": 1, "user": "tester", "nonce": "00" * 32}
    data = wire.encode_json(wire.AUTH, obj)
    [(code, body)] = wire.FrameDecoder().frames(data)
    assert code == wire.AUTH
    assert wire.decode_json(body) == obj
    assert b" " not in body


def test_encode_json_refuses_oversized_body():
    """encode_json raises ProtocolError rather than emit a body over the pre-auth cap."""
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.encode_json(wire.AUTH_FAIL, {"reason": "r" * wire.PREAUTH_MAX_FRAME})
    # just under the cap still works: {"r":"..."} is 8 bytes of overhead
    ok = wire.encode_json(wire.AUTH_FAIL, {"r": "r" * (wire.PREAUTH_MAX_FRAME - 8)})
    assert len(ok) == wire.HEADER.size + wire.PREAUTH_MAX_FRAME
    with pytest.raises(ProtocolError):
        wire.encode_json(wire.AUTH_FAIL, {"r": "r" * (wire.PREAUTH_MAX_FRAME - 7)})


@pytest.mark.parametrize("body", [
    b"", b"not json", b"\xff\xfe\x00", b"{", b'{"a":}',
    pickle.dumps({"a": 1}), pickle.dumps(("x",)),
])
def test_decode_json_rejects_non_json(body):
    """decode_json turns any undecodable body into ProtocolError."""
    with pytest.raises(ProtocolError, match="not JSON"):
        wire.decode_json(body)


@pytest.mark.parametrize("body", [b"[]", b"[1,2]", b'"str"', b"1", b"null", b"true", b"NaN"])
def test_decode_json_rejects_non_object(body):
    """decode_json accepts only a JSON object at the top level."""
    with pytest.raises(ProtocolError, match="not a JSON object"):
        wire.decode_json(body)


# --- pickled bodies ---------------------------------------------------------------------------

def test_encode_decode_message_round_trip():
    """encode_message/decode_message carry a declared message's fields unchanged."""
    fields = ("job-1", "pkg.square", b"\x00code\xff", b"", {"timeout": 3.5, "tags": ["a", "b"]})
    pieces = wire.encode_message(wire.SUBMIT, fields)
    assert len(pieces) == 2
    header, body = pieces
    assert wire.HEADER.unpack(header) == (wire.SUBMIT, len(body))
    decoder = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME, wire.POSTAUTH_CODES)
    [(code, raw)] = decoder.frames(b"".join(pieces))
    assert code == wire.SUBMIT
    assert wire.decode_message(raw, code) == fields


PAYLOAD_FIELDS = {
    wire.CHUNK: ("job-1", 7, 3),
    wire.RESULT: ("job-1", 7, wire.OK, 0.25, "node-\u00e9"),
    wire.TASK: ("job-1", 7, False, None),
    wire.TASK_DONE: ("graph-1", 7, wire.OK, "node-1", 0.5),
    wire.PIPE_FEED: ("pipe-1", 7, 3, 1, False),
    wire.PIPE_WORK: ("pipe-1", 2, 1, 0, 9, "items"),
    wire.PIPE_OUT: ("pipe-1", 2, 1, 0, 9, wire.OK, 4, 0, False, b""),
    wire.PIPE_RESULT: ("pipe-1", 7, [0, 1], True, 0),
    wire.OUTPUT: ("job-1", 7, "node-1", 3),
    wire.OUTPUT_TAIL: ("job-1", 7, "node-1"),
    wire.PIPE_OUTPUT: ("pipe-1", 2, 1, "node-1", 3),
    wire.BATCH: (),
}


def test_every_payload_message_is_covered():
    """The payload test below covers every message declared with a raw payload."""
    assert set(PAYLOAD_FIELDS) == wire.PAYLOAD_CODES


@pytest.mark.parametrize("code", sorted(wire.PAYLOAD_CODES))
def test_payload_messages_carry_payload_raw(code):
    """Payload messages put the payload after the pickled fields, unpickled and uncopied:
    it appears verbatim at the end of the body and decodes as the last field."""
    payload = b"\x80\x05raw payload bytes" * 100
    pieces = wire.encode_message(code, PAYLOAD_FIELDS[code] + (payload,))
    assert pieces[-1] is payload
    body = b"".join(pieces[1:])
    assert body.endswith(payload)
    fields = wire.decode_message(body, code)
    assert fields[:-1] == PAYLOAD_FIELDS[code]
    assert isinstance(fields[-1], memoryview) and bytes(fields[-1]) == payload


def test_payload_message_with_bad_length_is_protocol_error():
    """A payload message whose fields length overruns its body is a ProtocolError."""
    with pytest.raises(ProtocolError):
        wire.decode_message(wire.META.pack(1000) + b"short", wire.RESULT)
    with pytest.raises(ProtocolError):
        wire.decode_message(b"\x00", wire.RESULT)


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, "text", 5, None])
def test_decode_message_rejects_non_tuple(value):
    """decode_message refuses a body that does not unpickle to a tuple."""
    with pytest.raises(ProtocolError, match="not a tuple"):
        wire.decode_message(pickle.dumps(value), wire.STATUS)


@pytest.mark.parametrize("body", [b"", b"\x80\x05garbage", b"not a pickle"])
def test_decode_message_rejects_undecodable_body(body):
    """A body that does not unpickle is a ProtocolError, not whatever pickle raised."""
    with pytest.raises(ProtocolError, match="malformed STATUS"):
        wire.decode_message(body, wire.STATUS)


# --- the message registry ---------------------------------------------------------------------

def test_every_code_is_declared_once_with_a_name():
    """Every Msg code has exactly one declaration, and module names match the enum."""
    assert set(wire.REGISTRY) == set(wire.Msg)
    for code, message in wire.REGISTRY.items():
        assert message.code == code and getattr(wire, message.name) == code
        assert message.routes and all(s in wire.ROLES and r in wire.ROLES
                                      for s, r in message.routes)
        assert not message.payload or message.fields[-1].name == "payload"


def test_only_enum_members_are_codes():
    """Only declared Msg codes are message codes (no scan of module globals, so a new constant
    never becomes an accepted code); an undeclared code is refused."""
    assert wire.ALL_CODES == frozenset(wire.Msg)
    assert wire.POSTAUTH_CODES == frozenset(m for m in wire.Msg if m >= 16)
    with pytest.raises(ProtocolError, match="not a post-auth message"):
        wire.decode_message(pickle.dumps((1,)), 99)


@pytest.mark.parametrize("code,fields,what", [
    (wire.SUBMIT, ("job",), "1 fields, expected 5"),
    (wire.CHUNK, ("job", "seven", 3, b"p"), "'chunk_id' is str"),
    (wire.NODE_READY, ("n", 2.5, "h", 1, {}), "'processes' is float"),
    (wire.RESULT, ("job", 1, 0, "fast", "n", b""), "'elapsed' is str"),
    (wire.CANCEL, ("job", None), "'reason' is NoneType"),
    (wire.WANT, ("job", 1, 2), "3 fields, expected 4"),
    (wire.PING, ("token",), "'token' is str"),
    (wire.GRAPH, ("g", b"", {"not": "a list"}, []), "'tasks' is dict"),
    (wire.PIPE_OUT, ("p", 0, 0, 0, 1, 0, 1, 0, "no", b"", b""), "'exhausted' is str"),
])
def test_wrong_field_types_are_protocol_errors(code, fields, what):
    """A message whose fields do not match its declaration is a ProtocolError when decoded,
    before any handler could run, and encode_message refuses to send it."""
    message = wire.REGISTRY[code]
    if message.payload:
        meta = pickle.dumps(tuple(fields[:-1]))
        body = wire.META.pack(len(meta)) + meta + bytes(fields[-1])
    else:
        body = pickle.dumps(tuple(fields))
    with pytest.raises(ProtocolError, match=what):
        wire.decode_message(body, code)
    with pytest.raises(ProtocolError, match=what):
        wire.encode_message(code, fields)


def test_inbound_sets_follow_routes():
    """Each role accepts from each peer exactly the messages declared for that direction."""
    assert wire.inbound("server", "node") == {wire.NODE_READY, wire.NODE_LOAD, wire.RESULT,
                                              wire.TASK_ERROR, wire.PIPE_OUT, wire.OUTPUT,
                                              wire.OUTPUT_TAIL, wire.PIPE_OUTPUT,
                                              wire.TASK_PROGRESS, wire.PING, wire.PONG,
                                              wire.SHM_OK, wire.BATCH}
    assert wire.inbound("node", "server") == {wire.TASK, wire.JOB_CODE, wire.JOB_DONE,
                                              wire.CANCEL, wire.SHUTDOWN, wire.PIPE_WORK,
                                              wire.SHM_PROBE, wire.PING, wire.PONG,
                                              wire.BATCH}
    assert wire.SHM_PROBE in wire.inbound("controller", "server")
    assert wire.SHM_OK in wire.inbound("server", "controller")
    assert wire.SUBMIT in wire.inbound("server", "controller")
    assert wire.SUBMIT not in wire.inbound("server", "node")
    assert wire.TASK not in wire.inbound("controller", "server")
    assert not wire.inbound("node", "controller")


def test_every_role_handles_everything_it_can_receive():
    """The server, node and controller protocols each have a handler for every message
    their peers may send them, and none for messages they can never receive."""
    from achilles.controller.client import ControllerProtocol
    from achilles.node.client import NodeProtocol
    from achilles.server.service import ServerConnection

    assert set(ServerConnection.handlers) == (wire.inbound("server", "node")
                                              | wire.inbound("server", "controller"))
    assert set(NodeProtocol.handlers) == wire.inbound("node", "server")
    assert set(ControllerProtocol.handlers) == wire.inbound("controller", "server")


def test_handler_for_a_message_the_role_never_receives_is_refused():
    """Declaring a handler for a message that is never sent to that role fails at class
    creation, so a handler table cannot drift from the registry."""
    from achilles.core.protocol import PeerSideProtocol, handles

    with pytest.raises(TypeError, match="SUBMIT"):
        class Confused(PeerSideProtocol):
            local_role = "node"

            @handles(wire.SUBMIT)
            def submit(self, *fields):
                pass


# --- fuzzing ----------------------------------------------------------------------------------

def _valid_stream():
    body = st.binary(max_size=wire.PREAUTH_MAX_FRAME)
    code = st.sampled_from(sorted(wire.PREAUTH_CODES))
    return st.lists(st.tuples(code, body), max_size=6).map(
        lambda fs: b"".join(wire.frame(c, b) for c, b in fs))


@st.composite
def _mutated_stream(draw):
    data = bytearray(draw(_valid_stream()))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        if kind == "insert" or not data:
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "flip":
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            pos = draw(st.integers(0, len(data) - 1))
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        else:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def _pieces(draw):
    data = draw(st.one_of(st.binary(max_size=2048), _mutated_stream()))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0] + cuts + [len(data)]
    return data, [data[a:b] for a, b in zip(bounds, bounds[1:])]


# 3,000 examples took 100 s at load 12 (2 cores): more than the module's 60 s.
@pytest.mark.timeout(300)
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_pieces())
def test_fuzz_preauth_decoder(case):
    """Random and mutated input to a pre-auth FrameDecoder only ever raises ProtocolError,
    always terminates, never returns an oversized or disallowed frame, and the frames it
    does return are exactly the leading bytes of the input."""
    data, pieces = case
    decoder = wire.FrameDecoder()
    got = []
    failed = False
    for piece in pieces:
        try:
            decoder.feed(piece)
            # every frame consumes at least a header, so this bound can only be hit by a hang
            for _ in range(len(data) // wire.HEADER.size + 2):
                item = decoder.next_frame()
                if item is None:
                    break
                got.append(item)
            else:
                pytest.fail("next_frame kept returning frames beyond the input size")
        except ProtocolError:
            failed = True
            break
    for code, body in got:
        assert code in wire.PREAUTH_CODES
        assert len(body) <= wire.PREAUTH_MAX_FRAME
    consumed = b"".join(wire.frame(c, b) for c, b in got)
    assert data.startswith(consumed)
    if failed:
        with pytest.raises(ProtocolError):
            decoder.next_frame()
        with pytest.raises(ProtocolError):
            decoder.feed(b"")
    else:
        assert decoder.buffered == len(data) - len(consumed)
        assert decoder.buffered < wire.HEADER.size + wire.PREAUTH_MAX_FRAME


def test_batch_round_trip_keeps_order_and_payloads():
    """A BATCH carries several messages in order; each decodes to its own fields, payloads
    included, from views of the one body."""
    messages = [wire.encode_message(wire.PING, (1,)),
                wire.encode_message(wire.TASK, ("j" * 32, 7, False, None, b"payload")),
                wire.encode_message(wire.PONG, (2,))]
    pieces = wire.encode_batch(messages)
    body = b"".join(pieces[1:])
    assert wire.HEADER.unpack(pieces[0]) == (wire.BATCH, len(body))
    (inner,) = wire.decode_message(body, wire.BATCH)
    split = wire.split_batch(inner)
    assert [code for code, _ in split] == [wire.PING, wire.TASK, wire.PONG]
    decoded = [wire.decode_message(b, c) for c, b in split]
    assert decoded[0] == (1,) and decoded[2] == (2,)
    assert decoded[1][:4] == ("j" * 32, 7, False, None) and bytes(decoded[1][4]) == b"payload"


@pytest.mark.parametrize("case", ["nested", "cut-header", "overrun"])
def test_malformed_batch_is_refused(case):
    """A BATCH inside a BATCH, a message header cut short, or a message longer than what is
    left of the BATCH raises ProtocolError."""
    ping = b"".join(wire.encode_message(wire.PING, (1,)))
    inner = {"nested": b"".join(wire.encode_batch([wire.encode_message(wire.PING, (1,))])),
             "cut-header": ping + ping[:3],
             "overrun": ping + wire.HEADER.pack(wire.PING, 1000) + b"x"}[case]
    with pytest.raises(ProtocolError, match="malformed BATCH"):
        wire.split_batch(inner)
