"""The frame limit (ACHILLES_MAX_FRAME) on a real cluster: a chunk or a result over it fails
on the side that would send it, with an error naming the setting, and the cluster goes on."""

from __future__ import annotations

import pytest

from achilles.core.errors import FrameTooLarge
from tasks import blob

pytestmark = pytest.mark.timeout(120)

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def small_frames():
    from achilles.local import LocalCluster

    with LocalCluster(nodes=1, processes=1, max_frame=LIMIT) as cluster:
        yield cluster


def test_oversized_chunk_fails_in_the_caller(small_frames):
    """A chunk of input over the limit raises FrameTooLarge in the caller before it is sent,
    naming ACHILLES_MAX_FRAME; the cluster keeps working."""
    with pytest.raises(FrameTooLarge, match="ACHILLES_MAX_FRAME"):
        small_frames.map(len, [b"x" * (2 * LIMIT)])
    assert small_frames.map(len, [b"x" * 10, b"y"]) == [10, 1]


def test_oversized_result_fails_for_its_caller(small_frames):
    """A result over the limit is turned into FrameTooLarge on the node and raised in the
    caller (the node's connection stays up, nothing hangs)."""
    with pytest.raises(FrameTooLarge, match="ACHILLES_MAX_FRAME"):
        small_frames.map(blob, [2 * LIMIT], chunksize=1)
    assert small_frames.map(blob, [3, 1]) == [b"xxx", b"x"]
    assert len(small_frames.status()["nodes"]) == 1


def test_oversized_graph_result_fails_for_its_caller(small_frames):
    """The same for a call-graph task: its too-large value raises FrameTooLarge."""
    with pytest.raises(FrameTooLarge, match="ACHILLES_MAX_FRAME"):
        small_frames.submit(blob, 2 * LIMIT).result(timeout=60)
    assert small_frames.submit(blob, 2).result(timeout=60) == b"xx"
