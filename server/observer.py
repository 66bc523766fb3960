"""What the scheduler tells an onlooker (the dashboard's monitor): rare events only.

The scheduler calls these at node joins and losses, job starts and ends, and failed or crashed
chunks; never per successful chunk, so watching costs the hot path nothing. The base class
ignores everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from achilles.server.dispatch import NodeState
    from achilles.server.jobs import Chunk, Job


class SchedulerObserver:
    """Receives the scheduler's events; every method is a no-op here."""

    def node_joined(self, node: "NodeState") -> None:
        """``node`` authenticated and registered."""

    def node_lost(self, node: "NodeState", requeued: int) -> None:
        """``node`` is gone; ``requeued`` chunks it held went back to their queues."""

    def job_started(self, job: "Job") -> None:
        """A map job or graph started."""

    def job_ended(self, job: "Job", reason: Optional[str] = None) -> None:
        """A job finished (``job.state == "done"``) or was cancelled (``reason`` says why)."""

    def chunk_failed(self, job: "Job", chunk: "Chunk", status: int, node: "NodeState",
                     detail: Any = None) -> None:
        """A chunk ended with a non-OK ``status`` (crash details in ``detail``)."""

    def worker_crashed(self, job: "Job", chunk: "Chunk", node: "NodeState", exitcode: Any,
                       retrying: bool) -> None:
        """Running ``chunk`` killed a worker on ``node``; it is retried when ``retrying``."""
