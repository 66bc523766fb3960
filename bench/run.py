"""Achilles vs ``multiprocessing.Pool``: one run, one machine, same functions, same inputs.

``python bench/run.py`` starts a ``multiprocessing.Pool(2)`` and an Achilles
``LocalCluster(nodes=1, processes=2)`` (a real server and node daemon on 127.0.0.1) side by
side, warms both up, runs every workload on both and prints one table: workload, metric, Pool
figure, Achilles figure, ratio Achilles/Pool, target and whether Achilles meets it.

Workloads (sizes in brackets are ``--quick``):

W1  tiny tasks: ``map(square, ints)`` over 20,000 and 1,000,000 [100,000] ints, default
    chunksize. Metric: tasks/s (for inputs of up to 100,000 items, of the median of 9 maps
    per round: one takes a few ms). Target: W1 (1M) Achilles >= 25% of Pool's tasks/s.
W2  200 [40] pure-Python CPU tasks of ~20 ms each (a busy loop calibrated at startup so one
    call takes 20 ms here; no sleep), default chunksize. Metric: efficiency = (serial time of
    all tasks / 2 processes) / wall time; the serial time is measured in this process right
    before each parallel run. Target: Achilles efficiency >= 95% of Pool's.
W3  100 [30] round trips of 1 MiB: ``map(rotate, blobs, chunksize=1)`` over distinct 1 MiB
    ``bytes``; ``rotate`` returns a new 1 MiB ``bytes``. Metric: MiB/s = MiB sent / wall time
    (as many MiB come back). Target: Achilles >= Pool (issue 12: and >= Ray). Also shown
    (W3, W3s, NP): CPU ms/MiB, the CPU time of this process and all its descendants (each
    side's workers, daemons and controller) per MiB, which a busy machine disturbs less than
    the wall clock.
W4  ``imap(nap, range(2000 [200]))`` with 5 ms sleeps and each library's default imap
    chunksize (Pool: 1; Achilles: adaptive, first chunks of 1). Metric: time from the ``imap``
    call to the first result. The iterator is then drained; that total is reported without a
    target. Target: Achilles < 50 ms.
W5  200 [50] sequential single-item round trips ``map(square, [i])``. Metrics: median and p99
    latency. Target: Achilles p50 < 2 ms.
W3s 10 [3] round trips of 10 MiB, as W3. Metric: MiB/s. Target: Achilles >= Ray (when Ray
    runs).
NP  40 [10] numpy arrays of 2 MiB (float64) round trip: ``map(np_roll, arrays, chunksize=1)``
    returns a new array each. Metric: MiB/s. Target: Achilles >= Pool. Skipped, saying so,
    when numpy is not installed.
D1  5,000 [1,000] tasks at chunksize 1: ``map(square, ints, chunksize=1)``, one message per
    item each way. Metric: tasks/s. Target: Achilles >= 15,000 tasks/s.
G1  a reduction graph of 8,191 [1,023] tasks (4,096 leaves, pairwise ``add`` up to one root:
    ``bench/graphs.py``'s tree) through ``Cluster.compute``. Metric: tasks/s. Target:
    Achilles >= 20,000 tasks/s. Pool and Ray have no call graphs: ``n/a`` there.

Peers: with Ray installed (``pip install ray``), ``ray.util.multiprocessing.Pool(2)`` (on a
local Ray of 2 CPUs) runs every workload too, as a third column; ``--no-ray`` leaves it out.

Method: every workload is written once against :class:`Runner` (a name, ``map``, ``imap``
and, where the library has call graphs, ``compute``), which ``Pool``, Ray's ``Pool`` and
``Cluster`` all fit. Each measurement is taken in ``--repeat``
rounds (default 3, ``--quick`` 1); rounds alternate which side goes first (ABBA), and the
table shows the median over rounds. Results are checked for correctness. The exit code is 0
whether or not targets are met; it is 1 only if a workload raised.

Both sides need the machine to themselves (Achilles adds a server, a node and the
controller's reactor thread to the two workers). While each measurement runs, the CPU time
taken by processes outside this benchmark is read from /proc; it is shown per round and per
workload, and a warning names the workloads where it exceeded 0.1 core, since their figures
say more about the neighbours than about either library. On a virtual machine, neighbours
outside the guest can also slow it down unseen; W2, a ratio of two timings seconds apart, is
the most sensitive (rounds can differ by 10-20% there): use ``--repeat 5`` or more to judge it.

Flags: ``--quick`` (smaller sizes, one round), ``--only W1,W3`` (select workloads), ``--json
PATH`` (also write the results as JSON), ``--repeat N`` (rounds), ``--timeout S`` (abort a
hung run; the daemons stop by themselves when this process exits), ``--no-ray``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import json
import math
import multiprocessing
import operator
import os
import platform
import random
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

# Benchmark the checkout this file lives in, whatever the current directory.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PROCESSES = 2
MIB = 1 << 20
TASK_SECONDS = 0.020  # W2: one CPU task
NAP_SECONDS = 0.005   # W4: one sleep
NOISY_CORES = 0.1     # warn when other processes used more CPU than this while timed...
MIN_NOISE_SECONDS = 0.2  # ...over at least this long (/proc counts in 10 ms ticks)
try:
    TICKS = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    TICKS = 100
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W3S", "NP", "D1", "G1")


# --- task functions (module level: Pool pickles them by reference, Achilles by value) -------

def square(x: int) -> int:
    """W1/W5: the tiniest useful task."""
    return x * x


def burn(loops: int) -> int:
    """W2: a pure-Python busy loop; ``loops`` is calibrated so one call takes ~20 ms."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) & 0xFFFFFFFF
    return acc


