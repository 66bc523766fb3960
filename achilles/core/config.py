"""Configuration: explicit arguments > environment (``ACHILLES_*``) > a ``.env`` file.

The ``.env`` file is the one in the working directory, or the path in ``ACHILLES_ENV_FILE``.
It is read with python-dotenv and never written into the installed package.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from dotenv import dotenv_values

from achilles.core.errors import ConfigError
from achilles.core.wire import DEFAULT_HEARTBEAT, DEFAULT_MAX_CRASHES, DEFAULT_MAX_FRAME

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999
DEFAULT_USERNAME = "achilles"
DEFAULT_PREFETCH = 2
#: Fast credit units per node process, for the chunks of jobs whose chunks finish quickly.
DEFAULT_FAST_DEPTH = 30
#: Seconds of such work a node may queue per process on fast credit.
DEFAULT_FAST_WINDOW = 0.005
DEFAULT_RECONNECT_TIMEOUT = 60.0
#: A node's longest wait between attempts to reach its server, and while handshakes fail.
DEFAULT_RETRY_MAX_DELAY = 5.0
DEFAULT_REFUSED_RETRY_MAX_DELAY = 30.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_PREAUTH = 1024
DEFAULT_MAX_PREAUTH_PER_SOURCE = 32
DEFAULT_DASHBOARD = "127.0.0.1:8787"
#: Where same-host peers put large map payloads (achilles.core.shm); "off" turns that off.
DEFAULT_SHM_DIR = "/dev/shm"
#: The smallest payload that goes through shared memory.
DEFAULT_SHM_MIN = 256 << 10
ENV_FILE_VAR = "ACHILLES_ENV_FILE"
#: Shortest secret key accepted: one captured handshake lets anyone test guesses offline.
MIN_SECRET_LENGTH = 16

#: Every variable Achilles reads, with what it means (``.env.example`` mirrors this).
VARIABLES: Dict[str, str] = {
    "ACHILLES_HOST": "server address: where nodes and controllers connect, and what the server binds",
    "ACHILLES_PORT": "server TCP port (0 lets the OS pick one; the server prints it)",
    "ACHILLES_USERNAME": "cluster user name: must match, but is not secret (sent in clear; salts the key)",
    "ACHILLES_SECRET_KEY": "shared secret key, at least 16 characters; generate one with `achilles config`",
    "ACHILLES_PROCESSES": "worker processes per node (default: the CPU count)",
    "ACHILLES_PREFETCH": "chunks in flight per node process (default 2)",
    "ACHILLES_FAST_DEPTH": ("extra chunks a node may queue per process for jobs whose chunks "
                            "finish quickly; 0 turns it off (default 30)"),
    "ACHILLES_FAST_WINDOW": ("seconds of such quick work a node may queue per process; a chunk "
                             "counts as quick below this / ACHILLES_FAST_DEPTH (default 0.005)"),
    "ACHILLES_NODE_NAME": "readable node id (default: hostname-pid)",
    "ACHILLES_LOG_LEVEL": "DEBUG, INFO, WARNING or ERROR (default INFO)",
    "ACHILLES_HEARTBEAT": "seconds of silence after which a peer counts as dead (default 10)",
    "ACHILLES_RECONNECT_TIMEOUT": "seconds a controller keeps trying to reach a restarted server (default 60)",
    "ACHILLES_RETRY_MAX_DELAY": ("nodes: longest wait in seconds between attempts to reach the "
                                 "server (default 5, and 30 while its handshakes fail)"),
    "ACHILLES_MAX_CRASHES": "times an item may kill its worker before it fails with WorkerCrashed (default 3)",
    "ACHILLES_MAX_FRAME": ("largest message in bytes, the same on every machine (default 268435456, "
                           "256 MiB); a bigger chunk or result fails on the sending side"),
    "ACHILLES_HANDSHAKE_TIMEOUT": "server: seconds a new connection has to finish the handshake (default 10)",
    "ACHILLES_MAX_PREAUTH": "server: connections allowed in the handshake at once; more are refused (default 1024)",
    "ACHILLES_MAX_PREAUTH_PER_SOURCE": ("server: the same, per source address (an IPv6 /64 counts as one "
                                        "source; default 32)"),
    "ACHILLES_DASHBOARD": ("server: where the web dashboard listens, HOST:PORT or off (default "
                           "127.0.0.1:8787); a non-loopback address requires a token"),
    "ACHILLES_DASHBOARD_TOKEN": ("server: the dashboard's token (default: derived from the secret "
                                 "key; printed at start as a ?token= URL)"),
    "ACHILLES_FORWARD_OUTPUT": ("controllers: print what tasks print and log, prefixed with node "
                                "and item (default 1; 0 turns it off)"),
    "ACHILLES_PROGRESS": "controllers: 1 shows a progress bar for every map and graph call that "
                         "does not pass progress= (default 0)",
    "ACHILLES_SHM_DIR": ("where processes on one host pass large map payloads as shared-memory "
                         "segments instead of through the server's sockets (default /dev/shm; "
                         "off sends every payload over the network path; set on every process)"),
    "ACHILLES_SHM_MIN": ("smallest payload in bytes sent as a shared-memory segment (default "
                         "262144)"),
    "ACHILLES_TLS_CERT": "server: its TLS certificate (PEM); turns TLS on",
    "ACHILLES_TLS_KEY": "server: the key of ACHILLES_TLS_CERT",
    "ACHILLES_TLS_CLIENT_CA": "server: require client certificates signed by this CA (mutual TLS)",
    "ACHILLES_TLS_CA": "nodes and controllers: connect with TLS and verify the server against this CA",
    "ACHILLES_TLS_CLIENT_CERT": "nodes and controllers: client certificate for mutual TLS",
    "ACHILLES_TLS_CLIENT_KEY": "nodes and controllers: the key of ACHILLES_TLS_CLIENT_CERT",
}
TLS_FIELDS = ("tls_cert", "tls_key", "tls_client_ca", "tls_ca", "tls_client_cert", "tls_client_key")


@dataclass
class Config:
    """Resolved settings for one server, node or controller. ``repr`` never shows the secret."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    username: str = DEFAULT_USERNAME
    secret_key: Optional[str] = field(default=None, repr=False)
    processes: Optional[int] = None
    prefetch: int = DEFAULT_PREFETCH
    fast_depth: int = DEFAULT_FAST_DEPTH
    fast_window: float = DEFAULT_FAST_WINDOW
    node_name: Optional[str] = None
    log_level: str = "INFO"
    heartbeat: float = DEFAULT_HEARTBEAT
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
    retry_max_delay: Optional[float] = None
    max_crashes: int = DEFAULT_MAX_CRASHES
    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_preauth: int = DEFAULT_MAX_PREAUTH
    max_preauth_per_source: int = DEFAULT_MAX_PREAUTH_PER_SOURCE
    dashboard: str = DEFAULT_DASHBOARD
    dashboard_token: Optional[str] = field(default=None, repr=False)
    forward_output: bool = True
    progress: bool = False
    #: ACHILLES_SHM_DIR and ACHILLES_SHM_MIN (None: from the environment, else the defaults).
    shm_dir: Optional[str] = None
    shm_min: Optional[int] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    tls_ca: Optional[str] = None
    tls_client_cert: Optional[str] = None
    tls_client_key: Optional[str] = None
    env_file: Optional[str] = None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
            if f.name not in ("secret_key", "dashboard_token")
        )
        secret = "set" if self.secret_key else "unset"
        return f"Config({shown}, secret_key=<{secret}>)"

    def server_tls(self) -> Any:
        """Twisted TLS options for the server, or None when TLS is off."""
        if not (self.tls_cert or self.tls_key):
            return None
        if not (self.tls_cert and self.tls_key):
            raise ConfigError("TLS needs both ACHILLES_TLS_CERT and ACHILLES_TLS_KEY "
                              "(--tls-cert and --tls-key)")
        from achilles.core.tls import server_context

        return server_context(self.tls_cert, self.tls_key, self.tls_client_ca)

    def client_tls(self) -> Any:
        """Twisted TLS options for a node or controller, or None when TLS is off."""
        if not self.tls_ca:
            if self.tls_client_cert or self.tls_client_key:
                raise ConfigError("a TLS client certificate needs ACHILLES_TLS_CA (--tls-ca) "
                                  "to verify the server")
            return None
        from achilles.core.tls import client_context

        return client_context(self.host, self.tls_ca, self.tls_client_cert, self.tls_client_key)

    def require_secret(self) -> str:
        """Return the secret key, or raise :class:`ConfigError` saying how to set one
        (none set, or shorter than :data:`MIN_SECRET_LENGTH`)."""
        where = f" (read {self.env_file})" if self.env_file else ""
        if not self.secret_key:
            raise ConfigError(
                "no secret key: set ACHILLES_SECRET_KEY, pass secret_key=, or run "
                f"`achilles config` to write a .env with a fresh secret{where}"
            )
        return check_secret(self.secret_key, where)


