"""Task output reaches the caller: what tasks print and log on the nodes is printed by the
controller that owns the job (prefixed with node and item or task), bounded by the nodes' rate
limit, attached to failures, kept by the server for the dashboard, and can be turned off."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

import achilles
from achilles import TaskTimeout, WorkerCrashed, task
from achilles.core import defaults, wire
from achilles.core.config import load_config
from achilles.core.errors import ConfigError, ProtocolError
from achilles.core.output import BURST, RATE, TAIL_LINES, decode_lines, encode_lines
from achilles.server.scheduler import Scheduler
from conftest import wait_for
from output_tasks import (chatty, flood, flood_then_fail, last_words_then_die, odd_writers,
                          steps_then_fail, tagged)
from tasks import TaskFailure, pause

pytestmark = pytest.mark.timeout(120)

TESTS = os.path.dirname(os.path.abspath(__file__))
PREFIX = re.compile(r"^\((local-\d+) (item \d+|chunk \d+|task [^)]*)\) (.*)$")


def prefixed(text: str):
    """``[(node, where, text)]`` for every forwarded line in captured output."""
    return [m.groups() for m in map(PREFIX.match, text.splitlines()) if m]


def dropped_counts(text: str):
    """The counts of every 'lines dropped' notice in captured output."""
    return [int(n) for n in re.findall(r"\[achilles: (\d+) more line\(s\) of output dropped",
                                       text)]


@task
def chatty_task(x):
    print(f"task out {x}")
    return x


@task(timeout=1.0)
def announce_then_hang():
    print("starting the long part", flush=True)
    pause(60)


# --- reaching the caller ----------------------------------------------------------------------

def test_print_stderr_and_logging_reach_the_caller_with_node_and_item(cluster, capfd):
    """Each item's print() goes to the caller's stdout, its stderr and its WARNING log record
    to the caller's stderr, each line prefixed with the node and the item's input index."""
    assert cluster.map(chatty, range(6), chunksize=2) == list(range(6))
    out, err = capfd.readouterr()
    assert sorted((w, t) for _, w, t in prefixed(out)) == sorted(
        (f"item {i}", f"out {i}") for i in range(6))
    err_lines = prefixed(err)
    assert sorted((w, t) for _, w, t in err_lines) == sorted(
        [(f"item {i}", f"err {i}") for i in range(6)]
        + [(f"item {i}", f"WARNING chatty: log {i}") for i in range(6)])
    assert {node for node, _, _ in err_lines} <= {"local-0", "local-1"}


def test_bytes_partial_lines_and_redrawn_lines_are_lines_too(cluster, capfd):
    """Bytes written to sys.stdout.buffer arrive as text; text without a final newline
    arrives as a line at the chunk's end; a line redrawn with carriage returns arrives as
    it was shown last."""
    assert cluster.map(odd_writers, [5]) == [5]
    out, err = capfd.readouterr()
    assert sorted(t for _, _, t in prefixed(out)) == ["bytes 5", "no newline"]
    assert [t for _, _, t in prefixed(err)] == ["bar 100%"]


def test_imap_unordered_and_graph_tasks_forward_too(cluster, capfd):
    """imap_unordered prints its items' output as it is read; a graph task's output is
    prefixed with the task's name and id."""
    assert sorted(cluster.imap_unordered(chatty, range(3))) == [0, 1, 2]
    call = chatty_task(41)
    assert cluster.compute(call) == [41]
    out, _ = capfd.readouterr()
    lines = prefixed(out)
    assert sorted(t for _, w, t in lines if w.startswith("item")) == ["out 0", "out 1", "out 2"]
    assert [(w, t) for _, w, t in lines if w.startswith("task")] == [
        (f"task chatty_task#{call.id}", "task out 41")]


def test_module_level_calls_take_forward_output(shared_cluster, capfd):
    """achilles.map and g.result() on the default cluster forward output, and take
    forward_output=False too."""
    cluster = shared_cluster.cluster
    defaults.push(cluster)
    try:
        achilles.map(chatty, [1])
        chatty_task(2).result()
        achilles.map(chatty, [3], forward_output=False)
        chatty_task(4).result(forward_output=False)
    finally:
        defaults.remove(cluster)
    out, _ = capfd.readouterr()
    assert sorted(t for _, _, t in prefixed(out)) == ["out 1", "task out 2"]


# --- the off switch ---------------------------------------------------------------------------

