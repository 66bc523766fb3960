"""A one-host SLURM for tests: its own munged (own key and socket), slurmctld and slurmd from a
generated slurm.conf in a temporary folder, on ports the OS picked. The node claims more CPUs
than the machine has (``SlurmdParameters=config_overrides``) so tests can ask for several
multi-CPU nodes. Everything is stopped by PID at the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from typing import Dict, List, Optional

from tests.conftest import alive, poll

CPUS = 12
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")


def unavailable() -> Optional[str]:
    """Why this SLURM cannot be had here, or None."""
    if os.geteuid() != 0:
        return "a test SLURM needs root (slurmd, SlurmUser=root)"
    missing = [d for d in DAEMONS if not os.path.exists(d)]
    if missing or shutil.which("sbatch") is None:
        return f"SLURM or munge is not installed ({', '.join(missing) or 'sbatch'}; .ci/run " \
               "installs slurm-wlm and munge)"
    return None


def _free_ports(count: int) -> List[int]:
    """``count`` distinct ports free now (all held open while picking, so none repeats)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            text = fh.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().split(")")[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


class SlurmHost:
    """munged + slurmctld + slurmd on this machine; ``env`` is what clients need (SLURM_CONF)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.conf = os.path.join(base, "slurm.conf")
        self.env: Dict[str, str] = {"SLURM_CONF": self.conf}
        self.pids: Dict[str, int] = {}
        self.munged: Optional[subprocess.Popen] = None

    def _path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def start(self) -> "SlurmHost":
        os.chmod(self.base, 0o755)  # munged wants its socket's folders traversable
        key = self._path("munge.key")
        with open(key, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = self._path("munge.socket")
        self.munged = subprocess.Popen(
            ["/usr/sbin/munged", "-F", "-f", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={self._path('munged.pid')}", f"--log-file={self._path('munged.log')}",
             f"--seed-file={self._path('munged.seed')}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pids["munged"] = self.munged.pid
        self._wait(lambda: os.path.exists(socket_path), "munged's socket")
        host = socket.gethostname().split(".")[0]
        ctld_port, slurmd_port = _free_ports(2)
        for sub in ("state", "spool"):
            os.makedirs(self._path(sub))
        with open(self.conf, "w") as fh:
            fh.write(f"""ClusterName=achtest
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={self._path('state')}
SlurmdSpoolDir={self._path('spool')}
SlurmctldPidFile={self._path('slurmctld.pid')}
SlurmdPidFile={self._path('slurmd.pid')}
SlurmctldLogFile={self._path('slurmctld.log')}
SlurmdLogFile={self._path('slurmd.log')}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={host} CPUs={CPUS} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        env = dict(os.environ, **self.env)
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([f"/usr/sbin/{daemon}", "-f", self.conf], env=env, check=True,
                           timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
            self._wait(lambda: _read_pid(self._path(f"{daemon}.pid")) is not None, f"{daemon}'s pid")
            self.pids[daemon] = _read_pid(self._path(f"{daemon}.pid")) or 0

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                 text=True, timeout=30)
            return out.stdout.strip() == "idle"
        self._wait(idle, "the SLURM node to be idle", 60)
        return self

    def _wait(self, predicate, what: str, timeout: float = 30) -> None:
        if not poll(predicate, timeout, 0.1):
            raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")

    def logs(self) -> str:
        """The daemons' logs' last lines."""
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            try:
                with open(self._path(name), errors="replace") as fh:
                    out.append(f"--- {name}\n" + fh.read()[-1500:])
            except OSError:
                pass
        return "\n".join(out)

    def squeue(self) -> List[str]:
        """``JOB_INDEX STATE`` lines of every job SLURM knows."""
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], env=dict(os.environ, **self.env),
                             capture_output=True, text=True, timeout=30)
        return out.stdout.split("\n")[:-1] if out.stdout else []

    def job_processes(self) -> List[int]:
        """PIDs of live processes started under this SLURM but not its daemons (their
        environment names its conf)."""
        needle = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        daemons = set(self.pids.values()) | {os.getpid()}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in daemons and alive(int(entry)) \
                    and _parent(int(entry)) not in daemons:  # e.g. slurmctld's slurmscriptd
                try:
                    with open(f"/proc/{entry}/environ", "rb") as fh:
                        if needle in fh.read():
                            found.append(int(entry))
                except OSError:
                    pass
        return found

    def stop(self) -> List[int]:
        """Cancel every job, stop the daemons by PID; return job processes that were left."""
        env = dict(os.environ, **self.env)
        subprocess.run(["scancel", "--user", str(os.getuid())], env=env, capture_output=True,
                       timeout=30)
        poll(lambda: not self.squeue(), 30, 0.2)
        leftovers = self.job_processes()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.get(name)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if self.munged is not None:
            try:
                self.munged.wait(10)
            except subprocess.TimeoutExpired:
                self.munged.kill()
                self.munged.wait(10)
        for name in ("slurmd", "slurmctld"):
            pid = self.pids.get(name)
            poll(lambda: not (pid and alive(pid)), 10, 0.05)
            if pid and alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return leftovers
