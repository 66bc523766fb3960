"""Nodes as the scheduler sees them, the index of nodes with free credit, and dispatch policies.

A node has two kinds of credit. Its base credit, ``processes x prefetch`` chunks, is for any
job's chunks. Its fast credit, ``processes x depth`` units, holds only chunks of jobs whose
chunks finish quickly (the scheduler charges such a chunk units in proportion to its job's
service time, see :mod:`achilles.server.scheduler`): the node queues them locally, so its
workers never wait for a round trip to the server between short chunks.

Picking a node for a chunk must not cost more as the cluster grows: :class:`FreeSlots` keeps
the nodes in buckets keyed by their free credit (of one kind), with the highest non-empty
bucket at hand, so the node with the most free credit is found in O(1) (the one that has waited
longest, so idle nodes take turns). A :class:`DispatchPolicy` chooses, for
one job, which queued chunk goes to which node; it counts the nodes it examines so that tests
can check that per-dispatch work does not grow with the number of nodes.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Protocol, Set,
                    Tuple)

if TYPE_CHECKING:
    from achilles.server.jobs import Chunk, Job


class Peer(Protocol):
    """What the scheduler needs of a connection."""

    def send(self, code: int, *fields: Any) -> None: ...


@dataclass(eq=False)
class NodeState:
    """A connected node. ``capacity`` (processes x prefetch chunks) and ``fast_capacity``
    (processes x depth units) are fixed when it joins."""

    peer: Peer
    node_id: int
    name: str
    address: str
    processes: int
    prefetch: int
    hostname: str = ""
    pid: int = 0
    resources: Dict[str, float] = field(default_factory=dict)
    connected_since: float = field(default_factory=time.time)  # wall time, shown to users
    inflight: Dict[Tuple[str, int], "Chunk"] = field(default_factory=dict)
    jobs_shipped: Set[str] = field(default_factory=set)
    used: Dict[str, float] = field(default_factory=dict)
    done: int = 0  # items this node completed with status OK
    load: Dict[str, float] = field(default_factory=dict)  # the host's last NODE_LOAD report
    done_pending: Dict[str, None] = field(default_factory=dict)  # finished jobs to tell it of
    done_call: Any = None  # the timer that sends them
    depth: int = 0  # fast credit units per process
    capacity: int = field(init=False)
    fast_capacity: int = field(init=False)
    held: int = field(default=0, init=False)  # chunks in flight on base credit
    shm_tasks: int = field(default=0, init=False)  # TASKs sent to it as shared-memory refs
    shm_results: int = field(default=0, init=False)  # RESULTs it sent as shared-memory refs
    fast_held: int = field(default=0, init=False)  # fast credit units in use

    def __post_init__(self) -> None:
        self.capacity = self.processes * self.prefetch
        self.fast_capacity = self.processes * self.depth

    def fits(self, need: Dict[str, float]) -> bool:
        """Whether this node has ``need`` free now."""
        return all(self.resources.get(k, 0.0) - self.used.get(k, 0.0) >= v for k, v in need.items())

    def offers(self, need: Dict[str, float]) -> bool:
        """Whether this node could ever run a task needing ``need``."""
        return all(self.resources.get(k, 0.0) >= v for k, v in need.items())

    @property
    def free(self) -> int:
        """Chunks this node may still be handed on base credit."""
        return self.capacity - self.held

    @property
    def fast_free(self) -> int:
        """Fast credit units this node has left."""
        return self.fast_capacity - self.fast_held


def base_free(node: NodeState) -> int:
    """A node's free base credit (the level :class:`FreeSlots` indexes by default)."""
    return node.capacity - node.held


def fast_free(node: NodeState) -> int:
    """A node's free fast credit units."""
    return node.fast_capacity - node.fast_held


