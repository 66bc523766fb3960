"""``achilles-node``: run a worker node."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Dict, List, Optional

from achilles.core import shm
from achilles.core.cli_common import add_client_tls_options, add_connection_options, run_main
from achilles.core.config import cpu_count, load_config, node_default_name
from achilles.core.errors import ConfigError
from achilles.core.gctune import settle as settle_gc
from achilles.core.logs import setup_logging

log = logging.getLogger("achilles.node")


def parse_resources(text: Optional[str]) -> Dict[str, float]:
    """``gpu=1,ram=64`` -> ``{"gpu": 1.0, "ram": 64.0}``."""
    out: Dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--resources wants name=number pairs like gpu=1,ram=64; got {part!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    """The node's command line."""
    parser = argparse.ArgumentParser(
        prog="achilles-node",
        description="Run an Achilles node. The secret key is read from ACHILLES_SECRET_KEY or .env.")
    add_connection_options(parser)
    parser.add_argument("--processes", type=int,
                        help="worker processes (env ACHILLES_PROCESSES, default: the CPU count)")
    parser.add_argument("--name", help="readable node id (env ACHILLES_NODE_NAME, default hostname-pid)")
    parser.add_argument("--heartbeat", type=float,
                        help="seconds of silence before the server counts as dead (env ACHILLES_HEARTBEAT, default 10)")
    parser.add_argument("--retry-max-delay", type=float,
                        help="longest wait in seconds between attempts to reach the server "
                        "(env ACHILLES_RETRY_MAX_DELAY, default 5, and 30 while its handshakes fail)")
    parser.add_argument("--resources", help="what this node offers, e.g. gpu=1,ram=64")
    add_client_tls_options(parser)
    parser.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> int:
    """Connect and serve until stopped."""
    cfg = load_config(host=args.host, port=args.port, username=args.username,
                      log_level=args.log_level, processes=args.processes, node_name=args.name,
                      heartbeat=args.heartbeat, retry_max_delay=args.retry_max_delay,
                      tls_ca=args.tls_ca, tls_client_cert=args.tls_cert,
                      tls_client_key=args.tls_key)
    secret = cfg.require_secret()
    tls = cfg.client_tls()
    resources = parse_resources(args.resources)
    setup_logging(cfg.log_level, "node")
    from achilles.core.reactor import get_reactor, lean_events
    from achilles.node.client import NodeFactory

    reactor = get_reactor()
    lean_events(reactor)

    name = cfg.node_name or node_default_name()
    processes = cfg.processes or cpu_count()
    factory = NodeFactory(name, processes, cfg.username, secret, f"{cfg.host}:{cfg.port}", resources,
                          heartbeat=cfg.heartbeat, max_frame=cfg.max_frame,
                          retry_max_delay=cfg.retry_max_delay, shm_dir=cfg.shm_dir,
                          shm_min=cfg.shm_min)
    try:
        if tls is None:
            reactor.connectTCP(cfg.host, cfg.port, factory)
        else:
            reactor.connectSSL(cfg.host, cfg.port, factory, tls)
        if args.exit_with_stdin:
            from achilles.core.lifeline import exit_with_stdin

            exit_with_stdin(factory.stop)
        settle_gc()
        reactor.run()
    finally:
        factory.stages.close()
        factory.pool.close()
        shm.remove_owned(factory.shm_dir, os.getpid())  # result segments nobody will read
    log.info("node %s stopped", name)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``achilles-node``."""
    return run_main(run, build_parser(), argv)
