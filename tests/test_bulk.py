"""The bulk-data path: large frames tagged piecewise, decoded without copies, written straight
to the socket, and large worker-pipe messages read into one buffer; all must deliver the same
bytes, in order, as the plain path."""

from __future__ import annotations

import os
import random

import multiprocess
import pytest

from achilles.core import wire
from achilles.core.errors import ProtocolError
from achilles.core.session import PIECEWISE, FrameOpener, FrameSealer
from achilles.node.malloc import keep_freed_memory
from achilles.node.pipeio import recv_buffer

pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(32))


def _sealed_stream(payload_sizes, seed=0):
    """Sealed CHUNK frames with random payloads of the given sizes: (stream, payloads)."""
    rng = random.Random(seed)
    sealer = FrameSealer(KEY)
    pieces, payloads = [], []
    for n, size in enumerate(payload_sizes):
        payload = rng.randbytes(size)
        payloads.append(payload)
        # a memoryview payload, as the server relays it
        message = wire.encode_message(wire.CHUNK, ("job", n, 1, memoryview(payload)))
        pieces += [bytes(p) for p in sealer.seal(message)]
    return b"".join(pieces), payloads


def _decode_all(stream, cuts):
    decoder = wire.FrameDecoder()
    decoder.set_limit(wire.DEFAULT_MAX_FRAME, wire.POSTAUTH_CODES, FrameOpener(KEY))
    got, start = [], 0
    for cut in list(cuts) + [len(stream)]:
        for code, body in decoder.frames(stream[start:cut]):
            fields = wire.decode_message(body, code)
            got.append((fields[1], bytes(fields[-1])))
        start = cut
    assert decoder.buffered == 0
    return got


def test_large_and_small_sealed_frames_decode_at_any_split():
    """Sealed frames below, at and above the large-frame and piecewise-tag sizes, sent one
    after the other, decode to the same payloads in order however the stream is cut up (one
    read, 64 KiB reads, random reads, cuts right around each frame boundary)."""
    sizes = [10, wire.LARGE_FRAME - 40, wire.LARGE_FRAME, 3, PIECEWISE, 1 << 20, 5, 3 << 20, 7]
    stream, payloads = _sealed_stream(sizes)
    expected = list(enumerate(payloads))
    assert _decode_all(stream, []) == expected
    assert _decode_all(stream, range(65536, len(stream), 65536)) == expected
    rng = random.Random(1)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(stream)), 40))
        assert _decode_all(stream, cuts) == expected
    boundaries, offset = [], 0
    sealer = FrameSealer(KEY)
    for n, size in enumerate(sizes):
        offset += sum(len(p) for p in sealer.seal(
            wire.encode_message(wire.CHUNK, ("job", n, 1, payloads[n]))))
        boundaries += [offset - 1, offset, offset + 1]
    cuts = sorted({c for c in boundaries if 0 < c < len(stream)})
    assert _decode_all(stream, cuts) == expected


@pytest.mark.parametrize("size", [wire.LARGE_FRAME, PIECEWISE, 2 << 20])
def test_altered_large_frame_is_refused(size):
    """One flipped byte in the payload of a large frame (tagged piecewise or in one go) fails
    its tag check, whether it arrives in one read or in pieces."""
    stream, _ = _sealed_stream([size])
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 1
    for cuts in ([], range(65536, len(bad), 65536)):
        with pytest.raises(ProtocolError, match="failed authentication"):
            _decode_all(bytes(bad), cuts)


def test_piecewise_tag_equals_one_shot_tag():
    """A frame over the piecewise size gets the tag a one-shot GMAC over the joined frame
    gives (so receivers need not know how it was tagged)."""
    payload = os.urandom(PIECEWISE + 5)
    message = wire.encode_message(wire.CHUNK, ("job", 0, 1, payload))
    piecewise = FrameSealer(KEY).seal(message)
    assert len(piecewise) > 2  # tagged piece by piece, not joined
    joined = b"".join(bytes(p) for p in piecewise[:-1])
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert AESGCM(KEY).encrypt((0).to_bytes(12, "big"), b"", joined) == piecewise[-1]


def _send_all(conn, sizes):
    for size in sizes:
        conn.send_bytes(bytes([size % 251]) * size)
    conn.close()


def test_recv_buffer_reads_what_send_bytes_wrote():
    """recv_buffer reads messages that multiprocess's send_bytes wrote (empty, small, larger
    than the socket buffer), whole and in order, then EOFError when the writer is gone."""
    sizes = [0, 1, 70_000, 3 << 20, 5]
    ctx = multiprocess.get_context("fork")
    reader, writer = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_send_all, args=(writer, sizes))
    proc.start()
    writer.close()
    try:
        for size in sizes:
            assert recv_buffer(reader) == bytes([size % 251]) * size
        with pytest.raises(EOFError):
            recv_buffer(reader)
    finally:
        proc.join(10)
        reader.close()


def test_recv_buffer_refuses_a_cut_message():
    """A message whose writer dies halfway is an OSError, not a short message."""
    ctx = multiprocess.get_context("fork")
    reader, writer = ctx.Pipe(duplex=True)
    os.write(writer.fileno(), (1000).to_bytes(4, "big") + b"x" * 10)
    writer.close()
    with pytest.raises(OSError, match="end of file"):
        recv_buffer(reader)
    reader.close()


def test_keep_freed_memory_is_accepted_by_glibc():
    """On glibc the allocator accepts the raised mmap and trim thresholds."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory()


def _rotate(data: bytes) -> bytes:
    return data[1:] + data[:1]


def test_large_payloads_round_trip_through_a_cluster(make_cluster):
    """Payloads around and well above the direct-write and socket-buffer sizes, mixed with
    small ones, go controller -> server -> node -> worker and back intact and in order."""
    rng = random.Random(5)
    blobs = [rng.randbytes(n) for n in (1, 1 << 17, 5, 1 << 20, 6 << 20, 300_000, 2, 1 << 20)]
    lc = make_cluster(nodes=1, processes=2)
    for chunksize in (1, 3):
        assert lc.cluster.map(_rotate, blobs, chunksize=chunksize) == [_rotate(b) for b in blobs]
