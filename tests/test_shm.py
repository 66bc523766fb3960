"""Same-host bulk data through shared memory (achilles.core.shm): segments checked before
anything is unpickled, the per-hop decision (a reference only to a peer that proved the
probe, bytes to any other), and the lifetime rules (nothing left behind, even when a node is
killed)."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import subprocess
import sys
from typing import Any, Iterator, List

import pytest

from achilles.controller.cluster import Cluster
from achilles.controller.segments import Segments
from achilles.core import shm
from achilles.core.config import Config
from achilles.core.serialization import dumps_data
from conftest import MarkerPickle, wait_for
from shm_tasks import (
    big_result, data_size, holding_generator, holding_lambda, rotate, slow_rotate,
)

pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(32))
SIZE = 300 << 10  # over the default 256 KiB threshold


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    """A private shared-memory directory for this test's processes (ACHILLES_SHM_DIR), so
    what they leave behind can be counted."""
    path = tmp_path / "shm"
    path.mkdir()
    monkeypatch.setenv("ACHILLES_SHM_DIR", str(path))
    return path


def owners(path) -> List[int]:
    """The owner pid of every segment in ``path``."""
    return [int(name.split("-")[2]) for name in os.listdir(path) if name.startswith("achilles-")]


def left_behind(path, server_pid: int) -> List[str]:
    """Segments in ``path`` other than the server's probe."""
    return [name for name in os.listdir(path)
            if not name.startswith(f"achilles-{shm._NS}-{server_pid}-")]


def wait_shared(cluster: Cluster) -> None:
    """Wait until the controller's connection proved it shares the server's memory."""
    wait_for(lambda: cluster.shared_memory() is not None, what="the controller's probe answer")


def node_shm(cluster: Cluster) -> List[dict]:
    """Each node's shared-memory figures from the server's status."""
    return [n["shm"] for n in cluster.status()["nodes"]]


def corrupt(path: str, ref: bytes, offset_from_end: int = 100) -> None:
    """Flip one byte of the segment ``ref`` names, after it was written."""
    full = os.path.join(path, shm.parse(ref).name)
    with open(full, "r+b") as fh:
        fh.seek(-offset_from_end, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-offset_from_end, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))


def alter_after_writing(patch: pytest.MonkeyPatch) -> None:
    """Make this process's ``Segments.write`` and ``Segments.dump`` flip a byte of every
    segment right after writing it (``patch`` undoes it)."""
    real_write, real_dump = Segments.write, Segments.dump

    def write_then_alter(self, payload):
        ref = real_write(self, payload)
        if ref is not None:
            corrupt(self.path, ref)
        return ref

    def dump_then_alter(self, obj):
        ref = real_dump(self, obj)
        if ref is not None:
            corrupt(self.path, ref)
        return ref

    patch.setattr(Segments, "write", write_then_alter)
    patch.setattr(Segments, "dump", dump_then_alter)


# --- segments on their own --------------------------------------------------------------------
def test_segment_round_trip_and_refusals(tmp_path):
    """A segment reads back exactly what was written (also into a reused buffer, also when
    pickled straight into it), is created 0600; a segment altered, resized, replaced, removed
    or read under another key is refused with ShmError and nothing in it is unpickled."""
    path = str(tmp_path)
    data = os.urandom(SIZE)
    ref = shm.write(path, KEY, data, shm.new_name(os.getpid()))
    name = shm.parse(ref).name
    assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o600
    assert bytes(shm.read(path, KEY, ref)) == data
    buffer = shm.ReadBuffer()
    assert bytes(shm.read(path, KEY, ref, buffer)) == data
    other = shm.write(path, KEY, data[::-1], shm.new_name(os.getpid()))
    assert bytes(shm.read(path, KEY, other, buffer)) == data[::-1]
    dumped = shm.dump(path, KEY, [data, 7], shm.new_name(os.getpid()))
    assert pickle.loads(shm.read(path, KEY, dumped)) == [data, 7]

    with pytest.raises(shm.ShmError, match="integrity"):
        shm.read(path, bytes(32), ref)  # another cluster's key

    marker = tmp_path / "unpickled"
    evil = shm.write(path, KEY, dumps_data([MarkerPickle(str(marker)), b"p" * SIZE]),
                     shm.new_name(os.getpid()))
    corrupt(path, evil)
    with pytest.raises(shm.ShmError, match="integrity check"):
        shm.read(path, KEY, evil)
    assert not marker.exists()

    with open(os.path.join(path, name), "ab") as fh:
        fh.write(b"x")
    with pytest.raises(shm.ShmError, match="not the one that was written"):
        shm.read(path, KEY, ref)
    os.unlink(os.path.join(path, name))
    with pytest.raises(shm.ShmError, match="cannot be opened"):
        shm.read(path, KEY, ref)
    with open(os.path.join(path, name), "wb") as fh:  # same name and size, other content
        fh.write(os.urandom(SIZE))
    with pytest.raises(shm.ShmError, match="integrity check"):
        shm.read(path, KEY, ref)
    with pytest.raises(shm.ShmError, match="malformed"):
        shm.read(path, KEY, shm.MAGIC + b"\x00" * 40 + b"../../etc/passwd")


