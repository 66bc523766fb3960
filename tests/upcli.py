"""Runs ``achilles up`` as a subprocess for a test: its output collected, its readiness
awaited, and its process group killed at the end whatever happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Dict, List

from tests.conftest import proc_stats, sigint_as_on_a_terminal, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env() -> Dict[str, str]:
    """The environment for ``achilles`` commands run from a test folder."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("ACHILLES_ENV_FILE", None)
    return env


class Up:
    """``achilles up ARGS`` started in ``folder`` (which holds the .env)."""

    def __init__(self, folder: str, args: List[str]) -> None:
        self.folder = folder
        self.env = cli_env()
        self.proc = subprocess.Popen([sys.executable, "-m", "achilles", "up", *args], cwd=folder,
                                     env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     preexec_fn=sigint_as_on_a_terminal)
        self.output: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        self.output.extend(iter(self.proc.stdout.readline, ""))

    def wait_ready(self, timeout: float) -> Dict:
        """Wait for "nodes connected"; return the state file `up` wrote."""
        wait_for(lambda: any("nodes connected" in line for line in self.output)
                 or self.proc.poll() is not None, timeout=timeout, what="achilles up to be ready")
        assert self.proc.poll() is None, "".join(self.output)
        with open(os.path.join(self.folder, ".achilles-up.json")) as fh:
            return json.load(fh)

    def wait_line(self, prefix: str, timeout: float = 30) -> None:
        """Wait for an output line starting with ``prefix``. A host's log lines come over its
        own SSH channel, so they may arrive after `up` has said the nodes are connected."""
        wait_for(lambda: any(line.startswith(prefix) for line in self.output),
                 timeout=timeout, what=f"a line starting {prefix!r} from achilles up")

    def server_pids(self) -> List[int]:
        """The server daemon `up` started (its child running achilles.server)."""
        found = []
        for pid, fields in proc_stats():
            if int(fields[1]) == self.proc.pid:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if b"achilles.server" in fh.read():
                            found.append(pid)
                except OSError:
                    pass
        return found

    def achilles(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        """Run another ``achilles`` command in the same folder."""
        return subprocess.run([sys.executable, "-m", "achilles", *args], cwd=self.folder,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        """Kill whatever is left of `up`'s process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)
