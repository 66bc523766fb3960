"""Achilles: distributed ``multiprocessing.Pool`` — map / imap / imap_unordered across machines.

>>> import achilles
>>> with achilles.connect() as cluster:          # ACHILLES_* settings or .env
...     cluster.map(lambda x: x * x, range(10))
"""

from achilles import _layout

_layout.install(__path__[0])

from achilles.api import (  # noqa: E402
    connect, default_cluster, imap, imap_unordered, kill_cluster, map, report_progress, status,
)
from achilles.core.config import gen_config, load_config  # noqa: E402
from achilles.flows import dataflow  # noqa: E402
from achilles.graph import TaskCall, task, workflow  # noqa: E402
from achilles.pipelines import (  # noqa: E402
    EZ, As, Broadcast, F, Parallel, Pipeline, Serial, Stage, StageError, pipeline,
)
from achilles.core.errors import (  # noqa: E402
    AchillesError, AuthenticationError, ConfigError, ConnectionFailed, ConnectionLost,
    FrameTooLarge, JobCancelled, ProtocolError, RemoteError, ResourceUnavailable, TaskTimeout, WorkerCrashed,
)

__version__ = "0.1.0"

__all__ = [
    "task", "workflow", "dataflow", "TaskCall", "connect", "map", "imap", "imap_unordered", "status", "kill_cluster", "LocalCluster",
    "Pool", "Executor",
    "pipeline", "EZ", "Pipeline", "Stage", "F", "As", "Serial", "Parallel", "Broadcast", "StageError",
    "SSHCluster", "SlurmCluster", "report_progress",
    "gen_config", "load_config", "default_cluster",
    "AchillesError", "AuthenticationError", "ConfigError", "ConnectionFailed", "ConnectionLost",
    "FrameTooLarge", "JobCancelled", "ProtocolError", "RemoteError", "ResourceUnavailable", "TaskTimeout",
    "WorkerCrashed",
]


def __getattr__(name: str):
    if name == "LocalCluster":
        from achilles.local import LocalCluster

        return LocalCluster
    if name == "Pool":
        from achilles.pool import Pool

        return Pool
    if name == "Executor":
        from achilles.executor import Executor

        return Executor
    if name == "SSHCluster":
        from achilles.launch.ssh import SSHCluster

        return SSHCluster
    if name == "SlurmCluster":
        from achilles.launch.slurm import SlurmCluster

        return SlurmCluster
    raise AttributeError(f"module 'achilles' has no attribute {name!r}")