def test_write_never_reuses_a_name(tmp_path):
    """A segment is created with O_EXCL: a name that exists (a file planted there) is
    never opened for writing."""
    name = shm.new_name(os.getpid())
    (tmp_path / name).write_bytes(b"planted")
    with pytest.raises(FileExistsError):
        shm.write(str(tmp_path), KEY, b"data", name)
    assert (tmp_path / name).read_bytes() == b"planted"


def test_sweep_removes_only_segments_of_dead_processes(tmp_path):
    """sweep removes segments whose owner process is gone and keeps those of a live one
    (and files that are not segments)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = shm.write(str(tmp_path), KEY, b"a", shm.new_name(dead.pid))
    mine = shm.write(str(tmp_path), KEY, b"b", shm.new_name(os.getpid()))
    (tmp_path / "achilles-notasegment").write_bytes(b"c")
    assert shm.sweep(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([shm.parse(mine).name,
                                                    "achilles-notasegment"])
    assert shm.parse(gone).name not in os.listdir(tmp_path)


def test_controller_result_refused_when_altered(tmp_path):
    """The controller's end reads a result segment only if its tag holds (ShmError
    otherwise), and unlinks it either way; results of a job nobody reads any more are
    unlinked when the job is forgotten."""
    side = Segments(str(tmp_path), KEY, 1)
    good = shm.write(str(tmp_path), KEY, b"r" * 1000, shm.new_name(os.getpid()))
    bad = shm.write(str(tmp_path), KEY, b"s" * 1000, shm.new_name(os.getpid()))
    unread = shm.write(str(tmp_path), KEY, b"t" * 1000, shm.new_name(os.getpid()))
    for ref in (good, bad, unread):
        side.arrived("job", ref)
    corrupt(str(tmp_path), bad)
    assert bytes(side.take("job", good)) == b"r" * 1000
    with pytest.raises(shm.ShmError, match="integrity"):
        side.take("job", bad)
    assert side.unread() == 1
    side.forget("job")
    assert os.listdir(tmp_path) == []


# --- real clusters ------------------------------------------------------------------------------
def test_large_map_goes_through_shared_memory_and_leaves_nothing(make_cluster, shm_dir):
    """Large map arguments and results between a controller, server and node of one host
    travel as segments (the server's status counts them), every result is right and in
    order, and once the call returns only the server's probe is left; once the cluster
    stops, nothing is."""
    lc = make_cluster(nodes=1, processes=2)
    cluster = lc.cluster
    wait_shared(cluster)
    blobs = [os.urandom(SIZE) for _ in range(12)]
    assert cluster.map(rotate, blobs, chunksize=1) == [rotate(b) for b in blobs]
    pairs = [(i, os.urandom(SIZE)) for i in range(6)]  # pickled first, then written
    assert sorted(cluster.imap_unordered(data_size, pairs, chunksize=1)) == [SIZE] * 6
    [figures] = node_shm(cluster)
    assert figures["shared"] and figures["tasks"] >= 18 and figures["results"] >= 12
    assert left_behind(shm_dir, lc.server.pid) == []
    lc.stop()
    assert os.listdir(shm_dir) == []


def test_results_the_c_pickler_refuses_come_back_or_fail_clearly(make_cluster, shm_dir):
    """A result that looks large (so the worker tries to pickle it straight into a segment)
    but that the C pickler refuses still comes back (through dill); one that nothing can
    pickle fails the call with the pickling error; no segment is left either way."""
    lc = make_cluster(nodes=1, processes=1)
    cluster = lc.cluster
    wait_shared(cluster)
    out = cluster.map(holding_lambda, [1, 2], chunksize=1)
    assert [h.what() for h in out] == [1, 2]
    with pytest.raises(TypeError, match="pickle") as raised:
        cluster.map(holding_generator, [1], chunksize=1)
    assert any("cannot be pickled" in note for note in getattr(raised.value, "__notes__", []))
    assert left_behind(shm_dir, lc.server.pid) == []


def test_node_killed_mid_job_loses_nothing_and_leaves_nothing(make_cluster, shm_dir):
    """A node killed (SIGKILL) while it holds chunks of a shared-memory job: the job still
    returns every result exactly once, in order (the argument segments outlive the re-runs),
    and the server sweeps what the dead node owned, so once the job is done only the probe
    is left."""
    lc = make_cluster(nodes=2, processes=1)
    cluster = lc.cluster
    wait_shared(cluster)
    victim = lc.nodes[0]
    planted = shm.write(str(shm_dir), KEY, b"left by the node", shm.new_name(victim.pid))
    items = [(i, os.urandom(SIZE), 0.2) for i in range(12)]
    results = cluster.imap(slow_rotate, items, chunksize=1)
    out = [next(results)]
    os.killpg(victim.pid, signal.SIGKILL)
    out.extend(results)
    assert out == [(i, rotate(data)) for i, data, _ in items]
    wait_for(lambda: shm.parse(planted).name not in os.listdir(shm_dir),
             what="the server to sweep the dead node's segment")
    wait_for(lambda: left_behind(shm_dir, lc.server.pid) == [], what="the dead node's segments "
             f"to be swept (left: {left_behind(shm_dir, lc.server.pid)})")


def test_server_killed_mid_job_resumes_with_bytes_and_leaves_nothing(make_cluster, shm_dir):
    """The server killed (SIGKILL) while a shared-memory job runs: the controller resubmits
    its unanswered chunks (read back from its own segments, as bytes until the new server's
    probe is proven), every result arrives once and in order, and once the cluster stops the
    dead server's probe and every other segment are gone."""
    lc = make_cluster(nodes=1, processes=1)
    cluster = lc.cluster
    wait_shared(cluster)
    items = [(i, os.urandom(SIZE), 0.1) for i in range(10)]
    results = cluster.imap(slow_rotate, items, chunksize=1)
    out = [next(results)]
    lc.restart_server()
    out.extend(results)
    assert out == [(i, rotate(data)) for i, data, _ in items]
    lc.stop()
    assert os.listdir(shm_dir) == []


def test_altered_argument_segment_fails_the_chunk_unpickled(make_cluster, shm_dir, tmp_path,
                                                            monkeypatch):
    """An argument segment altered after the controller wrote it is refused by the worker
    before anything in it is unpickled: the call raises ShmError (no hang), nothing is
    left behind, and the next call works."""
    lc = make_cluster(nodes=1, processes=1)
    cluster = lc.cluster
    wait_shared(cluster)
    marker = tmp_path / "unpickled"
    with monkeypatch.context() as patch:
        alter_after_writing(patch)
        with pytest.raises(shm.ShmError, match="integrity check"):
            cluster.map(data_size, [(MarkerPickle(str(marker)), b"p" * SIZE)], chunksize=1)
    assert not marker.exists()
    blobs = [os.urandom(SIZE) for _ in range(3)]
    assert cluster.map(rotate, blobs, chunksize=1) == [rotate(b) for b in blobs]
    wait_for(lambda: left_behind(shm_dir, lc.server.pid) == [], what="no segment left")


def test_altered_result_segment_is_refused_by_the_controller(make_cluster, shm_dir,
                                                              monkeypatch):
    """A result segment altered after the worker wrote it is refused by the controller
    (ShmError from the call, before anything is unpickled) and unlinked."""
    lc = make_cluster(nodes=1, processes=1)
    cluster = lc.cluster
    wait_shared(cluster)
    real_arrived = Segments.arrived

    def alter_then_arrive(self, job_id, ref):
        corrupt(self.path, ref)
        real_arrived(self, job_id, ref)

    monkeypatch.setattr(Segments, "arrived", alter_then_arrive)
    with pytest.raises(shm.ShmError, match="integrity check"):
        cluster.map(rotate, [os.urandom(SIZE)], chunksize=1)
    wait_for(lambda: left_behind(shm_dir, lc.server.pid) == [], what="no segment left")


@contextlib.contextmanager
def node_elsewhere(daemons: Any, secret: str, tmp_path: Any, monkeypatch: Any,
                   *node_args: str) -> Iterator[Cluster]:
    """A server and a controller whose shared memory is ``tmp_path/here`` and one node (started
    with ``node_args``) looking in ``tmp_path/elsewhere``, as a node on another host would;
    yields the controller once the node joined and the controller proved it shares memory."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("ACHILLES_SHM_DIR", str(here))
    port = daemons.server(secret)
    monkeypatch.setenv("ACHILLES_SHM_DIR", str(elsewhere))
    daemons.start("node", "--host", "127.0.0.1", "--port", str(port), *node_args, secret=secret)
    monkeypatch.setenv("ACHILLES_SHM_DIR", str(here))
    cluster = Cluster(Config(host="127.0.0.1", port=port, username="tester", secret_key=secret))
    try:
        wait_for(lambda: len(cluster.status()["nodes"]) == 1, what="the node")
        wait_shared(cluster)
        yield cluster
    finally:
        cluster.close()


def test_node_that_fails_the_probe_gets_bytes(daemons, secret, tmp_path, monkeypatch):
    """A node that cannot read the server's probe (it looks in another directory, as a node
    on another host would) is sent bytes, never references, and sends bytes back: results
    are right, and the proven controller's segments are all gone afterwards."""
    with node_elsewhere(daemons, secret, tmp_path, monkeypatch, "--processes", "2") as cluster:
        blobs = [os.urandom(SIZE) for _ in range(6)]
        assert cluster.map(rotate, blobs, chunksize=1) == [rotate(b) for b in blobs]
        assert node_shm(cluster) == [{"shared": False, "tasks": 0, "results": 0}]
        assert os.listdir(tmp_path / "elsewhere") == []
        assert len(os.listdir(tmp_path / "here")) == 1  # the probe


