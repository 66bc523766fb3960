"""Host lists for launchers: ``host1,host2:8`` or a hosts file, ``:N`` = worker processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

from achilles.core.errors import ConfigError


@dataclass(frozen=True)
class HostSpec:
    """One node to start: the SSH destination (an ``~/.ssh/config`` alias, ``host`` or
    ``user@host``) and its worker processes (None: the host's CPU count)."""

    destination: str
    processes: Optional[int] = None


def parse_host(text: str) -> HostSpec:
    """``host``, ``user@host`` or either with ``:N`` processes."""
    text = text.strip()
    name, sep, count = text.rpartition(":")
    if not sep:
        name, count = text, ""
    if not name or (sep and not count.isdigit()) or (count and int(count) < 1):
        raise ConfigError(f"a host is written host, user@host or host:N with N >= 1 worker "
                          f"processes; got {text!r}")
    return HostSpec(name, int(count) if count else None)


def parse_hosts(hosts: Union[str, Iterable[Union[str, HostSpec]]]) -> List[HostSpec]:
    """A comma-separated string or a sequence of host strings / :class:`HostSpec`."""
    items: Sequence[Union[str, HostSpec]]
    if isinstance(hosts, str):
        items = [h for h in hosts.split(",") if h.strip()]
    else:
        items = list(hosts)
    specs = [h if isinstance(h, HostSpec) else parse_host(h) for h in items]
    if not specs:
        raise ConfigError("no hosts given")
    return specs


def read_hosts_file(path: str) -> List[HostSpec]:
    """One host per line (``host``, ``user@host``, ``host:N``); blank lines and ``#`` comments
    are skipped."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.split("#", 1)[0].strip() for line in fh]
    except OSError as exc:
        raise ConfigError(f"cannot read the hosts file {path}: {exc.strerror}") from None
    return parse_hosts([line for line in lines if line])
