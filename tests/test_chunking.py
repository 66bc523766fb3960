"""Chunk sizes: the shrinking tail of a balanced map stops at a floor once the items' cost is
known, from this job or from earlier jobs of the same function on the same Cluster."""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import pytest

from achilles.controller.chunking import (
    EARLY_CHUNK_SECONDS, MAX_ITEMS, MAX_PRIOR_ITEMS, MIN_CHUNK_SECONDS, ChunkSizer, ItemCosts,
)
from achilles.controller.handle import JobDone, JobResults
from achilles.controller.job import _cost_key
from tasks import square

pytestmark = pytest.mark.timeout(90)


def sizes(sizer: ChunkSizer, total: int) -> List[int]:
    """The sizes a sizer picks for ``total`` items, none finishing meanwhile."""
    out = []
    while sum(out) < total:
        n = min(sizer.size(), total - sum(out))
        sizer.issue(n)
        out.append(n)
    return out


def balanced(total: int, prior: Optional[Tuple[float, int]], processes: int = 2) -> ChunkSizer:
    sizer = ChunkSizer(None, total, balance=True, prior=prior)
    sizer.processes = processes
    return sizer


def test_without_a_known_cost_the_tail_shrinks_to_single_items() -> None:
    """Guided self-scheduling as before: large chunks first, then ever smaller ones down to
    one item, when nothing says what an item costs."""
    out = sizes(balanced(20_000, None), 20_000)
    assert out[0] == 2500 and min(out) == 1 and len(out) > 20


def test_cheap_items_known_from_an_earlier_job_make_two_chunks_per_process() -> None:
    """A prior of 0.1 us per item: a 20,000-item map on 2 processes is less than 1 ms of work
    per quarter, so it goes as 4 chunks of 5,000 (Pool would cut 8 of 2,500), no tail."""
    out = sizes(balanced(20_000, (0.002, 20_000)), 20_000)
    assert out == [5000] * 4


def test_chunks_grow_past_pools_size_only_up_to_min_chunk_seconds() -> None:
    """Items of 1/3 us: 1 ms of work is 3,000 items, more than Pool's 2,500 and less than
    half a process's share (5,000): chunks hold 3,000."""
    out = sizes(balanced(20_000, (0.001, 3000)), 20_000)
    assert out == [3000] * 6 + [2000]


def test_the_floor_is_the_work_of_min_chunk_seconds() -> None:
    """Items of 10 us each: tail chunks hold no fewer than MIN_CHUNK_SECONDS / 10 us items
    (except the remainder)."""
    per_item = 10e-6
    floor = round(MIN_CHUNK_SECONDS / per_item)
    out = sizes(balanced(20_000, (per_item * 1000, 1000)), 20_000)
    assert min(out[:-1]) == floor and out[-1] <= floor
    assert out[0] == 2500


def test_expensive_items_keep_the_single_item_tail() -> None:
    """Items of 20 ms: the floor is one item, so the tail balances down to single items."""
    out = sizes(balanced(200, (2.0, 100)), 200)
    assert out[0] == 25 and out[-3:] == [1, 1, 1]


def test_a_wrong_prior_gives_at_worst_two_chunks_per_process() -> None:
    """However cheap the prior says items are (even free), no chunk exceeds
    ``len / (2 x processes)``."""
    for prior in ((0.0, 10**6), (1e-9, 1)):
        out = sizes(balanced(1000, prior, processes=4), 1000)
        assert out == [125] * 8


def test_this_jobs_own_timings_join_the_prior() -> None:
    """Finished chunks of the job count with the prior, weighted by items, the prior weighing
    at most as many items as the job has: a 20 ms chunk of one item barely moves a prior of
    20,000 cheap items, but outweighs a million-item prior scaled to a 10-item job; alone it
    gives a floor of 1."""
    sizer = balanced(20_000, (0.1, 10**6))
    sizer.observe(1, 0.02)
    assert sizer.per_item() == pytest.approx((0.1 / 50 + 0.02) / 20_001)
    small = balanced(10, (0.1, 10**6))
    small.observe(1, 0.02)
    assert small.per_item() == pytest.approx((0.1 / 10**5 + 0.02) / 11) and small.floor() == 1
    alone = balanced(20_000, None)
    alone.observe(1, 0.02)
    assert alone.floor() == 1
    assert balanced(10, (0.0, 5)).floor() == MAX_ITEMS


def test_fixed_chunksize_and_unbalanced_imap_ignore_the_prior() -> None:
    """``chunksize=`` wins, and an imap (no balance) still starts with one item for a fast
    first result."""
    fixed = ChunkSizer(7, 20_000, balance=True, prior=(0.0, 10**6))
    fixed.processes = 2
    assert fixed.size() == 7
    lazy = ChunkSizer(None, 20_000, balance=False, prior=(0.0, 10**6))
    lazy.processes = 2
    assert lazy.size() == 1


def test_before_the_first_want_chunks_are_sized_for_the_processes_seen() -> None:
    """Cheap items of a known cost (0.1 us) and a Cluster that saw 2 processes: the chunks
    sent on the initial credit, before this job's first WANT, are as large as with 2 processes
    known (5,000 each), not single items; the WANT's count takes over from there."""
    sizer = ChunkSizer(None, 20_000, balance=True, prior=(0.002, 20_000), early_processes=2)
    assert sizes(sizer, 10_000) == [5000, 5000]
    sizer.processes = 4
    assert sizer.size() == 2500