def test_unreadable_segment_for_a_node_elsewhere_fails_with_the_servers_reason(
        daemons, secret, tmp_path, monkeypatch):
    """When the server must send a chunk's bytes to a node that does not share its memory and
    cannot read the chunk's segment (altered after the controller wrote it), the call raises
    ShmError saying so (the server could not read it, for which node, why) instead of the
    node's worker reporting a reference it should never have got; the cluster keeps serving."""
    with node_elsewhere(daemons, secret, tmp_path, monkeypatch, "--processes", "1",
                        "--name", "faraway") as cluster:
        with monkeypatch.context() as patch:
            alter_after_writing(patch)
            with pytest.raises(shm.ShmError) as raised:
                cluster.map(rotate, [os.urandom(SIZE)], chunksize=1)
        message = str(raised.value)
        assert "server could not read" in message and "node faraway" in message
        assert "integrity check" in message
        blobs = [os.urandom(SIZE) for _ in range(2)]
        assert cluster.map(rotate, blobs, chunksize=1) == [rotate(b) for b in blobs]


def test_controller_without_shared_memory_gets_bytes(make_cluster, shm_dir):
    """A controller with shared memory off (ACHILLES_SHM_DIR=off for it alone) sends bytes,
    and the server turns a proven node's result references into bytes for it (unlinking
    them): results are right and no segment is left."""
    lc = make_cluster(nodes=1, processes=2)
    wait_shared(lc.cluster)
    other = Cluster(Config(host="127.0.0.1", port=lc.port, username="local",
                           secret_key=lc._secret, shm_dir="off"))
    try:
        assert other.segments is None
        out = other.map(big_result, [SIZE] * 6, chunksize=1)
        assert [len(r) for r in out] == [SIZE] * 6
        [figures] = node_shm(other)
        assert figures["shared"] and figures["results"] >= 6
        assert left_behind(shm_dir, lc.server.pid) == []
    finally:
        other.close()


