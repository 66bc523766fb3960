"""``achilles``: one command for every role — server, node, config, demo, status, top, kill, up,
down."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from achilles.core.cli_common import add_client_tls_options, add_connection_options, run_main
from achilles.core.errors import AchillesError
from achilles.launch.cli import add_down_parser, add_up_parser

COMMANDS = ("server", "node", "config", "certs", "demo", "status", "top", "kill", "up", "down")


def _config(args: argparse.Namespace) -> int:
    from achilles.core.config import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_USERNAME, gen_config

    path = gen_config(args.path, host=args.host or DEFAULT_HOST,
                      port=DEFAULT_PORT if args.port is None else args.port,
                      username=args.username or DEFAULT_USERNAME, overwrite=args.force)
    print(f"wrote {path} (mode 0600) with a fresh secret key; copy it to every machine of the "
          "cluster (server, nodes, controllers) and keep it private")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from achilles.core.tls import generate_certs

    hosts = args.host or ["127.0.0.1", "localhost"]
    paths = generate_certs(args.directory, hosts=hosts, overwrite=args.force)
    print(f"wrote a CA, a server certificate for {', '.join(hosts)} and a client certificate "
          f"to {args.directory}:")
    print(f"  server:           --tls-cert {paths['server.pem']} --tls-key {paths['server.key']}"
          f"  [--tls-client-ca {paths['ca.pem']} for mutual TLS]")
    print(f"  nodes, scripts:   --tls-ca {paths['ca.pem']}  [--tls-cert {paths['client.pem']} "
          f"--tls-key {paths['client.key']}]")
    print(f"keep {paths['ca.key']} offline; it can sign new certificates")
    return 0


def _connect(args: argparse.Namespace):
    from achilles.controller.cluster import Cluster
    from achilles.core.config import load_config

    return Cluster(load_config(host=args.host, port=args.port, username=args.username,
                               tls_ca=args.tls_ca, tls_client_cert=args.tls_cert,
                               tls_client_key=args.tls_key))


def _demo(args: argparse.Namespace) -> int:
    from achilles.demo import run_demo

    return run_demo(processes=args.processes, keep=args.keep)


def _where(args: argparse.Namespace, cluster: Any) -> str:
    return f"{cluster.config.host}:{cluster.config.port}"


def _status(args: argparse.Namespace) -> int:
    from achilles.tables import render

    with _connect(args) as cluster:
        status = cluster.status()
        print(json.dumps(status, indent=2) if args.json else render(status, _where(args, cluster)))
    return 0


#: Clears a terminal and puts the cursor at the top left (``achilles top`` on a terminal).
CLEAR = "\x1b[H\x1b[2J"


def _top(args: argparse.Namespace) -> int:
    from achilles.tables import render

    if args.interval <= 0:
        raise AchillesError("--interval must be positive")
    terminal = sys.stdout.isatty()
    with _connect(args) as cluster:
        previous: Optional[Tuple[Dict[str, Any], float]] = None
        try:
            while True:
                status = cluster.status()
                taken = time.monotonic()
                text = render(status, _where(args, cluster),
                              previous[0] if previous else None,
                              taken - previous[1] if previous else None, rates=True)
                sys.stdout.write((CLEAR if terminal else "\n") + text + "\n")
                sys.stdout.flush()
                previous = (status, taken)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def _kill(args: argparse.Namespace) -> int:
    with _connect(args) as cluster:
        stopped = cluster.kill(command_verified=args.yes)
    print(f"stopped {stopped} node(s) and the server")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``achilles`` command line (``server`` and ``node`` take their own options)."""
    parser = argparse.ArgumentParser(prog="achilles", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("server", help="run the server daemon (see achilles server --help)", add_help=False)
    sub.add_parser("node", help="run a node daemon (see achilles node --help)", add_help=False)
    cfg = sub.add_parser("config", help="write a .env with a fresh secret key")
    cfg.add_argument("path", nargs="?", default=".env")
    cfg.add_argument("--host")
    cfg.add_argument("--port", type=int)
    cfg.add_argument("--username")
    cfg.add_argument("--force", action="store_true", help="replace an existing file")
    cfg.set_defaults(run=_config)
    certs = sub.add_parser("certs", help="write a CA, a server and a client certificate for TLS")
    certs.add_argument("directory")
    certs.add_argument("--host", action="append",
                       help="server name or IP the certificate is for (repeat; default 127.0.0.1, localhost)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(run=_certs)
    demo = sub.add_parser("demo", help="run a job on a local cluster (no config needed)")
    demo.add_argument("--processes", type=int, help="worker processes (default: the CPU count)")
    demo.add_argument("--keep", action="store_true",
                      help="then keep the cluster up, with a job running, until Enter, and "
                           "print its dashboard's URL")
    demo.set_defaults(run=_demo)
    st = sub.add_parser("status", help="print the cluster's nodes and jobs as tables")
    add_connection_options(st)
    add_client_tls_options(st)
    st.add_argument("--json", action="store_true", help="print status() as JSON instead")
    st.set_defaults(run=_status)
    top = sub.add_parser("top", help="show the nodes and jobs live, with rates, until Ctrl-C")
    add_connection_options(top)
    add_client_tls_options(top)
    top.add_argument("--interval", type=float, default=1.0,
                     help="seconds between refreshes (default 1)")
    top.set_defaults(run=_top)
    kill = sub.add_parser("kill", help="stop every node and the server")
    add_connection_options(kill)
    add_client_tls_options(kill)
    kill.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    kill.set_defaults(run=_kill)
    add_up_parser(sub)
    add_down_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``achilles``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "server":
        from achilles.server.main import main as server_main

        return server_main(argv[1:])
    if argv and argv[0] == "node":
        from achilles.node.main import main as node_main

        return node_main(argv[1:])
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2

    def body(args: argparse.Namespace) -> int:
        return args.run(args)

    return run_main(body, parser, argv)
