"""Throwaway SSH hosts for tests: one OpenSSH daemon in each of several network namespaces,
each namespace joined by a veth pair to one bridge in this namespace (so a node's address
differs from the server's, the hosts reach each other, and this process reaches each host),
and a private HOME whose ``~/.ssh/config`` names them (Host alias, HostName, Port, User,
IdentityFile) with a matching ``known_hosts``. Everything is stopped by PID at the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Dict, List, Optional

from conftest import poll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSHD = "/usr/sbin/sshd"
SSH_PORT = 2222


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> Optional[str]:
    """Why these hosts cannot be had here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        return "no OpenSSH server (.ci/run installs openssh-server)"
    probe = f"achprobe{os.getpid()}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return "`ip netns add` is not permitted here"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> int:
    used = _ip("-o", "-4", "addr").stdout
    start = os.getpid() % 200
    for k in range(250):
        n = 1 + (start + k) % 250
        if f"10.213.{n}." not in used:
            return n
    raise RuntimeError("no free 10.213.N.0/24 subnet for test namespaces")


class SSHHosts:
    """``names`` hosts, each a namespace with its own sshd; ``home`` is the client's HOME.

    Each host NAME has three ~/.ssh/config aliases: ``NAME`` (with IdentityFile),
    ``NAME-jump`` (the same through ``ProxyJump NAME``) and ``NAME-agent`` (no IdentityFile:
    only an agent's key gets in)."""

    def __init__(self, base: str, names: List[str]) -> None:
        self.base = base
        self.names = names
        self.home = os.path.join(base, "home")
        self.namespaces: Dict[str, str] = {}
        self.addresses: Dict[str, str] = {}
        self.gateways: Dict[str, str] = {}
        self.links: List[str] = []
        self.sshd: Dict[str, subprocess.Popen] = {}
        self.python = os.path.join(base, "python-with-achilles")

    def start(self) -> "SSHHosts":
        os.makedirs(os.path.join(self.home, ".ssh"), mode=0o700)
        os.makedirs("/run/sshd", exist_ok=True)
        # Not a default key name: a host without IdentityFile is reached only through the agent.
        self.key = key = os.path.join(self.home, ".ssh", "cluster_key")
        host_key = os.path.join(self.base, "host_ed25519")
        for path in (key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True,
                           timeout=30)
        with open(host_key + ".pub") as fh:
            host_pub = " ".join(fh.read().split()[:2])
        config, known = [], []
        subnet = _free_subnet()
        bridge = f"ab{os.getpid() % 100000}"
        gateway = f"10.213.{subnet}.1"
        _ip("link", "add", bridge, "type", "bridge")
        self.links.append(bridge)
        _ip("addr", "add", f"{gateway}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, name in enumerate(self.names):
            ns = f"ach{os.getpid()}{name}"
            outer, inner = f"av{os.getpid() % 100000}{i}", f"ai{os.getpid() % 100000}{i}"
            address = f"10.213.{subnet}.{2 + i}"
            _ip("netns", "add", ns)
            self.namespaces[name] = ns
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
            self.links.append(outer)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            for args in (["addr", "add", f"{address}/24", "dev", inner], ["link", "set", inner, "up"],
                         ["link", "set", "lo", "up"]):
                _ip("netns", "exec", ns, "ip", *args)
            self.addresses[name], self.gateways[name] = address, gateway
            conf = os.path.join(self.base, f"sshd-{name}.conf")
            with open(conf, "w") as fh:
                fh.write(f"Port {SSH_PORT}\nListenAddress {address}\nHostKey {host_key}\n"
                         f"PidFile {self.base}/sshd-{name}.pid\n"
                         f"AuthorizedKeysFile {key}.pub\nPasswordAuthentication no\n"
                         "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                         "StrictModes no\nUsePAM no\n")
            log = open(os.path.join(self.base, f"sshd-{name}.log"), "wb")
            self.sshd[name] = subprocess.Popen(
                ["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", conf],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            config.append(f"Host {name}\n  HostName {address}\n  Port {SSH_PORT}\n  User root\n"
                          f"  IdentityFile {key}\n")
            # The same host reached through a jump host (itself), and with keys from the agent only.
            config.append(f"Host {name}-jump\n  HostName {address}\n  Port {SSH_PORT}\n"
                          f"  User root\n  IdentityFile {key}\n  ProxyJump {name}\n")
            config.append(f"Host {name}-agent\n  HostName {address}\n  Port {SSH_PORT}\n"
                          "  User root\n")
            known.append(f"[{address}]:{SSH_PORT} {host_pub}")
        with open(os.path.join(self.home, ".ssh", "config"), "w") as fh:
            fh.write("\n".join(config))
        with open(os.path.join(self.home, ".ssh", "known_hosts"), "w") as fh:
            fh.write("\n".join(known) + "\n")
        with open(self.python, "w") as fh:
            fh.write(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} \"$@\"\n")
        os.chmod(self.python, 0o755)
        for name, address in self.addresses.items():
            self._wait_listening(name, address)
        return self

    def _wait_listening(self, name: str, address: str) -> None:
        def listening() -> bool:
            if self.sshd[name].poll() is not None:
                raise RuntimeError(f"sshd for {name} exited: " + self.log(name))
            try:
                with socket.create_connection((address, SSH_PORT), timeout=1):
                    return True
            except OSError:
                return False

        if not poll(listening, 20, 0.05):
            raise RuntimeError(f"sshd for {name} is not listening: " + self.log(name))

    def log(self, name: str) -> str:
        """What a host's sshd logged."""
        with open(os.path.join(self.base, f"sshd-{name}.log"), errors="replace") as fh:
            return fh.read()

    def pids(self, name: str) -> List[int]:
        """Every process in a host's namespace."""
        out = _ip("netns", "pids", self.namespaces[name], check=False).stdout
        return [int(p) for p in out.split()]

    def node_pids(self, name: str) -> List[int]:
        """Processes in a host's namespace other than its sshd listener."""
        return [p for p in self.pids(name) if p != self.sshd[name].pid]

    def stop(self) -> List[int]:
        """Kill every process in the namespaces by PID, remove them; return the PIDs that had
        to be killed besides the sshd listeners (a test's leftovers)."""
        leftovers = []
        for name in list(self.namespaces):
            leftovers += self.node_pids(name)
            for pid in self.pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.sshd.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for link in reversed(self.links):
            _ip("link", "del", link, check=False)
        for ns in self.namespaces.values():
            _ip("netns", "del", ns, check=False)
        return leftovers
