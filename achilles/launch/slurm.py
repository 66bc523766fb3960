"""``SlurmCluster``: a server on this machine (e.g. a login node) and nodes submitted to SLURM
as a job array, one node per array task, each on the CPUs SLURM allotted it.

The SLURM commands (``sbatch``, ``squeue``, ``scancel``) run as the user runs them, with the
user's ``SLURM_CONF`` and defaults. The node's ``.env``, its batch script and its log live in a
private folder (mode 0700) that the compute nodes must see: by default under
``~/.achilles/slurm``, where home folders are shared as on most clusters (``directory=``
moves it). The secret is only in that folder's ``.env`` (mode 0600): never in the batch
script, on a command line, or in the environment SLURM stores with the job.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Set

import achilles
from achilles.core.errors import AchillesError, ConfigError
from achilles.launch.base import Launcher, LogSink, print_log

COMMAND_TIMEOUT = 60.0
POLL_EVERY = 2.0
ENDED_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}


def _slurm(args: List[str], env: Optional[Dict[str, str]] = None) -> str:
    """Run one SLURM command; its stdout, or an AchillesError with its stderr."""
    if shutil.which(args[0]) is None:
        raise ConfigError(f"{args[0]} not found: run this on a machine where SLURM's commands work "
                          "(a login node)")
    try:
        out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AchillesError(f"{args[0]} did not answer within {COMMAND_TIMEOUT:g} s") from None
    if out.returncode != 0:
        raise AchillesError(f"{' '.join(args[:2])} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def cancel_jobs(job_ids: Sequence[str]) -> None:
    """``scancel`` these jobs (``achilles down`` after its ``up`` died)."""
    if job_ids:
        _slurm(["scancel", *job_ids])


class SlurmCluster(Launcher):
    """Start a server here and ``nodes`` nodes as one SLURM job array; :meth:`scale` changes
    how many.

    Each node is one array task (``--nodes=1 --ntasks=1``, ``--cpus-per-task=processes`` when
    given) and runs as many worker processes as SLURM gave CPUs. ``partition``, ``time``,
    ``account`` and ``sbatch_args`` go to ``sbatch``. ``python`` (default: this Python) must
    import this Achilles on the compute nodes. Starting waits until every node joined
    (``start_timeout``, default: as long as the queue takes) and fails at once, with the job's
    log, when a task ends first.

    ``with SlurmCluster(nodes=16, processes=32, time="2:00:00") as cluster: cluster.map(...)``;
    leaving the block cancels the job and stops the server.
    """

    kind = "slurm"

    def __init__(self, nodes: int = 1, processes: Optional[int] = None,
                 partition: Optional[str] = None, time: Optional[str] = None,
                 account: Optional[str] = None, sbatch_args: Sequence[str] = (),
                 python: str = sys.executable, job_name: str = "achilles",
                 directory: Optional[str] = None, env_file: Optional[str] = None, port: int = 0,
                 bind: str = "0.0.0.0", server_address: Optional[str] = None,
                 log_level: str = "WARNING", on_log: Optional[LogSink] = print_log,
                 start_timeout: Optional[float] = None) -> None:
        if nodes < 0 or (processes is not None and processes < 1):
            raise ConfigError("SlurmCluster wants nodes >= 0 and processes >= 1")
        super().__init__(env_file=env_file, port=port, bind=bind, server_address=server_address,
                         log_level=log_level, on_log=on_log, start_timeout=start_timeout)
        self.n_nodes = nodes
        self.processes = processes
        self.sbatch_options: List[str] = [f"--job-name={job_name}", "--nodes=1", "--ntasks=1"]
        if processes:
            self.sbatch_options.append(f"--cpus-per-task={processes}")
        for flag, value in (("partition", partition), ("time", time), ("account", account)):
            if value:
                self.sbatch_options.append(f"--{flag}={value}")
        self.sbatch_options += list(sbatch_args)
        self.python = python
        self.server_address = self.server_address or socket.gethostname()
        base = directory or os.path.join(os.path.expanduser("~"), ".achilles", "slurm")
        os.makedirs(base, mode=0o700, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix="run-", dir=base)
        self.tasks: List[str] = []
        self.job_ids: List[str] = []
        self._cancelled: Set[str] = set()
        self._last_poll = 0.0

    def __repr__(self) -> str:
        return f"<SlurmCluster port={self.port} jobs={self.job_ids} nodes={len(self.tasks)}>"

    def expected_nodes(self) -> int:
        """The array tasks this cluster wants running."""
        return len(self.tasks)

    @staticmethod
    def node_name(task: str) -> str:
        """The node name of array task ``JOB_INDEX``."""
        return f"slurm-{task}"

    def _job_env(self) -> Dict[str, str]:
        """The environment ``sbatch`` passes to the job: this one, with this Achilles on the
        path and without any secret."""
        env = {k: v for k, v in os.environ.items() if k != "ACHILLES_SECRET_KEY"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(achilles.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
        env.pop("ACHILLES_ENV_FILE", None)
        return env

    # --- start -------------------------------------------------------------------------------
    def _prepare(self, deadline: float) -> None:
        env_copy = os.path.join(self.directory, ".env")
        with open(self.env_file, "rb") as fh:
            data = fh.read()
        fd = os.open(env_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    def _script(self) -> str:
        path = os.path.join(self.directory, "node.sh")
        q = shlex.quote
        args = [self.python, "-m", "achilles.node", "--host", str(self.server_address),
                "--port", str(self.port), "--log-level", self.log_level]
        text = ("#!/bin/sh\n"
                "# An Achilles node, one per array task; its secret is in .env beside this file.\n"
                f"cd {q(self.directory)} || exit 1\n"
                f"exec env ACHILLES_ENV_FILE={q(self.directory + '/.env')} {' '.join(q(a) for a in args)}"
                ' --name "slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"\n')
        with open(path, "w") as fh:
            fh.write(text)
        os.chmod(path, 0o700)
        return path

    def _submit(self, count: int) -> str:
        """Submit ``count`` more nodes as one job array; return its job id."""
        log = os.path.join(self.directory, "node-%A_%a.log")
        out = _slurm(["sbatch", "--parsable", f"--array=0-{count - 1}", f"--output={log}",
                      *self.sbatch_options, self._script()], env=self._job_env())
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise AchillesError(f"sbatch answered {out.strip()!r}, not a job id")
        self.job_ids.append(job_id)
        self.tasks += [f"{job_id}_{i}" for i in range(count)]
        if self.on_log is not None:
            self.on_log("slurm", f"submitted job array {job_id} ({count} nodes); waiting for them "
                                 "to join")
        return job_id

    def _start_nodes(self, deadline: float) -> None:
        if self.n_nodes:
            self._submit(self.n_nodes)

    def _queue(self) -> Dict[str, str]:
        """``{JOB_INDEX: state}`` of this cluster's array tasks SLURM still knows."""
        if not self.job_ids:
            return {}
        out = _slurm(["squeue", "-h", "-r", "-j", ",".join(self.job_ids), "-o", "%i %T"])
        return dict(line.split(None, 1) for line in out.splitlines() if " " in line)

    def log_text(self, task: str) -> str:
        """What array task ``JOB_INDEX``'s node wrote to its log so far."""
        try:
            with open(os.path.join(self.directory, f"node-{task}.log"), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def _node_problem(self) -> Optional[str]:
        now = time.monotonic()
        if now - self._last_poll < POLL_EVERY:
            return None
        self._last_poll = now
        try:
            queue = self._queue()
        except AchillesError:
            return None  # a busy controller is no reason to give up; the deadline still holds
        connected = {n["name"] for n in self.connected_nodes()}
        for task in self.tasks:
            state = queue.get(task)
            if self.node_name(task) in connected:
                continue
            if state is None or state in ENDED_STATES:
                return (f"SLURM array task {task} ended ({state or 'gone from the queue'}) before "
                        f"its node joined; its log:\n{self.log_text(task)[-2000:]}")
        return None

    def _settled(self, nodes: List[Dict[str, Any]], count: int, exact: bool) -> bool:
        names = {n["name"] for n in nodes}
        wanted = {self.node_name(t) for t in self.tasks}
        return wanted <= names and not (names & {self.node_name(t) for t in self._cancelled})

    # --- scale and stop ----------------------------------------------------------------------
    def scale(self, n: int, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Run ``n`` nodes: submit the missing ones as a new job array, or cancel the newest;
        with ``wait``, return once exactly those nodes are connected (work a cancelled node
        had in hand is sent again to others)."""
        if n < 0:
            raise ConfigError("scale wants n >= 0")
        if n > len(self.tasks):
            self._submit(n - len(self.tasks))
        elif n < len(self.tasks):
            victims = self.tasks[n:]
            _slurm(["scancel", *victims])
            self._cancelled.update(victims)
            self.tasks = self.tasks[:n]
        if wait:
            self.wait_for_nodes(n, timeout=timeout)

    def _stop_nodes(self) -> None:
        try:
            if self.job_ids:
                try:
                    _slurm(["scancel", *self.job_ids])
                except AchillesError as exc:  # e.g. every task had ended already
                    if self.on_log is not None:
                        self.on_log("slurm", str(exc))
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        if not self._queue():
                            break
                    except AchillesError:
                        break
                    time.sleep(0.2)
                self.job_ids, self.tasks = [], []
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
