"""Exception types raised by Achilles.

Every error a user can meet is an :class:`AchillesError`, with a one-line message that says
what to fix. A failing task raises its *own* exception type in the caller; only when that
exception cannot be rebuilt does :class:`RemoteError` stand in for it.
"""

from __future__ import annotations

from typing import Optional


class AchillesError(Exception):
    """Base class of every error Achilles raises itself."""


class ConfigError(AchillesError):
    """The configuration is missing or invalid (no secret key, bad port, unreadable .env)."""


class ConnectionFailed(AchillesError):
    """The server could not be reached."""


class ServerBusy(ConnectionFailed):
    """The server took the connection and dropped it before its greeting: it is over its
    pre-auth connection caps (ACHILLES_MAX_PREAUTH, ACHILLES_MAX_PREAUTH_PER_SOURCE), so
    trying again shortly may succeed."""


class AuthenticationError(AchillesError):
    """A peer failed to prove the shared secret (either direction) or used the wrong protocol."""


class ProtocolError(AchillesError):
    """A peer sent a frame that breaks the wire protocol."""


class FrameTooLarge(AchillesError):
    """A message would be larger than ACHILLES_MAX_FRAME allows."""


class ConnectionLost(AchillesError):
    """The connection to the server was lost while work was outstanding."""

    def __init__(self, message: str, done: int = 0) -> None:
        super().__init__(message)
        self.done = done


class JobCancelled(AchillesError):
    """The job was cancelled (by the caller, another error, or the cluster shutting down)."""


class RemoteTraceback(Exception):
    """Carries a remote traceback's text; set as ``__cause__`` of a re-raised task error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(AchillesError):
    """A task failed with an exception that could not be rebuilt in the caller."""

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback


class WorkerCrashed(AchillesError):
    """A task killed its worker process (os._exit, segfault, OOM) too many times."""

    def __init__(self, message: str, item: Optional[int] = None) -> None:
        super().__init__(message)
        self.item = item


class ResourceUnavailable(AchillesError):
    """A task asks for resources (``resources={"gpu": 1}``) that no connected node offers."""


class TaskTimeout(AchillesError):
    """A task ran past its deadline; its worker process was killed and replaced."""


def describe_exit(exitcode: Optional[int]) -> str:
    """A process exit code in words: ``killed by SIGSEGV`` or ``exit code 3``."""
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