def test_full_shared_memory_falls_back_to_bytes(make_cluster, shm_dir, monkeypatch):
    """When a segment cannot be written (shared memory full), the controller sends the
    chunk's bytes in the frame instead: results are right, no argument went as a segment."""
    lc = make_cluster(nodes=1, processes=1)
    cluster = lc.cluster
    wait_shared(cluster)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shm, "write", full)
    monkeypatch.setattr(shm, "dump", full)
    blobs = [os.urandom(SIZE) for _ in range(4)]
    assert cluster.map(rotate, blobs, chunksize=1) == [rotate(b) for b in blobs]
    [figures] = node_shm(cluster)
    assert figures["shared"] and figures["tasks"] == 0
    assert left_behind(shm_dir, lc.server.pid) == []


def test_shared_memory_off(make_cluster, monkeypatch):
    """ACHILLES_SHM_DIR=off on every process: no probe, no segment, every payload in
    frames, and large maps still round-trip."""
    monkeypatch.setenv("ACHILLES_SHM_DIR", "off")
    lc = make_cluster(nodes=1, processes=2)
    cluster = lc.cluster
    assert cluster.segments is None
    blobs = [os.urandom(SIZE) for _ in range(6)]
    assert cluster.map(rotate, blobs, chunksize=1) == [rotate(b) for b in blobs]
    assert node_shm(cluster) == [{"shared": False, "tasks": 0, "results": 0}]