def rotate(data: bytes) -> bytes:
    """W3: identity-ish: a new ``bytes`` of the same size (rotated by one byte)."""
    return data[1:] + data[:1]


def nap(x: int) -> int:
    """W4: a 5 ms sleep."""
    time.sleep(NAP_SECONDS)
    return x


def np_roll(array: Any) -> Any:
    """NP: a new array of the same size (rolled by one element)."""
    import numpy

    return numpy.roll(array, 1)


# --- the harness --------------------------------------------------------------------------

@dataclass
class Runner:
    """What a workload needs of a pool: ``map(func, items, chunksize=None)`` and
    ``imap(func, items)`` (called with the library's default chunksize), and ``compute``
    for the graph row."""

    name: str
    map: Callable[..., List[Any]]
    imap: Callable[..., Iterator[Any]]
    #: ``compute(leaves)``: run bench/graphs.py's reduction tree; None without call graphs.
    compute: Optional[Callable[[int], None]] = None


@dataclass
class Sizes:
    """Workload sizes (full run or ``--quick``)."""

    w1_small: int
    w1_large: int
    w2_tasks: int
    w3_blobs: int
    w4_naps: int
    w5_calls: int
    w3s_blobs: int
    np_arrays: int
    d1_tasks: int
    g1_leaves: int

    @classmethod
    def pick(cls, quick: bool) -> "Sizes":
        """The full sizes, or the smaller ``--quick`` ones."""
        if quick:
            return cls(w1_small=20_000, w1_large=100_000, w2_tasks=40, w3_blobs=30,
                       w4_naps=200, w5_calls=50, w3s_blobs=3, np_arrays=10, d1_tasks=1000,
                       g1_leaves=512)
        return cls(w1_small=20_000, w1_large=1_000_000, w2_tasks=200, w3_blobs=100,
                   w4_naps=2000, w5_calls=200, w3s_blobs=10, np_arrays=40, d1_tasks=5000,
                   g1_leaves=4096)


