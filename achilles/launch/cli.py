"""``achilles up`` (a server here or on the first SSH host, nodes over SSH or as a SLURM job,
in the foreground until Ctrl-C or ``achilles down``) and ``achilles down``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from achilles.core.config import load_config
from achilles.core.errors import AchillesError, ConfigError

if TYPE_CHECKING:
    from achilles.launch.base import Launcher

STATE_FILE = ".achilles-up.json"
DOWN_TIMEOUT = 120.0


def add_up_parser(sub: Any) -> None:
    """``achilles up`` and its options."""
    up = sub.add_parser(
        "up", help="start a server here and nodes over SSH or SLURM; stop with Ctrl-C or achilles down",
        description="Start a server on this machine and nodes over SSH (--ssh/--hostfile) or as a "
                    "SLURM job (--slurm), using the .env of this folder (or ACHILLES_ENV_FILE); "
                    "runs in the foreground, printing every log line prefixed with its host, until "
                    "Ctrl-C or `achilles down` from this folder.")
    where = up.add_mutually_exclusive_group(required=True)
    where.add_argument("--ssh", metavar="HOSTS",
                       help="host1,user@host2:8,... (~/.ssh/config aliases work; :N = processes)")
    where.add_argument("--hostfile", help="a file with one host (host, user@host, host:N) per line")
    where.add_argument("--slurm", action="store_true", help="submit the nodes as a SLURM job array")
    up.add_argument("--server-on", metavar="WHERE", default="here",
                    help="where the server runs with --ssh/--hostfile: here (default), first (the "
                         "first host), or another SSH destination")
    up.add_argument("--python",
                    help="the Python that has Achilles on the hosts, e.g. a virtualenv's (default: "
                         "python3 over SSH, this Python under SLURM)")
    slurm = up.add_argument_group("SLURM (with --slurm)")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes, one per array task (default 1)")
    slurm.add_argument("--processes", type=int,
                       help="CPUs per node (--cpus-per-task); each node runs that many workers")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="time limit, e.g. 2:00:00")
    slurm.add_argument("--account")
    slurm.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                       help="one more sbatch option, e.g. --sbatch-arg=--mem=8G (repeat)")
    slurm.add_argument("--directory",
                       help="folder the compute nodes see, for the node's .env, script and logs "
                            "(default ~/.achilles/slurm)")
    up.add_argument("--port", type=int, help="server port (default: the .env's ACHILLES_PORT)")
    up.add_argument("--bind", default="0.0.0.0", help="address the server listens on (default 0.0.0.0)")
    up.add_argument("--server-address",
                    help="address nodes (and, with --server-on, scripts here) connect to (default: "
                         "the .env's ACHILLES_HOST unless it is loopback, else the address each "
                         "host's SSH connection came from, or with --server-on the server host's "
                         "address that SSH reached)")
    up.add_argument("--timeout", type=float, default=None,
                    help="seconds to wait for every node to join (default: no limit)")
    up.add_argument("--log-level", help="of the server and nodes (default: the .env's, else INFO)")
    up.add_argument("--state", default=STATE_FILE, help=f"where `down` finds this run (default {STATE_FILE})")
    up.set_defaults(run=run_up)


def add_down_parser(sub: Any) -> None:
    """``achilles down`` and its options."""
    down = sub.add_parser("down", help="stop what `achilles up` started from this folder")
    down.add_argument("--state", default=STATE_FILE, help=f"the file `up` wrote (default {STATE_FILE})")
    down.set_defaults(run=run_down)


def _launcher(args: argparse.Namespace) -> "Launcher":
    cfg = load_config(port=args.port, log_level=args.log_level)
    if not cfg.env_file:
        raise ConfigError("achilles up needs the cluster's .env in this folder (or "
                          "ACHILLES_ENV_FILE): run `achilles config` first")
    common: Dict[str, Any] = dict(env_file=cfg.env_file, port=cfg.port, bind=args.bind,
                                  server_address=args.server_address, log_level=cfg.log_level,
                                  start_timeout=args.timeout)
    if args.slurm:
        if args.server_on != "here":
            raise ConfigError("--server-on is for --ssh/--hostfile; under --slurm the server runs here")
        from achilles.launch.slurm import SlurmCluster

        options: Dict[str, Any] = {"python": args.python} if args.python else {}
        return SlurmCluster(nodes=args.nodes, processes=args.processes, partition=args.partition,
                            time=args.time, account=args.account, sbatch_args=args.sbatch_arg,
                            directory=args.directory, **options, **common)
    from achilles.launch.hosts import parse_hosts, read_hosts_file
    from achilles.launch.ssh import SSHCluster

    hosts = read_hosts_file(args.hostfile) if args.hostfile else parse_hosts(args.ssh)
    server_host = {"here": None, "first": hosts[0].destination}.get(args.server_on, args.server_on)
    return SSHCluster(hosts, remote_python=args.python or "python3", server_host=server_host,
                      **common)


def _pid_runs_achilles(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"achilles" in fh.read()
    except OSError:
        return False


def _read_state(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as fh:
            return dict(json.load(fh))
    except (OSError, ValueError):
        return None


def write_state(path: str, state: Dict[str, Any]) -> None:
    """Write ``up``'s state (no secret in it) atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, path)


def run_up(args: argparse.Namespace) -> int:
    """Start, serve until SIGINT/SIGTERM, stop everything."""
    old = _read_state(args.state)
    if old and _pid_runs_achilles(int(old.get("pid", 0))):
        raise AchillesError(f"a cluster is already up from here (pid {old['pid']}); "
                            "run `achilles down` first")
    launcher = _launcher(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        launcher.start()
        reach = launcher.controller_config()
        state = {"pid": os.getpid(), "host": reach.host, "port": launcher.port,
                 "kind": launcher.kind, "slurm_jobs": list(getattr(launcher, "job_ids", []))}
        write_state(args.state, state)
        remote = getattr(launcher, "remote_server", None)
        where = f" on {remote.spec.destination}" if remote is not None else ""
        print(f"{launcher.expected_nodes()} nodes connected; the server{where} listens on "
              f"{launcher.bind}:{launcher.port}. Scripts using this .env reach it at "
              f"ACHILLES_HOST={reach.host} ACHILLES_PORT={launcher.port}; stop with Ctrl-C or "
              "`achilles down`.", flush=True)
        while launcher.server.alive():
            time.sleep(0.5)
        raise AchillesError("the server exited:\n" + launcher.server.tail.text()[-2000:])
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        launcher.stop()
        state_now = _read_state(args.state)
        if state_now and state_now.get("pid") == os.getpid():
            os.unlink(args.state)


def run_down(args: argparse.Namespace) -> int:
    """Ask the ``up`` of this folder to stop, and wait until it did."""
    state = _read_state(args.state)
    if state is None:
        raise AchillesError(f"nothing is up from here (no {args.state})")
    pid = int(state.get("pid", 0))
    if pid and _pid_runs_achilles(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT
        while _pid_runs_achilles(pid):
            if time.monotonic() > deadline:
                raise AchillesError(f"achilles up (pid {pid}) did not stop within {DOWN_TIMEOUT:g} s")
            time.sleep(0.1)
        print(f"stopped the cluster of achilles up (pid {pid})")
    else:
        print(f"achilles up (pid {pid}) was no longer running")
        if state.get("slurm_jobs"):
            from achilles.launch.slurm import cancel_jobs

            cancel_jobs([str(j) for j in state["slurm_jobs"]])
            print(f"cancelled SLURM job(s) {', '.join(map(str, state['slurm_jobs']))}")
    if os.path.exists(args.state):
        os.unlink(args.state)
    return 0