def test_forward_output_false_leaves_output_on_the_node(shared_cluster, capfd):
    """forward_output=False prints nothing at the caller; the tasks' stderr and log records
    go to the node's own log, as without forwarding."""
    assert shared_cluster.cluster.map(chatty, [7001, 7002], forward_output=False) == [7001, 7002]
    out, err = capfd.readouterr()
    assert not prefixed(out) and not prefixed(err)
    logs = lambda: "".join(shared_cluster.log_text(f"node-{i}") for i in range(2))  # noqa: E731
    wait_for(lambda: "err 7001" in logs() and "err 7002" in logs(), what="output in node logs")
    assert "log 7001" in logs()


def test_environment_turns_it_off_and_the_argument_back_on(make_cluster, monkeypatch, capfd):
    """ACHILLES_FORWARD_OUTPUT=0 makes forwarding off by default (LocalCluster, graphs,
    load_config); forward_output=True on a call turns it back on for that call."""
    monkeypatch.setenv("ACHILLES_FORWARD_OUTPUT", "0")
    assert load_config(secret_key="x" * 32).forward_output is False
    lc = make_cluster(nodes=1, processes=1)
    assert lc.cluster.forward_output is False
    lc.cluster.map(chatty, [1])
    lc.cluster.compute(chatty_task(2))
    assert not prefixed("\n".join(capfd.readouterr()))
    lc.cluster.map(chatty, [3], forward_output=True)
    lc.cluster.compute(chatty_task(4), forward_output=True)
    out, _ = capfd.readouterr()
    assert sorted(t for _, _, t in prefixed(out)) == ["out 3", "task out 4"]


def test_forward_output_setting_is_validated(monkeypatch):
    """ACHILLES_FORWARD_OUTPUT takes 1/0, true/false, yes/no, on/off; anything else is a
    ConfigError naming the variable."""
    for text, expect in [("1", True), ("off", False), ("No", False), ("TRUE", True)]:
        monkeypatch.setenv("ACHILLES_FORWARD_OUTPUT", text)
        assert load_config().forward_output is expect
    monkeypatch.setenv("ACHILLES_FORWARD_OUTPUT", "maybe")
    with pytest.raises(ConfigError, match="ACHILLES_FORWARD_OUTPUT"):
        load_config()


# --- bounded ----------------------------------------------------------------------------------

def test_a_flood_is_rate_limited_and_every_dropped_line_is_counted(make_cluster, capfd):
    """A task printing 100,000 lines in a tight loop: the caller gets the first lines up to
    the burst, at most the burst plus the rate for the time it ran, and the drop notices
    account for every other line. (A fresh worker, whose burst no earlier task used.)"""
    cluster = make_cluster(nodes=1, processes=1).cluster
    n = 100_000
    started = time.monotonic()
    assert cluster.map(flood, [n]) == [n]
    elapsed = time.monotonic() - started
    out, err = capfd.readouterr()
    shown = [t for _, _, t in prefixed(out) if t.startswith("flood line ")]
    dropped = sum(dropped_counts(err))
    assert len(shown) + dropped == n
    assert len(shown) <= BURST + RATE * elapsed + 1
    assert dropped > 0
    numbers = [int(t.rsplit(" ", 1)[1]) for t in shown]
    assert numbers == sorted(numbers) and numbers[:BURST] == list(range(BURST))


# --- failures ---------------------------------------------------------------------------------

def test_a_failing_item_carries_its_last_lines(cluster, capfd):
    """The exception of a failing item has the chunk's last lines of output as task_output
    and in a note, each named by its item."""
    with pytest.raises(TaskFailure) as info:
        cluster.map(steps_then_fail, range(4), chunksize=4)
    exc = info.value
    assert exc.task_output == [f"item 2 step {i}" for i in range(30 - TAIL_LINES, 30)]
    note = next(n for n in exc.__notes__ if n.startswith("last"))
    assert f"last {TAIL_LINES} line(s) of its output" in note
    assert "item 2: item 2 step 29" in note
    capfd.readouterr()


def test_the_tail_holds_the_real_last_lines_after_a_flood(cluster, capfd):
    """Lines the rate limit dropped still count for the tail: a task that floods then fails
    carries its true last lines."""
    with pytest.raises(TaskFailure) as info:
        cluster.map(flood_then_fail, [5000])
    assert info.value.task_output == [f"flood line {i}" for i in range(5000 - TAIL_LINES, 5000)]
    capfd.readouterr()