@dataclass
class Target:
    """A pass criterion on the Achilles figure: ``ratio>=`` (Achilles/Pool at least
    ``value``), ``peer>=`` (Achilles/``peer`` at least ``value``; no verdict when that peer
    did not run), ``>=`` or ``<`` (absolute, in the metric's unit)."""

    kind: str
    value: float
    peer: str = ""

    def check(self, pool: float, achilles: float,
              peers: Optional[Dict[str, float]] = None) -> Optional[bool]:
        """Whether the Achilles figure meets the target (None: the peer did not run)."""
        if self.kind == "ratio>=":
            return pool > 0 and achilles / pool >= self.value
        if self.kind == "peer>=":
            other = (peers or {}).get(self.peer)
            if other is None or math.isnan(other):
                return None
            return other > 0 and achilles / other >= self.value
        if self.kind == ">=":
            return achilles >= self.value
        if self.kind == "<":
            return achilles < self.value
        raise ValueError(f"unknown target kind {self.kind!r}")

    def describe(self, unit: str) -> str:
        """Human-readable form, e.g. ``>= 25% of Pool`` or ``< 50 ms``."""
        if self.kind == "ratio>=":
            return f">= {self.value:.0%} of Pool"
        if self.kind == "peer>=":
            return f">= {self.value:.0%} of {self.peer}"
        return f"{self.kind} {self.value:g} {unit}".rstrip()


@dataclass
class Row:
    """How one figure of a workload becomes a table row."""

    label: str
    key: str
    unit: str
    target: Optional[Target] = None


@dataclass
class Metric:
    """One row of the table: a metric measured on both sides (medians over rounds)."""

    key: str  # W1..W5
    workload: str
    metric: str
    unit: str
    pool: float
    achilles: float
    target: Optional[Target] = None
    rounds_pool: List[float] = field(default_factory=list)
    rounds_achilles: List[float] = field(default_factory=list)
    #: Average CPU (in cores) that processes outside the benchmark used while it was timed.
    other_cores: Optional[float] = None
    #: Optional peers' figures (medians), by runner name (Ray).
    peers: Dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Achilles / Pool."""
        return self.achilles / self.pool if self.pool else math.nan

    @property
    def target_text(self) -> str:
        """The target as text, or ``-``."""
        return self.target.describe(self.unit) if self.target else "-"

    @property
    def passed(self) -> Optional[bool]:
        """True/False when the row has a target, else None."""
        if self.target is None or math.isnan(self.achilles):
            return None
        return self.target.check(self.pool, self.achilles, self.peers)

    def as_dict(self) -> Dict[str, Any]:
        """JSON-friendly form."""
        out = asdict(self)
        out["target"] = self.target.describe(self.unit) if self.target else None  # as text
        out["ratio"] = self.ratio
        out["passed"] = self.passed
        return out


Measurement = Dict[str, float]  # one round of one workload on one runner: figure name -> value


@dataclass
class Workload:
    """One workload: how to run one round of it on a runner, and its table rows.

    ``prepare`` (optional) runs right before every timed run, untimed, and its result is
    passed to ``run``: W2 measures its serial baseline there, next to the parallel run it is
    compared with, so that drift in the machine's speed hits both alike.
    """

    key: str
    run: Callable[[Runner, Any], Measurement]
    rows: List[Row]
    prepare: Optional[Callable[[], Any]] = None


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Tuple[float, Any]:
    """``(seconds, fn(*args, **kwargs))``, timed with :func:`time.perf_counter`."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def expect(ok: bool, what: str) -> None:
    """Fail loudly if a workload returned wrong results."""
    if not ok:
        raise AssertionError(f"wrong results: {what}")


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


# --- noise: CPU taken by other processes while a measurement runs -----------------------

@dataclass
class CpuSample:
    """CPU time at one moment, in clock ticks: busy on the whole machine, and used by this
    process and its descendants (the Pool workers, the Achilles daemons and their workers)."""

    busy: int
    ours: int