def check_secret(secret_key: str, where: str = "") -> str:
    """Return ``secret_key`` if it is long enough to resist guessing, else raise
    :class:`ConfigError` saying how to generate one (the message never contains the secret)."""
    if not isinstance(secret_key, str) or len(secret_key) < MIN_SECRET_LENGTH:
        length = len(secret_key) if isinstance(secret_key, (str, bytes)) else 0
        raise ConfigError(
            f"the secret key (ACHILLES_SECRET_KEY) is too short: {length} characters, at least "
            f"{MIN_SECRET_LENGTH} needed, since a weak secret can be guessed offline; run "
            "`achilles config` to write a .env with a fresh random one, or use "
            f"python3 -c \"import secrets; print(secrets.token_urlsafe(32))\"{where}"
        )
    return secret_key


def write_file_safely(path: str, data: bytes, overwrite: bool = False, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with exactly ``mode`` (default 0600), never through a link.

    Without ``overwrite`` the file must not exist yet; with it, an existing regular file that
    this user owns is replaced in place. A symbolic link, a hard-linked or foreign-owned file
    or anything else at ``path`` raises :class:`ConfigError` and nothing is written.
    """
    # O_NONBLOCK: opening a FIFO planted at path must fail rather than wait for a reader.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if not overwrite:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise ConfigError(f"{path} is a symbolic link; refusing to write through "
                              "it: remove the link or choose another path") from None
        if exc.errno == errno.EEXIST:
            raise ConfigError(f"{path} exists; pass overwrite=True (or --force) to replace it") from None
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise ConfigError(f"{path} is not a plain file of this user's (another owner, "
                              "several hard links, or not a regular file); refusing to write "
                              "into it: remove it or choose another path")
        os.fchmod(fd, mode)
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _env_file_path(explicit: Optional[str] = None) -> Optional[str]:
    path = explicit or os.environ.get(ENV_FILE_VAR)
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"{ENV_FILE_VAR}={path} does not name a readable file")
        return path
    local = os.path.join(os.getcwd(), ".env")
    return local if os.path.isfile(local) else None


def _read_env_file(path: str) -> Dict[str, Optional[str]]:
    """The variables of ``path``, warning first if other users can read or change it."""
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        _warn_if_unsafe(path, os.fstat(fh.fileno()))
        return dotenv_values(stream=fh)


def _warn_if_unsafe(path: str, st: os.stat_result) -> None:
    """Warn when the file's permissions or owner let someone else read the secret or choose
    the server and secret this process trusts (root-owned files are trusted)."""
    if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(
            f"{path} is readable by other users and holds the cluster secret; run `chmod 600 {path}`",
            stacklevel=4,
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        warnings.warn(
            f"{path} is writable by other users, who could set the server address and secret "
            f"this process trusts; run `chmod 600 {path}`",
            stacklevel=4,
        )
    if st.st_uid not in (os.geteuid(), 0):
        warnings.warn(
            f"{path} is owned by another user (uid {st.st_uid}), who could set the server "
            "address and secret this process trusts; use a .env you own (`achilles config` "
            "writes one)",
            stacklevel=4,
        )


def _as_number(name: str, value: Any, minimum: float, kind: type = int) -> Any:
    """``value`` as ``kind`` (int or float) no smaller than ``minimum``, or a ConfigError."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number of seconds"
        raise ConfigError(f"{name} must be {what}, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {number:g}")
    return number


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def as_flag(name: str, value: Any, default: bool) -> bool:
    """An on/off setting: a bool, or ``1/true/yes/on`` and ``0/false/no/off`` in any case;
    ``default`` when unset (None or empty); anything else is a ConfigError."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {value!r}")


def forward_output_default() -> bool:
    """Whether task output is forwarded unless a call says otherwise: ACHILLES_FORWARD_OUTPUT
    from the environment (default on)."""
    return as_flag("ACHILLES_FORWARD_OUTPUT", os.environ.get("ACHILLES_FORWARD_OUTPUT"), True)


def load_config(**overrides: Any) -> Config:
    """Resolve the configuration; keyword arguments that are not None win over everything.

    ``env_file=PATH`` reads that file instead of ``ACHILLES_ENV_FILE`` or ``./.env``."""
    env_file = _env_file_path(overrides.pop("env_file", None))
    file_values: Dict[str, Optional[str]] = {}
    if env_file:
        file_values = _read_env_file(env_file)

    def pick(key: str, var: str) -> Any:
        if overrides.get(key) is not None:
            return overrides[key]
        if os.environ.get(var):
            return os.environ[var]
        return file_values.get(var) or None

    def number(key: str, default: Any, minimum: float, kind: type = int) -> Any:
        var = "ACHILLES_" + key.upper()
        value = pick(key, var)
        return default if value is None else _as_number(var, value, minimum, kind)

    cfg = Config(env_file=env_file)
    cfg.host = pick("host", "ACHILLES_HOST") or DEFAULT_HOST
    cfg.port = number("port", DEFAULT_PORT, 0)
    if cfg.port > 65535:
        raise ConfigError(f"ACHILLES_PORT must be at most 65535, got {cfg.port}")
    cfg.username = pick("username", "ACHILLES_USERNAME") or DEFAULT_USERNAME
    cfg.secret_key = pick("secret_key", "ACHILLES_SECRET_KEY")
    cfg.processes = number("processes", None, 1)
    cfg.prefetch = number("prefetch", DEFAULT_PREFETCH, 1)
    cfg.fast_depth = number("fast_depth", DEFAULT_FAST_DEPTH, 0)
    cfg.fast_window = number("fast_window", DEFAULT_FAST_WINDOW, 1e-6, float)
    cfg.node_name = pick("node_name", "ACHILLES_NODE_NAME")
    cfg.log_level = str(pick("log_level", "ACHILLES_LOG_LEVEL") or "INFO").upper()
    cfg.heartbeat = number("heartbeat", DEFAULT_HEARTBEAT, 0.2, float)
    cfg.reconnect_timeout = number("reconnect_timeout", DEFAULT_RECONNECT_TIMEOUT, 0, float)
    cfg.retry_max_delay = number("retry_max_delay", None, 0.01, float)
    cfg.max_crashes = number("max_crashes", DEFAULT_MAX_CRASHES, 1)
    cfg.max_frame = number("max_frame", DEFAULT_MAX_FRAME, 1 << 16)
    cfg.handshake_timeout = number("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT, 0.1, float)
    cfg.max_preauth = number("max_preauth", DEFAULT_MAX_PREAUTH, 1)
    cfg.max_preauth_per_source = number("max_preauth_per_source", DEFAULT_MAX_PREAUTH_PER_SOURCE, 1)
    cfg.dashboard = str(pick("dashboard", "ACHILLES_DASHBOARD") or DEFAULT_DASHBOARD)
    cfg.dashboard_token = pick("dashboard_token", "ACHILLES_DASHBOARD_TOKEN")
    cfg.forward_output = as_flag("ACHILLES_FORWARD_OUTPUT",
                                 pick("forward_output", "ACHILLES_FORWARD_OUTPUT"), True)
    cfg.progress = as_flag("ACHILLES_PROGRESS", pick("progress", "ACHILLES_PROGRESS"), False)
    cfg.shm_dir = pick("shm_dir", "ACHILLES_SHM_DIR")
    cfg.shm_min = number("shm_min", None, 1)
    for name in TLS_FIELDS:
        setattr(cfg, name, pick(name, "ACHILLES_" + name.upper()))
    return cfg



def gen_config(
    path: str = ".env",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    username: str = DEFAULT_USERNAME,
    secret_key: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Write a ``.env`` (mode 0600) with a fresh secret unless one is given; return its path.

    Copy the file to every machine of the cluster (server, nodes, controllers). The file is
    never written through a symbolic link (see :func:`write_file_safely`).
    """
    path = os.path.abspath(path)
    key = check_secret(secret_key) if secret_key else secrets.token_urlsafe(32)
    text = (
        "# Achilles cluster configuration (keep this file private: it holds the secret)\n"
        f"ACHILLES_HOST={host}\n"
        f"ACHILLES_PORT={port}\n"
        f"ACHILLES_USERNAME={username}\n"
        f"ACHILLES_SECRET_KEY={key}\n"
    )
    write_file_safely(path, text.encode("utf-8"), overwrite=overwrite)
    return path


def node_default_name() -> str:
    """``hostname-pid``: the default readable node id."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def cpu_count() -> int:
    """Usable CPUs of this process: what SLURM allotted in a SLURM job (``SLURM_CPUS_PER_TASK``,
    else ``SLURM_CPUS_ON_NODE``), otherwise the CPUs this process may run on (affinity-aware)."""
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def is_interactive() -> bool:
    """Whether stdin is a terminal a human can answer on."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False