def test_a_crashed_worker_and_a_timed_out_task_carry_what_arrived(cluster, capfd):
    """A worker that dies leaves the lines it had sent on its WorkerCrashed; a graph task
    killed at its timeout leaves them on its TaskTimeout."""
    with pytest.raises(WorkerCrashed) as crashed:
        cluster.map(last_words_then_die, [5])
    assert crashed.value.task_output == ["last words of 5"]
    with pytest.raises(TaskTimeout) as timed_out:
        cluster.compute(announce_then_hang())
    assert timed_out.value.task_output == ["starting the long part"]
    assert any("starting the long part" in n for n in timed_out.value.__notes__)
    capfd.readouterr()


# --- isolation --------------------------------------------------------------------------------

CONTROLLER_B = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [os.environ["TESTS_DIR"]]
    from achilles.core.config import Config
    from achilles.controller.cluster import Cluster
    from output_tasks import tagged
    cfg = Config(host="127.0.0.1", port=int(os.environ["B_PORT"]), username="local",
                 secret_key=os.environ["B_SECRET"])
    with Cluster(cfg) as cluster:
        assert cluster.map(tagged, [("B", i) for i in range(40)]) == list(range(40))
    print("controller B done")
""")


def test_output_of_one_controllers_job_never_reaches_another(shared_cluster, capfd, tmp_path):
    """Two controllers run printing jobs on the same nodes at once: each prints all of its
    own job's lines and none of the other's."""
    env = dict(os.environ, TESTS_DIR=TESTS, B_PORT=str(shared_cluster.port),
               B_SECRET=shared_cluster._secret,
               PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS)] + sys.path))
    with open(tmp_path / "b.out", "wb") as fh:
        other = subprocess.Popen([sys.executable, "-c", CONTROLLER_B], env=env, stdout=fh,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            got = shared_cluster.cluster.map(tagged, [("A", i) for i in range(40)])
            assert other.wait(60) == 0, (tmp_path / "b.out").read_text()
        finally:
            if other.poll() is None:
                other.kill()
                other.wait(10)
    assert got == list(range(40))
    mine = [t for _, _, t in prefixed(capfd.readouterr().out)]
    theirs = [t for _, _, t in prefixed((tmp_path / "b.out").read_text())]
    assert sorted(mine) == sorted(f"marker A-{i}" for i in range(40))
    assert sorted(theirs) == sorted(f"marker B-{i}" for i in range(40))


# --- the server's part, driven directly -------------------------------------------------------

class Recorder:
    """A peer handle that records what the scheduler sends it."""

    def __init__(self) -> None:
        self.sent = []

    def send(self, code, *fields):
        self.sent.append((code,) + fields)

    def of(self, code):
        return [m for m in self.sent if m[0] == code]


def started(options=None):
    """A scheduler with two controllers and one node running chunk 0 of controller A's job."""
    sched = Scheduler(prefetch=1)
    a, b, n = Recorder(), Recorder(), Recorder()
    ctrl_a = sched.add_controller(a, "a:1")
    sched.add_controller(b, "b:1")
    node = sched.add_node(n, "n1", "n1:1", 1)
    sched.submit(ctrl_a, "job-a", "f", b"F", b"", options or {})
    sched.add_chunk(ctrl_a, "job-a", 0, 3, b"P")
    return sched, a, b, node


def test_server_relays_output_to_the_jobs_owner_only():
    """OUTPUT from the node running a chunk goes to the controller owning the job, unchanged
    and with the node's registered name; no other controller gets anything; output for a
    chunk not running on that node, or of a job with output off, is dropped."""
    sched, a, b, node = started()
    lines = encode_lines([[0, "stdout", "hi"], [1, "log", "WARNING x: y"]])
    sched.output(node, "job-a", 0, 5, lines)
    assert a.of(wire.OUTPUT) == [(wire.OUTPUT, "job-a", 0, "n1", 5, lines)]
    sched.output(node, "job-a", 1, 0, lines)  # not in flight
    sched.output(node, "job-x", 0, 0, lines)  # no such job
    assert len(a.of(wire.OUTPUT)) == 1 and not b.sent
    quiet, qa, _, qnode = started({"output": False})
    quiet.output(qnode, "job-a", 0, 0, lines)
    assert not qa.of(wire.OUTPUT)


def test_server_refuses_malformed_output():
    """Output that is not a JSON list of [item, stream, text] lines, or drops a negative
    count, is a ProtocolError (the node's connection is dropped), not relayed."""
    sched, a, _, node = started()
    for payload in (b"not json", b'{"a": 1}', b'[[0, "stdin", "x"]]', b'[["0", "stdout", "x"]]'):
        with pytest.raises(ProtocolError):
            sched.output(node, "job-a", 0, 0, payload)
    with pytest.raises(ProtocolError):
        sched.output(node, "job-a", 0, -1, encode_lines([]))
    assert not a.of(wire.OUTPUT)


