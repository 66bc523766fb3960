"""Races around a crashed chunk's life, each pinned down deterministically.

The hang of issue #8 (9a): ``test_worker_crash_is_retried`` waited for ever although the
server had finished the job. A crash and its retry shift the order in which RESULT and WANT
reach the controller; when every chunk was answered *before* a late WANT let the controller
read past the end of its input, ``JobRun.chunks`` sent END and then blocked on its event
queue, for a message the server never sends.
"""

from __future__ import annotations

import queue

import pytest

from achilles import wire
from achilles.controller.job import JobRun
from achilles.serialization import dumps_data
from tasks import square

pytestmark = pytest.mark.timeout(60)


class ServerScript:
    """Stands in for the controller's link so that the server's messages can be delivered in
    an exact order (no real server can be made to interleave them on demand). It records what
    the JobRun sends, and its event queue fails instead of blocking when nothing is queued."""

    def __init__(self) -> None:
        self.sent: list = []

    def register(self, job_id: str, q: "queue.Queue[tuple]") -> int:
        return 1

    def unregister(self, job_id: str) -> None:
        pass

    def send(self, messages: list) -> None:
        for pieces in messages:
            data = b"".join(pieces)
            code, _ = wire.HEADER.unpack_from(data, 0)
            self.sent.append((code, wire.decode_message(data[wire.HEADER.size:], code)))

    def of(self, code: int) -> list:
        return [fields for c, fields in self.sent if c == code]


class NoWait(queue.Queue):
    """An event queue whose ``get`` fails at once when empty: waiting there would be a hang."""

    def get(self, block: bool = True, timeout: float = None):
        if self.empty():
            raise AssertionError("JobRun waits for a server message that will never come")
        return super().get(block=False)


def result(cid: int, values: list) -> tuple:
    """A RESULT event as ControllerProtocol queues it."""
    return ("result", cid, wire.OK, dumps_data(values), 0.01, "n")


@pytest.mark.parametrize("ordered", [True, False], ids=["map", "imap_unordered"])
def test_input_end_found_after_last_result_does_not_hang(ordered):
    """Every chunk is answered before the WANT that lets the controller read past the end of
    its input: the run sends END and returns its results instead of waiting for ever."""
    link = ServerScript()
    run = JobRun(link, square, range(20), 10, None, ordered)
    assert [f[1] for f in link.of(wire.CHUNK)] == [0, 1]  # the initial credit is spent
    assert not run.exhausted and not link.of(wire.END)
    run.events = NoWait()
    run.events.put(result(1, [x * x for x in range(10, 20)]))  # the retried chunk 0 comes last
    run.events.put(result(0, [x * x for x in range(10)]))
    run.events.put(("want", 2, 2, 4))  # sent by the server after chunk 0's retry was queued
    out = [x for values in run.chunks() for x in values]
    assert sorted(out) == [x * x for x in range(20)]
    if ordered:
        assert out == [x * x for x in range(20)]
    assert [f[1] for f in link.of(wire.END)] == [2]
    assert not link.of(wire.CANCEL), "a finished job must not be cancelled"
