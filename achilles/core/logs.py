"""Logging setup shared by the daemons (stdlib logging; Twisted's own log is bridged into it),
and :func:`printable`, which every piece of peer-supplied text passes through before it is
logged or put into an error message."""

from __future__ import annotations

import logging
import sys
from typing import Any

from achilles.core.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    named = _NAMED_ESCAPES.get(ch)
    if named is not None:
        return named
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object, limit: int = 200) -> str:
    """``text`` made safe to log: one line, at most ``limit`` characters (plus ``...``).

    Control characters, Unicode line and paragraph separators, bidi overrides and every
    other non-printable character become backslash escapes (``\\n``, ``\\x1b``,
    ``\\u2028``), so peer-supplied text can neither forge a log line nor pass an escape
    sequence to a terminal. Backslashes are kept as they are, which makes ``printable``
    idempotent: text already passed through it is not escaped twice. Non-strings are
    converted with ``str``.
    """
    if not isinstance(text, str):
        text = str(text)
    if len(text) <= limit and text.isprintable():
        return text  # the common case, without a pass per character
    out = []
    size = 0
    for ch in text:
        piece = _escape(ch)
        if size + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


class OneRecordPerLineFormatter(logging.Formatter):
    """A formatter after which every log line that does not start with the record prefix is a
    continuation: extra lines in a message are indented, other non-printable characters
    escaped. A safety net behind :func:`printable`; tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if not message.isprintable():
            lines = message.splitlines()
            message = "\n    ".join(
                "".join(ch if ch.isprintable() or ch == "\t" else _escape(ch) for ch in line)
                for line in lines)
            record.message = message
        return super().formatMessage(record)


def setup_logging(level: str, role: str) -> None:
    """Log to stderr as ``time role level message``."""
    level = level.upper()
    if level not in LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneRecordPerLineFormatter(f"%(asctime)s {role} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    # STDLibLogObserver provides ILogObserver through zope's @implementer, which mypy cannot
    # see without the mypy-zope plugin.
    observer: Any = STDLibLogObserver(name="twisted")
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    logging.getLogger("twisted").setLevel(max(logging.getLogger().level, logging.WARNING))
