"""``achilles-server``: run the server daemon."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import Any, List, Optional, Tuple

from achilles.core.cli_common import add_connection_options, run_main
from achilles.core.config import load_config
from achilles.core.errors import ConfigError
from achilles.core.gctune import settle as settle_gc
from achilles.core.logs import setup_logging

log = logging.getLogger("achilles.server")


def build_parser() -> argparse.ArgumentParser:
    """The server's command line."""
    parser = argparse.ArgumentParser(
        prog="achilles-server",
        description="Run the Achilles server. The secret key is read from ACHILLES_SECRET_KEY or .env.")
    add_connection_options(parser)
    parser.add_argument("--prefetch", type=int,
                        help="chunks in flight per node process (env ACHILLES_PREFETCH, default 2)")
    parser.add_argument("--fast-depth", type=int,
                        help="extra chunks a node may queue per process for jobs whose chunks "
                             "finish quickly; 0 turns it off (env ACHILLES_FAST_DEPTH, default 30)")
    parser.add_argument("--fast-window", type=float,
                        help="seconds of such quick work a node may queue per process "
                             "(env ACHILLES_FAST_WINDOW, default 0.005)")
    parser.add_argument("--heartbeat", type=float,
                        help="seconds of silence before a peer counts as dead (env ACHILLES_HEARTBEAT, default 10)")
    parser.add_argument("--max-crashes", type=int,
                        help="times an item may kill its worker (env ACHILLES_MAX_CRASHES, default 3)")
    parser.add_argument("--tls-cert", help="TLS certificate (PEM); turns TLS on (env ACHILLES_TLS_CERT)")
    parser.add_argument("--tls-key", help="key of --tls-cert (env ACHILLES_TLS_KEY)")
    parser.add_argument("--tls-client-ca",
                        help="require client certificates signed by this CA (env ACHILLES_TLS_CLIENT_CA)")
    parser.add_argument("--dashboard", metavar="HOST:PORT",
                        help="serve the web dashboard there, or 'off' (env ACHILLES_DASHBOARD, "
                             "default 127.0.0.1:8787; off loopback it asks for a token)")
    parser.add_argument("--port-file", help="write the port actually bound to this file")
    parser.add_argument("--dashboard-url-file", help=argparse.SUPPRESS)
    parser.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    return parser


#: Descriptors the server needs besides pre-auth connections (listening socket, logs, peers).
FD_HEADROOM = 256


def raise_fd_limit() -> Tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after).

    Every connection, also one that never authenticates, holds a file descriptor; a low soft
    limit would let a handful of idle sockets lock nodes and controllers out.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as fh:
                target = int(fh.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit from %d to %d: %s", soft, target, exc)
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only listens on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_warnings(host: str, tls: bool, max_preauth: int) -> None:
    """Raise the open file limit and log it; warn about settings that put the server at risk."""
    before, limit = raise_fd_limit()
    if limit >= 0:
        raised = f" (raised from {before})" if limit != before else ""
        log.info("open file limit: %d%s: room for %d nodes and controllers (one descriptor "
                 "each)", limit, raised, max(0, limit - max_preauth - FD_HEADROOM))
        if limit < max_preauth + FD_HEADROOM:
            log.warning("the open file limit (%d) leaves little room beyond ACHILLES_MAX_PREAUTH=%d "
                        "connections in the handshake; raise the hard limit (ulimit -Hn) or lower "
                        "ACHILLES_MAX_PREAUTH", limit, max_preauth)
    if not tls and not is_loopback(host):
        log.warning("listening on %s without TLS: jobs, results and the cluster's traffic are "
                    "readable by anyone on the path; use TLS (--tls-cert/--tls-key, certificates "
                    "from `achilles certs DIR`)", host)


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees it half written."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def serve(args: argparse.Namespace) -> int:
    """Listen and run until stopped (SIGTERM, SIGINT, or a controller's kill)."""
    cfg = load_config(host=args.host, port=args.port, username=args.username,
                      log_level=args.log_level, prefetch=args.prefetch, heartbeat=args.heartbeat,
                      fast_depth=args.fast_depth, fast_window=args.fast_window,
                      max_crashes=args.max_crashes, tls_cert=args.tls_cert, tls_key=args.tls_key,
                      tls_client_ca=args.tls_client_ca, dashboard=args.dashboard)
    secret = cfg.require_secret()
    tls = cfg.server_tls()
    setup_logging(cfg.log_level, "server")
    from twisted.internet.error import CannotListenError

    from achilles.core.reactor import get_reactor, lean_events
    from achilles.server.service import ServerFactory

    reactor = get_reactor()
    lean_events(reactor)

    startup_warnings(cfg.host, tls is not None, cfg.max_preauth)
    factory = ServerFactory(cfg.username, secret, prefetch=cfg.prefetch, heartbeat=cfg.heartbeat,
                            fast_depth=cfg.fast_depth, fast_window=cfg.fast_window,
                            max_crashes=cfg.max_crashes, handshake_timeout=cfg.handshake_timeout,
                            max_preauth=cfg.max_preauth,
                            max_preauth_per_source=cfg.max_preauth_per_source,
                            max_frame=cfg.max_frame)
    relay = _shared_memory(factory.auth_key, reactor, cfg.shm_dir)
    factory.scheduler.shm = relay
    try:
        if tls is None:
            port = reactor.listenTCP(cfg.port, factory, interface=cfg.host)
        else:
            port = reactor.listenSSL(cfg.port, factory, tls, interface=cfg.host)
    except CannotListenError as exc:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.socketError}; "
                          "pick another --port or stop what holds it") from None
    bound = port.getHost().port
    log.info("listening on %s:%d (user %s, %s)", cfg.host, bound, cfg.username,
             "plain TCP" if tls is None else
             "mutual TLS" if cfg.tls_client_ca else "TLS")
    from achilles.server.dashboard import serve_dashboard
    from achilles.core.tls import server_context

    web_tls = server_context(cfg.tls_cert, cfg.tls_key) if tls is not None and cfg.tls_cert \
        and cfg.tls_key else None
    url = serve_dashboard(factory.monitor, cfg.dashboard, secret, cfg.dashboard_token, web_tls,
                          required=bool(args.dashboard or os.environ.get("ACHILLES_DASHBOARD")))
    if args.dashboard_url_file:
        write_atomically(args.dashboard_url_file, url or "")
    if args.port_file:
        write_atomically(args.port_file, str(bound))
    if args.exit_with_stdin:
        from achilles.core.lifeline import exit_with_stdin


        def stop() -> None:
            if reactor.running:
                reactor.stop()

        exit_with_stdin(stop)
    settle_gc()
    try:
        reactor.run()
    finally:
        if relay is not None:
            relay.close()
    log.info("server stopped")
    return 0


def _shared_memory(auth_key: bytes, clock: Any, setting: Optional[str]) -> Any:
    """This server's shared-memory probe and relay (:mod:`achilles.server.shmrelay`), or
    None when shared memory is off or unusable here. Segments of processes that are gone
    (a server killed before this one, say) are swept first."""
    from achilles.core import shm
    from achilles.server.shmrelay import ShmRelay

    path = shm.directory(setting)
    if path is None:
        return None
    shm.sweep(path)
    try:
        return ShmRelay(path, auth_key, clock)
    except OSError as exc:
        log.warning("shared memory is off: cannot publish a probe in %s (%s)", path,
                    exc.strerror)
        return None


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``achilles-server``."""
    return run_main(serve, build_parser(), argv)
