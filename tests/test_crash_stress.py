"""Stress: hundreds of worker crashes at random moments of a chunk's life, on a WorkerPool
driven directly and on a real LocalCluster. No chunk may be lost, delivered twice, blamed on
the wrong item, or leave a caller waiting.

``ACHILLES_STRESS_SEED=<n>`` replays a run's random plan (timing still varies).
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import threading

import pytest

from achilles.controller import reactor_thread
from achilles.core import wire
from achilles.core.errors import WorkerCrashed
from conftest import alive, wait_for
from crash_tasks import chaos
from tasks import pause
from test_crash_races import chunk, pools  # noqa: F401  (the pools fixture)

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(120)]

SEED = int(os.environ.get("ACHILLES_STRESS_SEED", random.randrange(1 << 30)))
CALL_TIMEOUT = 60.0


def crash_plan(rng: random.Random, later: bool, marker=None) -> tuple:
    """A random way and moment for an item to kill its worker."""
    if later:
        return ("later", rng.choice(["exit", "kill"]), rng.choice([0, 0.0005, 0.002, 0.01, 0.03]),
                marker)
    return ("now", rng.choice(["exit", "kill"]), rng.choice([0, 0, 0.001, 0.003, 0.01]), marker)


def test_pool_gives_every_chunk_one_outcome(pools):  # noqa: F811
    """On a 2-worker pool, 400 chunks whose items kill their worker at random moments (mid
    chunk, with or without careful mode, racing a timeout; or from a thread after the chunk
    returned, killing the worker while it writes the result or waits for the next chunk),
    with jobs cancelled at random: every chunk not cancelled gets exactly one outcome, a
    crash names its item and exit code exactly, and the pool still serves afterwards."""
    rng = random.Random(SEED)
    out, pool = pools(2)
    expect = {}  # chunk id -> (kind, detail)
    cancelled = set()
    cid = 0
    # phase 1: each crash comes from its own chunk, so outcomes are exact
    for _ in range(200):
        size = rng.randint(1, 5)
        items = [(x, None) for x in range(size)]
        careful = rng.random() < 0.5
        timeout = None
        if rng.random() < 0.5:
            k = rng.randrange(size)
            plan = crash_plan(rng, later=False)
            items[k] = (k, plan)
            if rng.random() < 0.2:
                timeout = rng.choice([0.002, 0.01])  # races the crash
            expect[cid] = ("crash", (k if careful else None, plan[1], timeout))
        else:
            timeout = rng.choice([None, 30.0])
            expect[cid] = ("ok", list(range(size)))
        pool.submit(chunk(cid, chaos, items, careful=careful, timeout=timeout))
        cid += 1
    assert out.wait(expect, CALL_TIMEOUT), f"chunks lost (seed {SEED}): " \
        f"{sorted(set(expect) - set(out.got))}"
    crashes = 0
    for c, (kind, detail) in expect.items():
        assert len(out.got[c]) == 1, f"chunk {c} got {len(out.got[c])} outcomes (seed {SEED})"
        status, payload = out.got[c][0]
        if kind == "ok":
            assert (status, pickle.loads(payload)) == (wire.OK, detail), f"chunk {c} (seed {SEED})"
            continue
        crashes += 1
        item, how, timeout = detail
        if status == wire.TIMED_OUT and timeout is not None:
            continue
        assert status == wire.CRASHED, f"chunk {c}: status {status} (seed {SEED})"
        exitcode, blamed = pickle.loads(payload)
        assert exitcode == (7 if how == "exit" else -9), f"chunk {c} (seed {SEED})"
        assert blamed == item, f"chunk {c} blamed item {blamed}, not {item} (seed {SEED})"
    # phase 2: killers that outlive their chunk, and cancelled jobs
    start = cid
    for _ in range(200):
        size = rng.randint(1, 5)
        items = [(x, None) for x in range(size)]
        if rng.random() < 0.5:
            k = rng.randrange(size)
            items[k] = (k, crash_plan(rng, later=rng.random() < 0.5))
        job = f"job-{cid // 10}"
        pool.submit(chunk(cid, chaos, items, job=job, careful=rng.random() < 0.5))
        cid += 1
        if rng.random() < 0.03:
            pool.cancel_job(1, job)
            cancelled.update(c for c in range(start, cid) if f"job-{c // 10}" == job)
        if rng.random() < 0.05:
            pause(rng.choice([0.001, 0.01]))  # vary the timing
    wanted = set(range(start, cid)) - cancelled
    assert out.wait(wanted, CALL_TIMEOUT), f"chunks lost (seed {SEED}): " \
        f"{sorted(wanted - set(out.got))}"
    for c in range(start, cid):
        n = len(out.got.get(c, []))
        assert n == 1 or (c in cancelled and n == 0), f"chunk {c}: {n} outcomes (seed {SEED})"
        status, payload = out.got[c][0] if n else (wire.OK, None)
        assert status in (wire.OK, wire.CRASHED), f"chunk {c}: status {status} (seed {SEED})"
    for c in range(cid, cid + 4):
        pool.submit(chunk(c, chaos, [(c, None)]))
    assert out.wait(range(cid, cid + 4), CALL_TIMEOUT), "the pool stopped serving"
    assert_workers_in_place(pool, 2)
    assert crashes >= 50, crashes  # the plan did crash workers (about 100 expected)


def assert_workers_in_place(pool, processes: int) -> None:
    """The pool has ``processes`` live workers and no replaced one still waits to be reaped."""

    def workers():  # in the reactor thread, where the pool lives
        live = [s.proc.pid for s in pool.pool._slots if s is not None and not s.exited]
        return live, len(pool.pool._retiring)

    def in_place() -> bool:
        live, retiring = reactor_thread.call(workers, timeout=30)
        return len(live) == processes and not retiring and all(alive(pid) for pid in live)

    wait_for(in_place, timeout=20, what=f"the pool's {processes} workers to be in place")


def settled(armed) -> bool:
    """Whether the worker of a killer thread (its pid is in the ``.armed`` marker) is gone."""
    return not alive(int(armed.read_text()))


def call_with_timeout(fn, *args, **kw):
    """``fn(*args, **kw)`` in a thread; fails the test (instead of hanging) after
    CALL_TIMEOUT seconds. Returns ``("ok", value)`` or ``("raised", exception)``."""
    box: list = []

    def run() -> None:
        try:
            box.append(("ok", fn(*args, **kw)))
        except BaseException as exc:
            box.append(("raised", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(CALL_TIMEOUT)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} hung for {CALL_TIMEOUT:g} s (seed {SEED})")
    return box[0]


def test_cluster_maps_survive_random_crashes(make_cluster, tmp_path):
    """On a real cluster, 120 map / imap / imap_unordered calls whose items kill their worker
    (os._exit or SIGKILL, at once or after a pause, or from a thread after the item returned)
    once or every time: each call returns every result exactly once, or raises
    WorkerCrashed naming the item that always kills its worker; none hangs."""
    rng = random.Random(SEED)
    lc = make_cluster(nodes=1, processes=2)
    c = lc.cluster
    crashes = 0
    for m in range(120):
        n = rng.choice([1, 4, 10, 20, 40])
        chunksize = rng.choice([None, 1, 2, 5, 10])
        items = [(x, None) for x in range(n)]
        bad = rng.randrange(n) if rng.random() < 0.25 else None
        if bad is not None:
            items[bad] = (bad, crash_plan(rng, later=False))
            crashes += 3
        free = [x for x in range(n) if x != bad]
        # at most two one-off crashes: no chunk reaches the crash limit by bad luck
        for x in rng.sample(free, min(len(free), rng.choice([0, 1, 2]))):
            later = bad is None and rng.random() < 0.4
            items[x] = (x, crash_plan(rng, later, str(tmp_path / f"m{m}-{x}")))
            crashes += 1
        how = rng.choice(["map", "imap", "imap_unordered"])
        if how == "map":
            kind, value = call_with_timeout(c.map, chaos, items, chunksize=chunksize)
            got = value if kind == "ok" else None
        else:
            got = []
            it = getattr(c, how)(chaos, items, chunksize=chunksize)
            kind, value = call_with_timeout(lambda got=got, it=it: got.extend(it))
        where = f"call {m} ({how}, n={n}, chunksize={chunksize}, bad={bad}, seed {SEED})"
        if bad is None:
            assert kind == "ok", f"{where}: raised {value!r}"
            if how == "imap_unordered":
                got = sorted(got)
            assert got == list(range(n)), f"{where}: results {got}"
        else:
            assert kind == "raised" and isinstance(value, WorkerCrashed), f"{where}: {kind} {value!r}"
            assert value.item == bad and "3 times" in str(value), f"{where}: {value}"
            counts = collections.Counter(got or [])
            assert not counts or max(counts.values()) == 1, f"{where}: a result arrived twice"
        # a killer thread still armed would strike the next call's chunks
        wait_for(lambda m=m: all(settled(a) for a in tmp_path.glob(f"m{m}-*.armed")),
                 what=f"the killer threads of call {m} to fire")
    assert crashes >= 100, crashes  # the plan did crash workers (about 200 expected)
    assert c.map(chaos, [(x, None) for x in range(8)]) == list(range(8))