def test_server_sends_a_failures_last_lines_first_and_keeps_them_on_the_chunk():
    """A failed chunk's OUTPUT_TAIL reaches its owner right before the failed RESULT (an
    empty one if no lines came, so an earlier attempt's lines never stand in); the server
    holds the lines on the chunk meanwhile, for the dashboard."""
    sched, a, _, node = started()
    tail = encode_lines([[2, "stdout", "step 1"], [2, "stderr", "boom"]])
    sched.output_tail(node, "job-a", 0, tail)
    assert node.inflight[("job-a", 0)].tail[0] == [(2, "stdout", "step 1"), (2, "stderr", "boom")]
    sched.result(node, "job-a", 0, wire.ITEM_ERROR, b"E", 0.1)
    assert [m[0] for m in a.sent][-2:] == [wire.OUTPUT_TAIL, wire.RESULT]
    assert decode_lines(a.sent[-2][4]) == [(2, "stdout", "step 1"), (2, "stderr", "boom")]
    sched.add_chunk(sched.jobs["job-a"].owner, "job-a", 1, 1, b"P")
    sched.result(node, "job-a", 1, wire.TIMED_OUT, b"T", 0.1)
    assert [m[0] for m in a.sent][-2:] == [wire.OUTPUT_TAIL, wire.RESULT]
    assert decode_lines(a.sent[-2][4]) == []
    sched.check_invariants()


def test_the_dashboard_shows_a_failures_last_lines(make_cluster, capfd):
    """The dashboard's failure list carries the last lines of a failed item's output and of
    a crashed worker's."""
    lc = make_cluster(nodes=1, processes=1)
    with pytest.raises(TaskFailure):
        lc.cluster.map(steps_then_fail, [2])
    with pytest.raises(WorkerCrashed):
        lc.cluster.map(last_words_then_die, [9])
    capfd.readouterr()

    def failures():
        with urllib.request.urlopen(lc.dashboard_url.rstrip("/") + "/api/dashboard",
                                    timeout=10) as reply:
            return json.loads(reply.read())["failures"]

    wait_for(lambda: len(failures()) >= 2, what="two failures on the dashboard")
    by_type = {f["type"].rsplit(".", 1)[-1]: f for f in failures()}
    assert by_type["TaskFailure"]["output"] == [f"item 2 step {i}"
                                                for i in range(30 - TAIL_LINES, 30)]
    assert by_type["WorkerCrashed"]["output"] == ["last words of 9"]


def test_pool_and_executor_forward_too_and_take_forward_output(shared_cluster, capfd):
    """achilles.Pool and achilles.Executor calls (one-shot and streamed) print their tasks'
    output with the prefix; forward_output=False on the pool or executor turns it off."""
    cluster = shared_cluster.cluster
    with achilles.Pool(cluster=cluster) as pool:
        assert pool.apply(chatty, (1,)) == 1
        assert list(pool.imap(chatty, [2])) == [2]
    with achilles.Executor(cluster=cluster) as executor:
        assert executor.submit(chatty, 3).result(timeout=60) == 3
        assert list(executor.map(chatty, [4])) == [4]
    with achilles.Pool(cluster=cluster, forward_output=False) as pool:
        assert pool.apply(chatty, (5,)) == 5
        assert pool.map(chatty, [6]) == [6]
    with achilles.Executor(cluster=cluster, forward_output=False) as executor:
        assert executor.submit(chatty, 7).result(timeout=60) == 7
    out, _ = capfd.readouterr()
    assert sorted(t for _, _, t in prefixed(out)) == ["out 1", "out 2", "out 3", "out 4"]


def test_output_and_a_progress_bar_share_the_terminal(cluster, capfd):
    """With progress=True the forwarded lines still arrive whole, each on its own line once
    the bar's redraws (carriage returns) are set aside."""
    assert cluster.map(chatty, range(4), chunksize=1, progress=True) == list(range(4))
    out, err = capfd.readouterr()
    shown = [segment for line in (out + err).splitlines() for segment in line.split("\r")]
    lines = prefixed("\n".join(shown))
    assert sorted(t for _, _, t in lines if t.startswith("out")) == [f"out {i}" for i in range(4)]
    assert sorted(t for _, _, t in lines if t.startswith("err")) == [f"err {i}" for i in range(4)]
