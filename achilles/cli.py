"""``achilles``: one command for every role — server, node, config, demo, status, kill, up, down."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from achilles.core.cli_common import add_client_tls_options, add_connection_options, run_main
from achilles.launch.cli import add_down_parser, add_up_parser

COMMANDS = ("server", "node", "config", "certs", "demo", "status", "kill", "up", "down")


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


def _status(args: argparse.Namespace) -> int:
    with _connect(args) as cluster:
        print(json.dumps(cluster.status(), indent=2))
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
    st = sub.add_parser("status", help="print the cluster's nodes and jobs as JSON")
    add_connection_options(st)
    add_client_tls_options(st)
    st.set_defaults(run=_status)
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