class FreeSlots:
    """Every node, bucketed by free credit of one kind (``level(node)``); O(1) access to a
    node with the most.

    A bucket keeps its nodes in the order they reached its level, so among nodes with equally
    much free credit the one that has waited longest comes first: when chunks trickle in, idle
    nodes take turns instead of the last node to answer taking them all. Moving a node between
    buckets is O(1). Call :meth:`update` after each change to the credit a node has in use.
    """

    def __init__(self, level: Callable[[NodeState], int] = base_free) -> None:
        self.level = level
        self._buckets: Dict[int, "OrderedDict[int, NodeState]"] = {}
        self._at: Dict[int, int] = {}  # node id -> its bucket's level
        self.top = 0  # highest free credit of any node (0: no node has free credit)

    def add(self, node: NodeState) -> None:
        """Start tracking ``node``."""
        self._put(node)

    def discard(self, node: NodeState) -> None:
        """Stop tracking ``node`` (no-op if it is not tracked)."""
        at = self._at.pop(node.node_id, None)
        if at is not None:
            self._take(node, at)
            self._lower_top()

    def update(self, node: NodeState) -> None:
        """``node``'s free credit changed: move it to the end of its new bucket."""
        at = self._at.get(node.node_id)
        if at is None:
            return
        if at != self.level(node):
            self._take(node, at)
            self._put(node)
            self._lower_top()

    def best(self) -> Optional[NodeState]:
        """The node that has had the most free credit longest, or None when none has any."""
        if self.top <= 0:
            return None
        return next(iter(self._buckets[self.top].values()))

    def descending(self) -> Iterator[NodeState]:
        """Nodes with free credit, most free first, longest waiting first within a level (do
        not move nodes while iterating)."""
        for level in range(self.top, 0, -1):
            yield from self._buckets.get(level, {}).values()

    def check(self, nodes: Dict[int, NodeState]) -> None:
        """Raise AssertionError unless the buckets hold exactly ``nodes`` at their free credit."""
        seen = 0
        for level, bucket in self._buckets.items():
            assert bucket, f"empty free-credit bucket {level} kept"
            for node_id, node in bucket.items():
                assert node.node_id == node_id, f"node {node.name} filed under id {node_id}"
                assert nodes.get(node_id) is node, f"bucket holds unknown node {node_id}"
                assert self._at[node_id] == level == self.level(node), \
                    f"node {node.name} is in bucket {level} with {self.level(node)} free"
                seen += 1
        assert seen == len(nodes) == len(self._at), f"{seen} nodes bucketed, {len(nodes)} connected"
        expect = max((lvl for lvl in self._buckets if lvl > 0), default=0)
        assert self.top == expect, f"top free credit {self.top}, expected {expect}"

    def _put(self, node: NodeState) -> None:
        level = self.level(node)
        bucket = self._buckets.get(level)
        if bucket is None:
            bucket = self._buckets[level] = OrderedDict()
        bucket[node.node_id] = node
        self._at[node.node_id] = level
        if level > self.top:
            self.top = level

    def _take(self, node: NodeState, level: int) -> None:
        bucket = self._buckets[level]
        del bucket[node.node_id]
        if not bucket:
            del self._buckets[level]

    def _lower_top(self) -> None:
        # After a move the scan runs from the old top to the next level in use: a node's
        # new level, usually a step or two below.
        while self.top > 0 and self.top not in self._buckets:
            self.top -= 1


class DispatchPolicy(ABC):
    """Chooses which of a job's queued chunks goes to which node with free credit."""

    def __init__(self) -> None:
        self.examined = 0  # NodeState objects looked at, over the policy's life

    @abstractmethod
    def pick(self, job: "Job", free: FreeSlots) -> Optional[Tuple[int, NodeState]]:
        """Return (index in ``job.queue``, node) for the next dispatch, or None if nothing fits."""


class LeastLoaded(DispatchPolicy):
    """The first of the job's first ``window`` queued chunks that fits goes to the fitting
    node with the most free credit. A chunk without resource needs costs O(1)."""

    def __init__(self, window: int = 64) -> None:
        super().__init__()
        self.window = window

    def pick(self, job: "Job", free: FreeSlots) -> Optional[Tuple[int, NodeState]]:
        if job.queue and not job.queue[0].resources:  # the common case, without the loop
            node = free.best()
            if node is None:
                return None
            self.examined += 1
            return 0, node
        for index, chunk in enumerate(itertools.islice(job.queue, self.window)):
            if not chunk.resources:
                node = free.best()
                if node is None:
                    return None
                self.examined += 1
                return index, node
            for node in free.descending():
                self.examined += 1
                if node.fits(chunk.resources):
                    return index, node
        return None
