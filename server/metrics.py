"""``/metrics``: the monitor's figures in the Prometheus text format, via ``prometheus_client``.

Each scrape reads the scheduler and :class:`~achilles.server.monitor.Monitor` afresh (a
custom collector in a registry of its own, not the process-wide default). Names follow the
Prometheus conventions: ``achilles_`` prefix, base units (seconds, bytes), ``_total`` for
counters.
"""

from __future__ import annotations

import collections
from typing import Any, Dict, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from achilles.server.monitor import Monitor

#: The ``Content-Type`` of :func:`render`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MonitorCollector(Collector):
    """Yields the cluster's metrics from a :class:`Monitor` at each scrape."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        sched = m.scheduler
        nodes = list(sched.nodes.values())
        yield GaugeMetricFamily("achilles_nodes", "Nodes connected", value=len(nodes))
        yield GaugeMetricFamily("achilles_processes", "Worker processes across all nodes",
                                value=sched.processes)
        yield GaugeMetricFamily("achilles_processes_busy", "Worker processes with a chunk",
                                value=sum(min(len(n.inflight), n.processes) for n in nodes))
        yield GaugeMetricFamily("achilles_chunks_in_flight", "Chunks handed to nodes, not yet "
                                "answered", value=sum(len(n.inflight) for n in nodes))
        yield GaugeMetricFamily("achilles_chunks_queued", "Chunks waiting for a node",
                                value=sum(len(j.queue) for j in sched.jobs.values()))
        jobs: Dict[str, int] = collections.Counter(j.kind for j in sched.jobs.values())
        running = GaugeMetricFamily("achilles_jobs_running", "Jobs and graphs running",
                                    labels=["kind"])
        for kind in sorted({"map", "graph", "pipeline"} | set(jobs)):
            running.add_metric([kind], jobs.get(kind, 0))
        yield running
        ended = CounterMetricFamily("achilles_jobs_ended", "Jobs and graphs that ended",
                                    labels=["state"])
        for state in ("done", "cancelled"):
            ended.add_metric([state], m.jobs_ended.get(state, 0))
        yield ended
        tasks = CounterMetricFamily("achilles_tasks", "Work settled: items done, chunks failed "
                                    "(a graph task is one item and one chunk)", labels=["state"])
        tasks.add_metric(["done"], m.items_done())
        tasks.add_metric(["failed"], m.chunks_failed)
        yield tasks
        yield CounterMetricFamily("achilles_worker_crashes", "Worker processes killed by a task",
                                  value=m.worker_crashes)
        yield CounterMetricFamily("achilles_task_timeouts", "Chunks that ran past their timeout",
                                  value=m.timeouts)
        relayed = CounterMetricFamily("achilles_relayed_bytes", "Task payload bytes relayed",
                                      labels=["direction"])
        relayed.add_metric(["to_nodes"], m.bytes_from_controllers)
        relayed.add_metric(["to_controllers"], m.bytes_from_nodes)
        yield relayed
        yield CounterMetricFamily("achilles_handshake_failures", "Connections refused during "
                                  "the handshake", value=m.handshake_failures)
        hist = m.durations
        buckets = [(_bound(b), c) for b, c in zip(hist.bounds, hist.counts)]
        yield HistogramMetricFamily("achilles_job_duration_seconds", "Wall time of finished jobs",
                                    buckets=buckets, sum_value=hist.sum)
        done = CounterMetricFamily("achilles_node_tasks_done", "Items a node completed",
                                   labels=["node"])
        for n in nodes:
            done.add_metric([n.name], n.done)
        yield done


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def registry_for(monitor: Monitor) -> CollectorRegistry:
    """A registry holding only this server's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor))
    return registry


def render(registry: Any) -> bytes:
    """The registry's metrics in the text exposition format."""
    return generate_latest(registry)
