"""Garbage-collector settings for the long-running daemons (server and node reactor processes).

CPython's cyclic collector runs a young collection every 700 net container allocations, and a
full one when enough objects have survived; a full collection walks every object the process
holds. A server with 1,000 nodes connected holds a few hundred thousand (Twisted's modules, each
connection's protocol, transport, session and scheduler state), so each full collection took
~50 ms of its one reactor thread, and collections cost ~6 % of its CPU while dispatching
chunks (``bench/swarm.py``). Two changes take most of that away:

- :func:`gc.freeze` once the daemon has started: what it allocated at start (modules,
  configuration) lives as long as the process, so no collection needs to walk it again;
- young collections every :data:`YOUNG_THRESHOLD` allocations instead of 700, so fewer
  short-lived frames and messages survive into older generations and full collections become
  rare.

Worker processes, where users' code runs, keep CPython's defaults: they start from the node's
fork server, a fresh interpreter, not from the tuned reactor process.
"""

from __future__ import annotations

import gc

#: Net container allocations between two young collections in a daemon (CPython's is 700).
YOUNG_THRESHOLD = 10_000
#: CPython's own thresholds, which processes running users' code keep.
CPYTHON_THRESHOLDS = (700, 10, 10)


def settle() -> None:
    """Tune the collector for a daemon that has finished starting (call once, before its
    reactor runs): collect what start-up left, freeze the rest, make young collections rarer."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