def cpu_sample() -> Optional[CpuSample]:
    """Read /proc now; None where there is no /proc."""
    try:
        with open("/proc/stat") as fh:
            user, nice, system = map(int, fh.readline().split()[1:4])
        parent: Dict[int, int] = {}
        ticks: Dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            parent[int(entry)] = int(fields[1])
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
    except (OSError, ValueError):
        return None
    ours, todo = 0, [os.getpid()]
    children: Dict[int, List[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        ours += ticks.get(pid, 0)
        todo.extend(children.get(pid, ()))
    # irq/softirq time is left out on both sides: loopback TCP's softirq work is charged to
    # no process, so counting it would blame this benchmark's own traffic on others.
    return CpuSample(user + nice + system, ours)


def other_ticks(before: Optional[CpuSample], after: Optional[CpuSample]) -> Optional[int]:
    """Clock ticks of CPU that processes outside this benchmark used between two samples."""
    if before is None or after is None:
        return None
    return max(0, (after.busy - before.busy) - (after.ours - before.ours))


# --- calibration --------------------------------------------------------------------------

def calibrate_burn(seconds: float = TASK_SECONDS) -> int:
    """Loops of :func:`burn` that take ``seconds`` on this machine (in this process)."""
    loops = 20_000
    elapsed, _ = timed(burn, loops)
    while elapsed < 0.005:  # grow until one call is long enough to time reliably
        loops *= 2
        elapsed, _ = timed(burn, loops)
    for _ in range(3):  # refine on the median of a few calls at the estimated size
        loops = max(1, int(loops * seconds / elapsed))
        elapsed = statistics.median(timed(burn, loops)[0] for _ in range(5))
    return max(1, int(loops * seconds / elapsed))


# --- workloads (each written once, run on both sides) -------------------------------------

#: W1 inputs up to this many items are timed as the median of :data:`W1_SHORT_REPEATS` maps
#: per round: one such map takes a few ms, less than the machine's noise.
W1_SHORT_ITEMS = 100_000
W1_SHORT_REPEATS = 9


def w1_tiny(runner: Runner, items: List[int], expected: List[int]) -> Measurement:
    """``map(square, items)`` with the default chunksize: tasks per second (for a short
    input, of the median of several maps)."""
    times = []
    for _ in range(W1_SHORT_REPEATS if len(items) <= W1_SHORT_ITEMS else 1):
        elapsed, out = timed(runner.map, square, items)
        expect(out == expected, f"W1 map(square) over {len(items)} ints on {runner.name}")
        times.append(elapsed)
    return {"tasks/s": len(items) / statistics.median(times)}


def w2_cpu(runner: Runner, loops: int, n_tasks: int, serial: float) -> Measurement:
    """``map(burn, [loops] * n_tasks)``: efficiency against the serial time ``serial``
    (reported too: the machine's speed drifts, so it is the baseline that counts)."""
    elapsed, out = timed(runner.map, burn, [loops] * n_tasks)
    expect(out == [burn(loops)] * n_tasks, f"W2 map(burn) on {runner.name}")
    return {"efficiency": (serial / PROCESSES) / elapsed, "serial s": serial}


def w4_first(runner: Runner, n: int) -> Measurement:
    """``imap(nap, range(n))``: time to the first result, and to the last (drained)."""
    start = time.perf_counter()
    it = runner.imap(nap, range(n))
    first = next(it)
    to_first = time.perf_counter() - start
    rest = list(it)
    total = time.perf_counter() - start
    expect([first] + rest == list(range(n)), f"W4 imap(nap) on {runner.name}")
    return {"first ms": to_first * 1e3, "total s": total}


def w5_latency(runner: Runner, calls: int) -> Measurement:
    """``calls`` sequential ``map(square, [i])``: median and p99 latency."""
    samples: List[float] = []
    for i in range(calls):
        elapsed, out = timed(runner.map, square, [i])
        expect(out == [i * i], f"W5 map(square, [{i}]) on {runner.name}")
        samples.append(elapsed)
    return {"p50 ms": statistics.median(samples) * 1e3, "p99 ms": percentile(samples, 0.99) * 1e3}


def payload_trip(runner: Runner, blobs: List[Any], same: Callable[[Any, Any], bool],
                 what: str) -> Measurement:
    """``map(rotate or np_roll, blobs, chunksize=1)``: MiB sent per second (as many come
    back); W3, W3s and NP."""
    func = rotate if isinstance(blobs[0], bytes) else np_roll
    before = cpu_sample()
    elapsed, out = timed(runner.map, func, blobs, chunksize=1)
    after = cpu_sample()
    expect(len(out) == len(blobs) and all(same(o, func(b)) for o, b in zip(out, blobs)),
           f"{what} on {runner.name}")
    mib = sum(b.nbytes if hasattr(b, "nbytes") else len(b) for b in blobs) / MIB
    cpu = math.nan if before is None or after is None else \
        (after.ours - before.ours) / TICKS * 1e3 / mib
    return {"MiB/s": mib / elapsed, "CPU ms/MiB": cpu}


def d1_dispatch(runner: Runner, items: List[int], expected: List[int]) -> Measurement:
    """``map(square, items, chunksize=1)``: tasks per second, one task per message."""
    elapsed, out = timed(runner.map, square, items, chunksize=1)
    expect(out == expected, f"D1 map(square, chunksize=1) on {runner.name}")
    return {"tasks/s": len(items) / elapsed}


def g1_graph(runner: Runner, leaves: int) -> Measurement:
    """bench/graphs.py's reduction tree of ``2 * leaves - 1`` tasks: tasks per second
    (``nan`` for a runner without call graphs)."""
    if runner.compute is None:
        return {"tasks/s": math.nan}
    elapsed, _ = timed(runner.compute, leaves)
    return {"tasks/s": (2 * leaves - 1) / elapsed}


def achilles_compute(cluster: Any) -> Callable[[int], None]:
    """``compute(leaves)`` for a Cluster: builds and runs the reduction tree, checks the sum."""
    import achilles
    from bench.graphs import add, leaf, tree

    t_leaf, t_add = achilles.task(leaf), achilles.task(add)

    def compute(leaves: int) -> None:
        out = cluster.compute(tree(t_leaf, t_add, leaves))
        expect(out == [sum(range(leaves))], f"G1 reduction tree of {leaves} leaves")

    return compute


def warm_up(runner: Runner) -> None:
    """Touch every code path once so neither side pays first-use costs in a timed run."""
    runner.map(square, list(range(1000)))
    runner.map(burn, [1000] * 4)
    runner.map(rotate, [bytes(MIB)] * 4, chunksize=1)
    list(runner.imap(nap, range(4)))
    for i in range(10):
        runner.map(square, [i])
    runner.map(square, list(range(100)), chunksize=1)
    try:
        import numpy
    except ImportError:
        pass
    else:  # each worker imports numpy here, not in NP's first timed round
        runner.map(np_roll, [numpy.zeros(1024)] * 8, chunksize=1)
    if runner.compute is not None:
        runner.compute(64)


# --- the plan -----------------------------------------------------------------------------

def plan(sizes: Sizes, selected: Sequence[str]) -> List[Workload]:
    """The selected workloads, with their inputs built (and W2 calibrated) here, once."""
    out: List[Workload] = []
    if "W1" in selected:
        for n, target in ((sizes.w1_small, None), (sizes.w1_large, Target("ratio>=", 0.25))):
            items = list(range(n))
            expected = [x * x for x in items]

            def tiny(r: Runner, _: Any, items: List[int] = items,
                     expected: List[int] = expected) -> Measurement:
                return w1_tiny(r, items, expected)

            out.append(Workload("W1", tiny, [Row(f"W1 tiny x*x ({n:,})", "tasks/s", "tasks/s",
                                                 target)]))
    if "W2" in selected:
        loops = calibrate_burn()
        one = statistics.median(timed(burn, loops)[0] for _ in range(5))
        print(f"W2 calibration: burn({loops:,}) takes {one * 1e3:.1f} ms here", flush=True)

        def serial_time() -> float:
            """Every W2 task run one after the other in this process."""
            start = time.perf_counter()
            for _ in range(sizes.w2_tasks):
                burn(loops)
            return time.perf_counter() - start

        out.append(Workload(
            "W2", lambda r, serial: w2_cpu(r, loops, sizes.w2_tasks, serial),
            [Row(f"W2 CPU {sizes.w2_tasks} x {one * 1e3:.0f} ms", "efficiency", "",
                 Target("ratio>=", 0.95))],
            prepare=serial_time))
    if "W3" in selected:
        rng = random.Random(3)
        blobs = [rng.randbytes(MIB) for _ in range(sizes.w3_blobs)]
        label = f"W3 {sizes.w3_blobs} x 1 MiB round trip"
        out.append(Workload(
            "W3", lambda r, _: payload_trip(r, blobs, operator.eq, "W3 map(rotate)"),
            [Row(label, "MiB/s", "MiB/s", Target("ratio>=", 1.0)),
             Row(label, "CPU ms/MiB", "ms")]))
    if "W4" in selected:
        label = f"W4 imap {sizes.w4_naps} x 5 ms sleep"
        out.append(Workload(
            "W4", lambda r, _: w4_first(r, sizes.w4_naps),
            [Row(label, "first ms", "ms", Target("<", 50)), Row(label, "total s", "s")]))
    if "W5" in selected:
        label = f"W5 {sizes.w5_calls} x map(f, [i])"
        out.append(Workload(
            "W5", lambda r, _: w5_latency(r, sizes.w5_calls),
            [Row(label, "p50 ms", "ms", Target("<", 2)), Row(label, "p99 ms", "ms")]))
    if "W3S" in selected:
        rng = random.Random(4)
        big = [rng.randbytes(10 * MIB) for _ in range(sizes.w3s_blobs)]
        out.append(Workload(
            "W3s", lambda r, _: payload_trip(r, big, operator.eq, "W3s map(rotate)"),
            [Row(f"W3s {sizes.w3s_blobs} x 10 MiB round trip", "MiB/s", "MiB/s",
                 Target("peer>=", 1.0, "Ray")),
             Row(f"W3s {sizes.w3s_blobs} x 10 MiB round trip", "CPU ms/MiB", "ms")]))
    if "NP" in selected:
        try:
            import numpy
        except ImportError:
            print("NP skipped: numpy is not installed (pip install numpy)", flush=True)
        else:
            gen = numpy.random.default_rng(5)
            arrays = [gen.random(2 * MIB // 8) for _ in range(sizes.np_arrays)]
            out.append(Workload(
                "NP", lambda r, _: payload_trip(r, arrays, numpy.array_equal, "NP map(np_roll)"),
                [Row(f"NP {sizes.np_arrays} numpy arrays of 2 MiB round trip", "MiB/s", "MiB/s",
                     Target("ratio>=", 1.0)),
                 Row(f"NP {sizes.np_arrays} numpy arrays of 2 MiB round trip", "CPU ms/MiB",
                     "ms")]))
    if "D1" in selected:
        ints = list(range(sizes.d1_tasks))
        squares = [x * x for x in ints]
        out.append(Workload(
            "D1", lambda r, _: d1_dispatch(r, ints, squares),
            [Row(f"D1 {sizes.d1_tasks:,} tasks at chunksize 1", "tasks/s", "tasks/s",
                 Target(">=", 15_000))]))
    if "G1" in selected:
        out.append(Workload(
            "G1", lambda r, _: g1_graph(r, sizes.g1_leaves),
            [Row(f"G1 reduction graph of {2 * sizes.g1_leaves - 1:,} tasks", "tasks/s",
                 "tasks/s", Target(">=", 20_000))]))
    return out


def run(workloads: List[Workload], runners: List[Runner], rounds: int
        ) -> Tuple[List[Metric], List[str]]:
    """Run each workload ``rounds`` times on every runner, alternating which goes first;
    returns the rows (medians over rounds) and the errors."""
    metrics: List[Metric] = []
    errors: List[str] = []
    width = max((len(wl.rows[0].label) for wl in workloads), default=0)
    for wl in workloads:
        label = wl.rows[0].label
        seen: Dict[str, List[Measurement]] = {r.name: [] for r in runners}
        noise = [0, 0.0]  # clock ticks used by other processes, seconds measured
        where = "prepare"
        try:
            for n in range(rounds):
                order = runners if n % 2 == 0 else runners[::-1]
                for runner in order:
                    where = runner.name
                    context = wl.prepare() if wl.prepare else None
                    before = cpu_sample()
                    elapsed, measurement = timed(wl.run, runner, context)
                    foreign = other_ticks(before, cpu_sample())
                    seen[runner.name].append(measurement)
                    figures = ", ".join(f"{k} {fmt(v)}" for k, v in measurement.items())
                    busy = ""
                    if foreign is not None:
                        noise[0] += foreign
                        noise[1] += elapsed
                        if elapsed >= MIN_NOISE_SECONDS:
                            busy = f"; others {foreign / TICKS / elapsed:.2f} cores"
                    print(f"  {label:<{width}}  round {n + 1}/{rounds}  {runner.name:<8}  "
                          f"{figures}  ({elapsed:.2f} s{busy})", flush=True)
        except Exception:
            print(f"  {label}: ERROR", flush=True)
            errors.append(f"{label} ({where}):\n{traceback.format_exc()}")
            continue
        for row in wl.rows:
            p = [m[row.key] for m in seen[runners[0].name]]
            a = [m[row.key] for m in seen[runners[1].name]]
            others = noise[0] / TICKS / noise[1] if noise[1] >= MIN_NOISE_SECONDS else None
            peers = {r.name: statistics.median(m[row.key] for m in seen[r.name])
                     for r in runners[2:]}
            metrics.append(Metric(wl.key, row.label, row.key, row.unit, statistics.median(p),
                                  statistics.median(a), row.target, p, a, others, peers))
    return metrics, errors


# --- output -------------------------------------------------------------------------------

def fmt(value: float) -> str:
    """A figure with sensible precision."""
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def render(metrics: List[Metric]) -> str:
    """The results table as text."""
    peers = sorted({name for m in metrics for name in m.peers})
    header = ["workload", "metric", "Pool", *peers, "Achilles", "A/P", "target", "result"]
    rows = [header]
    for m in metrics:
        verdict = {None: "-", True: "PASS", False: "FAIL"}[m.passed]
        rows.append([m.workload, m.metric, fmt(m.pool),
                     *(fmt(m.peers.get(name, math.nan)) for name in peers), fmt(m.achilles),
                     fmt(m.ratio) if math.isnan(m.ratio) else f"{m.ratio:.2f}",
                     m.target_text, verdict])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = set(range(2, 5 + len(peers)))
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_noise(metrics: List[Metric]) -> None:
    """Say how much CPU other processes took while each workload was timed, and warn when
    that makes the figures suspect (the benchmark wants the machine to itself)."""
    if cpu_sample() is None:
        return
    per_label = {m.workload: m.other_cores for m in metrics}
    width = max((len(label) for label in per_label), default=0)
    print("\nCPU used by other processes while timed (average, in cores):")
    for label, cores in per_label.items():
        if cores is None:
            print(f"  {label:<{width}}  n/a (timed for too short to tell)")
        else:
            flag = "  <- noisy" if cores > NOISY_CORES else ""
            print(f"  {label:<{width}}  {cores:.2f}{flag}")
    noisy = sorted({m.key for m in metrics
                    if m.other_cores is not None and m.other_cores > NOISY_CORES})
    if noisy:
        print(f"WARNING: other processes competed for the CPU during {', '.join(noisy)}; "
              "those figures are unreliable: rerun on a quiet machine.")


def loadavg() -> str:
    """The 1/5/15-minute load averages, or '?'."""
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (AttributeError, OSError):
        return "?"


def machine_info() -> Dict[str, Any]:
    """Where and how this run happened."""
    import achilles

    usable: Optional[int]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": _cpu_model() or platform.processor() or "?",
        "cores": f"{os.cpu_count()} logical, {usable} usable",
        "load average": loadavg(),
        "achilles": f"{achilles.__version__} from {Path(achilles.__file__).parent.parent}",
        "pool": f"multiprocessing.Pool({PROCESSES}), start method "
                f"{multiprocessing.get_start_method()}",
    }


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, when there is one."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# --- main ---------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description="Achilles LocalCluster vs multiprocessing.Pool; "
                                            "see the module docstring for the workloads.")
    p.add_argument("--quick", action="store_true", help="smaller sizes, one round: a smoke run")
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help="comma-separated workloads to run (default: all), e.g. W1,W3")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="rounds per workload, median reported (default 3; 1 with --quick)")
    p.add_argument("--timeout", type=float, default=1800, metavar="S",
                   help="abort the whole run after S seconds (default 1800)")
    p.add_argument("--no-ray", action="store_true",
                   help="leave Ray's Pool out even when Ray is installed")
    args = p.parse_args(argv)
    chosen = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = sorted(chosen - set(WORKLOADS))
    args.only = [w for w in WORKLOADS if w in chosen]
    if unknown or not args.only:
        p.error(f"--only takes some of {','.join(WORKLOADS)}; got {', '.join(unknown) or 'none'}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def start_ray(stack: contextlib.ExitStack) -> Any:
    """``ray.util.multiprocessing.Pool(2)`` on a local Ray of 2 CPUs, stopped with ``stack``;
    None (saying why) when Ray is not installed or does not start."""
    try:
        import ray
        from ray.util.multiprocessing import Pool as RayPool
    except ImportError:
        print("Ray is not installed (pip install ray): no Ray column", flush=True)
        return None
    try:
        ray.init(num_cpus=PROCESSES, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        stack.callback(ray.shutdown)
        ray_pool = RayPool(PROCESSES)
        stack.callback(ray_pool.terminate)
    except Exception as exc:  # a peer that cannot start leaves the run to the others
        print(f"Ray did not start ({type(exc).__name__}: {exc}): no Ray column", flush=True)
        return None
    print(f"  {'ray':<13} ray.util.multiprocessing.Pool({PROCESSES}), Ray {ray.__version__}",
          flush=True)
    return ray_pool


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print the table; returns the exit code (1 only on errors)."""
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    import achilles

    info = machine_info()
    print(f"Achilles benchmark: multiprocessing.Pool({PROCESSES}) vs "
          f"LocalCluster(nodes=1, processes={PROCESSES}) (and Ray's Pool, when installed)")
    for key, value in info.items():
        print(f"  {key:<13} {value}")
    print(f"  {'mode':<13} {'quick' if args.quick else 'full'}; workloads {','.join(args.only)}; "
          f"{args.repeat} round(s), median shown", flush=True)

    wall_start = time.perf_counter()
    sizes = Sizes.pick(args.quick)
    # The Pool forks its workers before the Achilles controller starts its reactor thread.
    with multiprocessing.Pool(PROCESSES) as pool, \
            achilles.LocalCluster(nodes=1, processes=PROCESSES) as cluster, \
            contextlib.ExitStack() as peers:
        runners = [Runner("Pool", pool.map, pool.imap),
                   Runner("Achilles", cluster.map, cluster.imap, achilles_compute(cluster))]
        ray_pool = None if args.no_ray else start_ray(peers)
        if ray_pool is not None:
            runners.append(Runner("Ray", ray_pool.map, ray_pool.imap))
        for runner in runners:
            warm_up(runner)
        metrics, errors = run(plan(sizes, args.only), runners, args.repeat)
    wall = time.perf_counter() - wall_start
    faulthandler.cancel_dump_traceback_later()

    print()
    print(render(metrics))
    judged = [m for m in metrics if m.passed is not None]
    passed = sum(1 for m in judged if m.passed)
    print(f"\ntargets met: {passed} of {len(judged)}")
    for m in judged:
        others = "".join(f", {name} {fmt(v)}" for name, v in m.peers.items())
        print(f"  {'PASS' if m.passed else 'FAIL'}  {m.workload} {m.metric}: Achilles "
              f"{fmt(m.achilles)} {m.unit}".rstrip() + f" (Pool {fmt(m.pool)}{others}); "
              f"target {m.target_text}")
    for err in errors:
        print(f"\nERROR in {err}", file=sys.stderr)
    print_noise(metrics)
    print(f"\nfinished in {wall:.1f} s; load average now {loadavg()}")

    if args.json:
        report = {"info": info, "mode": "quick" if args.quick else "full",
                  "rounds": args.repeat, "workloads": args.only, "wall_seconds": wall,
                  "metrics": [m.as_dict() for m in metrics], "errors": errors,
                  "targets_met": passed, "targets": len(judged)}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