def test_early_chunks_hold_at_most_early_chunk_seconds_of_work() -> None:
    """Items of 1 us and one process seen: half the input would be 10,000 items (10 ms), but
    an early chunk holds at most EARLY_CHUNK_SECONDS of work, so a cluster that grew since
    the count was seen loses at most that much balance."""
    sizer = ChunkSizer(None, 20_000, balance=True, prior=(0.02, 20_000), early_processes=1)
    assert sizer.size() == round(EARLY_CHUNK_SECONDS / 1e-6) == 2000


def test_early_chunks_need_a_known_cost_a_count_and_a_balanced_map() -> None:
    """With no cost known, no count seen, or an imap (no balance), the first chunk holds one
    item as before (an imap's first result comes fast)."""
    assert ChunkSizer(None, 20_000, balance=True, early_processes=2).size() == 1
    assert ChunkSizer(None, 20_000, balance=True, prior=(0.002, 20_000)).size() == 1
    assert ChunkSizer(None, 20_000, balance=False, prior=(0.002, 20_000),
                      early_processes=2).size() == 1
    assert ChunkSizer(7, 20_000, balance=True, prior=(0.002, 20_000),
                      early_processes=2).size() == 7


def test_item_costs_keep_the_functions_used_last() -> None:
    """ItemCosts keeps at most ``max_entries`` functions, dropping the least recently used;
    a job that timed nothing leaves the figure in place."""
    costs = ItemCosts(max_entries=2)
    costs.put("a", 1.0, 10)
    costs.put("b", 2.0, 20)
    assert costs.get("a") == (1.0, 10)  # a is now the most recent
    costs.put("c", 3.0, 30)
    assert costs.get("b") is None and costs.get("a") == (1.0, 10) and costs.get("c") == (3.0, 30)
    costs.put("a", 0.0, 0)
    assert costs.get("a") == (1.0, 10)


def test_item_costs_weigh_jobs_by_their_items() -> None:
    """A one-item job (whose figure is mostly a call's fixed cost) barely moves what a
    20,000-item job measured; past MAX_PRIOR_ITEMS timed items the total is scaled down, so
    newer jobs count."""
    costs = ItemCosts()
    costs.put("f", 0.002, 20_000)
    costs.put("f", 0.00002, 1)
    assert costs.get("f") == (pytest.approx(0.00202), 20_001)
    costs.put("f", 10.0, MAX_PRIOR_ITEMS)
    seconds, items = costs.get("f")
    assert items == MAX_PRIOR_ITEMS
    assert seconds == pytest.approx(10.00202 * MAX_PRIOR_ITEMS / (MAX_PRIOR_ITEMS + 20_001))


def test_cost_keys_tell_functions_and_lambdas_apart() -> None:
    """Two lambdas (same name, different code) and a function with or without a callback get
    different keys; the same function gets the same key every time."""
    first, second = (lambda x: x), (lambda x: x * 2)
    assert _cost_key(first, None) != _cost_key(second, None)
    assert _cost_key(square, None) == _cost_key(square, None) != _cost_key(square, first)


class Chunks:
    """``on_event`` for submit_job: the size of every chunk, until the terminal event."""

    def __init__(self) -> None:
        self.sizes: List[int] = []
        self.end = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, JobResults):
            self.sizes.append(len(event.values))
        else:
            self.end = event
            self.done.set()


def test_a_job_closed_more_than_once_adds_its_item_cost_once(cluster) -> None:
    """imap's iterator closes its job when the results run out and again on close(): the
    job's timed items join the Cluster's item cost once."""
    key = _cost_key(square, None)
    before = cluster.item_costs.get(key) or (0.0, 0)
    it = cluster.imap(square, range(1000))
    assert list(it) == [x * x for x in range(1000)]
    it.close()
    it.close()
    assert cluster.item_costs.get(key)[1] == min(MAX_PRIOR_ITEMS, before[1] + 1000)


def test_a_map_records_its_item_cost_and_the_next_map_uses_it(cluster) -> None:
    """On a real cluster: a map leaves what its items cost on the Cluster (every item timed),
    and a later map of the same function with a known-cheap cost sends its items in two chunks
    per process, with no single-item chunks first (the Cluster has seen how many processes
    there are) and no shrinking tail."""
    key = _cost_key(square, None)
    before = cluster.item_costs.get(key) or (0.0, 0)
    assert cluster.map(square, range(20_000)) == [x * x for x in range(20_000)]
    seconds, items = cluster.item_costs.get(key)
    assert items == min(MAX_PRIOR_ITEMS, before[1] + 20_000) and seconds > before[0]
    kept = cluster.item_costs
    cluster.item_costs = ItemCosts()
    cluster.item_costs.put(key, 0.0, 10**6)  # as if square were free: the floor is the cap
    seen = Chunks()
    try:
        cluster.submit_job(square, range(20_000), seen)
        assert seen.done.wait(60) and seen.end == JobDone(20_000)
    finally:
        cluster.item_costs = kept
    cap = 20_000 // (2 * 4)  # the shared cluster has 4 processes
    ones = seen.sizes.count(1)
    remainder, *rest = sorted(seen.sizes)[ones:]
    assert cluster.processes_seen == 4
    assert ones == 0 and rest == [cap] * len(rest) and remainder <= cap
    assert sum(seen.sizes) == 20_000
