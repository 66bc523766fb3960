"""The node's non-blocking reader of worker pipes (node/pipeio.py), on a real socket pair:
messages of every size, cut anywhere by the writer, arrive whole and in order."""

from __future__ import annotations

import os
import random
import socket

import pytest

from achilles.node.pipeio import READ_SIZE, FrameReader, frame

pytestmark = pytest.mark.timeout(60)


def _pair():
    parent, child = socket.socketpair()
    parent.setblocking(False)
    return parent, child


def test_messages_cut_anywhere_arrive_whole_and_in_order() -> None:
    """Messages from empty to several times a read's size, written in random fragments
    while the reader reads whatever has come, are returned whole, in order, once each."""
    rng = random.Random(1234)
    sizes = [0, 1, 3, 4, 5, 100, READ_SIZE - 4, READ_SIZE, READ_SIZE + 1, 3 * READ_SIZE + 7]
    sizes += [rng.randrange(0, 2 * READ_SIZE) for _ in range(40)]
    messages = [os.urandom(n) for n in sizes]
    stream = b"".join(b"".join(bytes(p) for p in frame(m)) for m in messages)
    parent, child = _pair()
    child.setblocking(False)
    reader = FrameReader()
    got = []
    try:
        sent = 0
        while sent < len(stream):
            step = rng.choice([1, 2, 5, 64, 4096, 70000, 300000])
            try:
                sent += child.send(stream[sent:sent + step])
            except BlockingIOError:
                pass  # the pipe is full: the reader makes room
            out, eof = reader.read(parent.fileno(), drain=rng.random() < 0.5)
            got += [bytes(m) for m in out]
            assert not eof
        child.close()
        while True:
            out, eof = reader.read(parent.fileno(), drain=True)
            got += [bytes(m) for m in out]
            if eof:
                break
    finally:
        parent.close()
    assert [len(m) for m in got] == sizes
    assert got == messages


def test_end_of_file_inside_a_message_gives_no_partial_message() -> None:
    """A writer that dies halfway through a message: the reader returns the whole messages
    before it and then end of file, never the broken one."""
    parent, child = _pair()
    whole = os.urandom(1000)
    broken = b"".join(bytes(p) for p in frame(os.urandom(2 * READ_SIZE)))
    child.sendall(b"".join(bytes(p) for p in frame(whole)) + broken[:5000])
    child.close()
    reader = FrameReader()
    got, eof = [], False
    try:
        while not eof:
            out, eof = reader.read(parent.fileno(), drain=True)
            got += [bytes(m) for m in out]
    finally:
        parent.close()
    assert got == [whole]


def test_a_read_with_nothing_there_returns_nothing() -> None:
    """With no bytes waiting, a read returns no message and no end of file (it never blocks)."""
    parent, child = _pair()
    try:
        assert FrameReader().read(parent.fileno()) == ([], False)
    finally:
        parent.close()
        child.close()
