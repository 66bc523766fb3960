"""Pieces every command-line entry point shares: common options and the error wrapper."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

from achilles.core.errors import AchillesError


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """``--host --port --username --log-level`` (the secret comes only from env or .env)."""
    parser.add_argument("--host", help="server address (env ACHILLES_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="server port (env ACHILLES_PORT, default 9999)")
    parser.add_argument("--username", help="cluster user name (env ACHILLES_USERNAME)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (env ACHILLES_LOG_LEVEL)")


def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` and run ``body``; an :class:`AchillesError` becomes one line and exit 2."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except AchillesError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def add_client_tls_options(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca --tls-cert --tls-key`` for nodes and controllers."""
    parser.add_argument("--tls-ca", help="connect with TLS, verifying the server against this CA "
                        "(env ACHILLES_TLS_CA)")
    parser.add_argument("--tls-cert", help="client certificate for mutual TLS (env ACHILLES_TLS_CLIENT_CERT)")
    parser.add_argument("--tls-key", help="key of --tls-cert (env ACHILLES_TLS_CLIENT_KEY)")
