"""Logging setup shared by the daemons (stdlib logging; Twisted's own log is bridged into it)."""

from __future__ import annotations

import logging
import sys

from achilles.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str, role: str) -> None:
    """Log to stderr as ``time role level message``."""
    level = level.upper()
    if level not in LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {role} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")],
                                     redirectStandardIO=False)
    logging.getLogger("twisted").setLevel(max(logging.getLogger().level, logging.WARNING))
