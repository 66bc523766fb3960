"""Start nodes on the user's infrastructure: :class:`SSHCluster` (hosts over SSH) and
:class:`SlurmCluster` (nodes as a SLURM job), each with a server on this machine."""

from typing import Any

__all__ = ["SSHCluster", "SlurmCluster"]


def __getattr__(name: str) -> Any:
    if name == "SSHCluster":
        from achilles.launch.ssh import SSHCluster

        return SSHCluster
    if name == "SlurmCluster":
        from achilles.launch.slurm import SlurmCluster

        return SlurmCluster
    raise AttributeError(f"module 'achilles.launch' has no attribute {name!r}")
