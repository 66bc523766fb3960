"""SSHCluster and ``achilles up --ssh`` / ``achilles down`` against real OpenSSH daemons, each
in its own network namespace joined to this one by a veth pair (see tests/sshhosts.py)."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
from typing import Iterator, List, Tuple

import pytest

import achilles
from achilles.core.errors import AchillesError
from achilles.launch.hosts import HostSpec, parse_hosts, read_hosts_file
from achilles.launch.ssh import SSHCluster
from tests.conftest import alive, wait_for
from tests.sshhosts import SSHHosts, unavailable
from tests.upcli import Up, cli_env

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Iterator[SSHHosts]:
    """Two SSH hosts, ``alpha`` and ``beta``; every process in them is gone at the end."""
    why = unavailable()
    if why:
        pytest.skip(why)
    made = SSHHosts(str(tmp_path_factory.mktemp("ssh")), ["alpha", "beta"])
    try:
        yield made.start()
    finally:
        leftovers = made.stop()
    assert not leftovers, f"processes left on the SSH hosts: {leftovers}"


@pytest.fixture
def ssh_home(hosts, monkeypatch) -> SSHHosts:
    """This process's HOME is the hosts' client HOME (its ~/.ssh), with no agent."""
    monkeypatch.setenv("HOME", hosts.home)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return hosts


def _collect() -> Tuple[List[Tuple[str, str]], "object"]:
    lines: List[Tuple[str, str]] = []
    lock = threading.Lock()

    def sink(source: str, line: str) -> None:
        with lock:
            lines.append((source, line))
    return lines, sink


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def test_host_lists_parse_counts_and_files(tmp_path) -> None:
    """``host1,user@host2:8`` gives one spec per host with its process count; a hosts file
    skips comments and blanks; a bad count is refused with the expected form."""
    assert parse_hosts("a, root@b:8") == [HostSpec("a"), HostSpec("root@b", 8)]
    path = tmp_path / "hosts"
    path.write_text("# cluster\nalpha:2\n\nbeta  # the other one\n")
    assert read_hosts_file(str(path)) == [HostSpec("alpha", 2), HostSpec("beta")]
    with pytest.raises(achilles.ConfigError, match="host:N"):
        parse_hosts("a:x")


def test_log_lines_from_several_hosts_stay_whole_lines() -> None:
    """The default log sink writes each ``[host] line`` whole: lines printed at once by the
    threads that pump the server's and the hosts' output never run into each other (with
    ``print``, text and newline were two writes, and a host's line could end up glued to the
    end of the server's)."""
    script = ("import threading\n"
              "from achilles.launch.base import print_log\n"
              "def pump(source):\n"
              "    for i in range(5000):\n"
              "        print_log(source, f'line {i}')\n"
              "threads = [threading.Thread(target=pump, args=(s,)) for s in ('server', 'alpha', 'beta')]\n"
              "for t in threads: t.start()\n"
              "for t in threads: t.join()\n")
    out = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 15000
    broken = [line for line in lines if not re.fullmatch(r"\[(server|alpha|beta)\] line \d+", line)]
    assert not broken, broken[:3]


def test_without_asyncssh_the_error_names_the_extra() -> None:
    """Where asyncssh is not installed, SSHCluster fails with a ConfigError that names the
    ``achilles[ssh]`` extra (the rest of Achilles imports and works without it)."""
    code = ("import sys; sys.modules['asyncssh'] = None\n"
            "import achilles\n"
            "try:\n"
            "    achilles.SSHCluster('alpha')\n"
            "except achilles.ConfigError as exc:\n"
            "    print('ConfigError:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert "ConfigError:" in out.stdout and "pip install 'achilles[ssh]'" in out.stdout, \
        out.stdout + out.stderr


def test_ssh_cluster_runs_a_map_on_nodes_in_other_namespaces(ssh_home, tmp_path) -> None:
    """SSHCluster starts a node on each host through the ~/.ssh/config aliases; the nodes
    join from their own addresses (not the server's), ``:N`` sets the processes, a map runs,
    node log lines arrive tagged with their host, and leaving the block leaves nothing on the
    hosts (no node process, no copied files). The cluster's .env arrives on each host in a
    private folder with mode 0600, the node reads its secret from there, and no process on
    any host or here has the secret on its command line."""
    env = tmp_path / ".env"
    achilles.gen_config(str(env), port=0)
    secret = achilles.load_config(env_file=str(env)).secret_key
    assert secret
    lines, sink = _collect()
    launcher = SSHCluster(["alpha:1", "beta:3"], remote_python=ssh_home.python, env_file=str(env),
                          log_level="INFO", on_log=sink)
    with launcher as cluster:
        assert cluster.map(lambda x: x ** 3, range(40), chunksize=2) == [x ** 3 for x in range(40)]
        nodes = {n["name"]: n for n in cluster.status()["nodes"]}
        assert set(nodes) == {"alpha", "beta"}
        for name in ("alpha", "beta"):
            assert nodes[name]["address"].startswith(ssh_home.addresses[name] + ":")
        assert nodes["beta"]["processes"] == 3
        folders = [n.directory for n in launcher.nodes]
        assert all(f and os.path.isdir(f) for f in folders)
        for name in ("alpha", "beta"):
            node_pids = [p for p in ssh_home.node_pids(name) if b"achilles.node" in _cmdline(p)]
            assert node_pids
            folder = os.readlink(f"/proc/{node_pids[0]}/cwd")
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
            copied = os.path.join(folder, ".env")
            assert stat.S_IMODE(os.stat(copied).st_mode) == 0o600
            assert secret in open(copied).read()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                assert secret.encode() not in _cmdline(int(entry)), \
                    f"secret on pid {entry}'s command line"
    assert {"alpha", "beta"} <= {source for source, _ in lines}
    assert any(source == "server" for source, _ in lines)
    assert not any(os.path.exists(f) for f in folders)
    for name in ("alpha", "beta"):
        wait_for(lambda: not ssh_home.node_pids(name), timeout=20, what=f"{name} to be empty")


def test_hosts_without_achilles_are_named_before_anything_starts(ssh_home, tmp_path) -> None:
    """A Python that cannot import Achilles, and a Python that does not exist, fail the start
    with one error naming every host and what to do (--python), and no node or server runs."""
    bare = tmp_path / "python-without-achilles"  # no site-packages at all, whatever is installed
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    bare.chmod(0o755)
    launcher = SSHCluster(["alpha", "beta"], remote_python=str(bare), on_log=None)
    with pytest.raises(AchillesError) as info:
        try:
            launcher.start()
        finally:
            launcher.stop()
    text = str(info.value)
    assert "alpha:" in text and "beta:" in text
    assert "cannot import achilles" in text and "--python" in text
    assert launcher.server.proc is None
    launcher = SSHCluster(["alpha"], remote_python="/nonexistent/python3", on_log=None)
    with pytest.raises(AchillesError, match="no Python at '/nonexistent/python3'"):
        launcher.start()
    for name in ("alpha", "beta"):
        wait_for(lambda: not ssh_home.node_pids(name), timeout=20, what=f"{name} to be empty")


def test_achilles_up_ssh_serves_scripts_until_achilles_down(ssh_home, tmp_path) -> None:
    """``achilles up --ssh`` in a folder with a .env starts the server and the nodes, streams
    their log lines prefixed with the host, serves a script that uses that .env, and
    ``achilles down`` from the same folder stops it all: `up` exits 0, the hosts are empty."""
    achilles.gen_config(str(tmp_path / ".env"), port=0)
    up = Up(str(tmp_path), ["--ssh", "alpha:1,beta:1", "--python", ssh_home.python])
    try:
        state = up.wait_ready(60)
        up.wait_line("[alpha] ")
        up.wait_line("[beta] ")
        env = dict(up.env, ACHILLES_PORT=str(state["port"]))
        script = ("import achilles\n"
                  "with achilles.connect() as c:\n"
                  "    print(sum(c.map(abs, range(-50, 50))), len(c.status()['nodes']))\n")
        run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.stdout.split() == ["2500", "2"], run.stdout + run.stderr
        down = up.achilles("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.proc.wait(30) == 0
        for name in ("alpha", "beta"):
            wait_for(lambda: not ssh_home.node_pids(name), timeout=20, what=f"{name} to be empty")
        assert not (tmp_path / ".achilles-up.json").exists()
        assert "nothing is up" in up.achilles("down").stderr
    finally:
        up.close()


def test_up_without_a_env_says_to_run_achilles_config(tmp_path) -> None:
    """``achilles up`` in a folder without a .env exits 2 and says to run `achilles config`
    (it never makes up a secret the user's scripts would not know)."""
    out = subprocess.run([sys.executable, "-m", "achilles", "up", "--ssh", "alpha"], cwd=tmp_path,
                         env=cli_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "run `achilles config` first" in out.stderr, out.stderr
    assert not (tmp_path / ".achilles-up.json").exists()


def test_ctrl_c_stops_up_and_its_nodes(ssh_home, tmp_path) -> None:
    """``achilles up --hostfile`` starts the hosts the file lists; Ctrl-C (SIGINT) stops the
    nodes and the server and `up` exits 0."""
    achilles.gen_config(str(tmp_path / ".env"), port=0)
    (tmp_path / "hosts").write_text("# one host\nalpha:1\n")
    up = Up(str(tmp_path), ["--hostfile", "hosts", "--python", ssh_home.python])
    try:
        up.wait_ready(60)
        server = up.server_pids()
        assert len(server) == 1
        up.wait_line("[alpha] ")
        os.kill(up.proc.pid, signal.SIGINT)
        assert up.proc.wait(30) == 0
        assert not alive(server[0])
        wait_for(lambda: not ssh_home.node_pids("alpha"), timeout=20, what="alpha to be empty")
    finally:
        up.close()


def test_a_killed_up_leaves_no_node_or_server(ssh_home, tmp_path) -> None:
    """When ``achilles up`` dies without cleaning up (SIGKILL), its server stops (its stdin
    closes) and every node stops (its SSH session ends): nothing is left on the hosts."""
    achilles.gen_config(str(tmp_path / ".env"), port=0)
    up = Up(str(tmp_path), ["--ssh", "alpha:1,beta:1", "--python", ssh_home.python])
    try:
        up.wait_ready(60)
        server = up.server_pids()
        assert len(server) == 1 and ssh_home.node_pids("alpha")
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait(10)
        wait_for(lambda: not alive(server[0]), timeout=20, what="the server to stop")
        for name in ("alpha", "beta"):
            wait_for(lambda: not ssh_home.node_pids(name), timeout=30, what=f"{name} to be empty")
    finally:
        up.close()


def test_a_host_with_another_achilles_version_is_refused(ssh_home, tmp_path) -> None:
    """A host whose Python imports a different Achilles version fails the start with both
    versions named."""
    fake = tmp_path / "old" / "achilles"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0.1"\n')
    python = tmp_path / "old-python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={fake.parent} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    launcher = SSHCluster(["alpha"], remote_python=str(python), on_log=None)
    with pytest.raises(AchillesError, match=f"has Achilles 0.0.1, this machine {achilles.__version__}"):
        launcher.start()


def test_proxyjump_and_agent_keys_from_the_ssh_setup(ssh_home, tmp_path, monkeypatch) -> None:
    """A host reached through ProxyJump, and a host whose only usable key is in an ssh-agent,
    each run a node. As the ProxyJump host did not see the connection come from this machine's
    address, the start first asks for --server-address rather than guess (before any server
    starts), and works with it; without the agent the other host is refused with an error
    naming it."""
    launcher = SSHCluster(["alpha-jump"], remote_python=ssh_home.python, on_log=None)
    with pytest.raises(AchillesError, match="alpha-jump: .*ProxyJump.*--server-address"):
        launcher.start()
    assert launcher.server.proc is None
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(sock), timeout=10, what="ssh-agent's socket")
        added = subprocess.run(["ssh-add", ssh_home.key], env=dict(os.environ, SSH_AUTH_SOCK=sock),
                               capture_output=True, text=True, timeout=30)
        assert added.returncode == 0, added.stderr
        with pytest.raises(AchillesError, match="beta-agent: SSH connection failed"):
            SSHCluster(["beta-agent"], remote_python=ssh_home.python, on_log=None).start()
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        with SSHCluster(["alpha-jump:1", "beta-agent:1"], remote_python=ssh_home.python, on_log=None,
                        server_address=ssh_home.gateways["alpha"]) as cluster:
            assert cluster.map(lambda x: x * 3, [1, 2]) == [3, 6]
            assert sorted(n["name"] for n in cluster.status()["nodes"]) == ["alpha-jump",
                                                                              "beta-agent"]
    finally:
        agent.terminate()
        agent.wait(10)
    for name in ("alpha", "beta"):
        wait_for(lambda: not ssh_home.node_pids(name), timeout=20, what=f"{name} to be empty")


def test_tls_ca_reaches_the_hosts_and_nodes_verify_the_server(ssh_home, tmp_path) -> None:
    """With TLS in the cluster's .env, the CA certificate is copied beside the .env on each
    host (mode 0600, the .env pointed at the copy) and the nodes join (the server takes only
    TLS, so they verified it against the copy); the server's key does not leave this machine."""
    from achilles.core.tls import generate_certs

    paths = generate_certs(str(tmp_path / "certs"),
                           hosts=["127.0.0.1", *ssh_home.gateways.values()])
    env = tmp_path / ".env"
    achilles.gen_config(str(env), port=0)
    with open(env, "a") as fh:
        fh.write(f"ACHILLES_TLS_CERT={paths['server.pem']}\nACHILLES_TLS_KEY={paths['server.key']}\n"
                 f"ACHILLES_TLS_CA={paths['ca.pem']}\n")
    launcher = SSHCluster(["alpha:1", "beta:1"], remote_python=ssh_home.python, env_file=str(env),
                          on_log=None)
    with launcher as cluster:
        assert cluster.map(lambda x: x - 1, [1, 2, 3]) == [0, 1, 2]
        for node in launcher.nodes:
            folder = node.directory
            assert folder and sorted(os.listdir(folder)) == [".env", "tls_ca.pem"]
            assert stat.S_IMODE(os.stat(os.path.join(folder, "tls_ca.pem")).st_mode) == 0o600
            copied = achilles.load_config(env_file=os.path.join(folder, ".env"))
            assert copied.tls_ca == f"{folder}/tls_ca.pem"
            with open(paths["ca.pem"]) as a, open(copied.tls_ca) as b:
                assert a.read() == b.read()


def test_a_node_that_dies_is_reported_and_the_rest_still_serve(ssh_home) -> None:
    """When a node dies on its host (SIGKILL), the launcher reports ``node exited with status``
    under that host's name, maps still run on the other host, and stopping the cluster with a
    dead node neither hangs nor fails, and leaves both hosts empty."""
    lines, sink = _collect()
    launcher = SSHCluster(["alpha:1", "beta:1"], remote_python=ssh_home.python, on_log=sink)
    with launcher as cluster:
        beta = next(n for n in launcher.nodes if n.name == "beta")
        assert beta.pid is not None
        os.kill(beta.pid, signal.SIGKILL)
        wait_for(lambda: any(s == "beta" and "node exited with status" in t for s, t in lines),
                 timeout=20, what="the launcher to report beta's node")
        wait_for(lambda: [n["name"] for n in cluster.status()["nodes"]] == ["alpha"], timeout=30,
                 what="the server to drop beta")
        assert cluster.map(lambda x: x + 10, range(5)) == list(range(10, 15))
    for name in ("alpha", "beta"):
        wait_for(lambda: not ssh_home.node_pids(name), timeout=20, what=f"{name} to be empty")


def test_achilles_up_server_on_first_host_until_down(ssh_home, tmp_path, monkeypatch) -> None:
    """``achilles up --ssh alpha,beta:2 --server-on first`` (SSHCluster's ``server_host``)
    starts the server on alpha, in its namespace, from a private 0600 copy of the .env with no
    secret on any command line, and a node on each host that joins it from its own address;
    `up` prints and records the address scripts reach the server at, streams the server's log
    lines as ``[server@alpha]``, a map from this process through that address runs on both
    nodes, and ``achilles down`` stops everything on both hosts (`up` exits 0, no process is
    left in either namespace)."""
    env = tmp_path / ".env"
    achilles.gen_config(str(env), port=0)
    secret = achilles.load_config(env_file=str(env)).secret_key
    up = Up(str(tmp_path), ["--ssh", "alpha,beta:2", "--server-on", "first",
                            "--python", ssh_home.python, "--log-level", "INFO"])
    try:
        state = up.wait_ready(60)
        assert state["host"] == ssh_home.addresses["alpha"]
        assert any(f"ACHILLES_HOST={state['host']} ACHILLES_PORT={state['port']}" in line
                   for line in up.output)
        assert up.server_pids() == []
        servers = [p for p in ssh_home.node_pids("alpha") if b"achilles.server" in _cmdline(p)]
        assert len(servers) == 1
        assert not [p for p in ssh_home.node_pids("beta") if b"achilles.server" in _cmdline(p)]
        copied = os.path.join(os.readlink(f"/proc/{servers[0]}/cwd"), ".env")
        assert stat.S_IMODE(os.stat(copied).st_mode) == 0o600 and secret in open(copied).read()
        assert not any(secret.encode() in _cmdline(int(e)) for e in os.listdir("/proc") if e.isdigit())
        monkeypatch.chdir(tmp_path)  # this process reads the folder's .env, as a script would
        with achilles.connect(host=state["host"], port=state["port"]) as cluster:
            assert sum(cluster.map(abs, range(-50, 50), chunksize=5)) == 2500
            nodes = {n["name"]: n for n in cluster.status()["nodes"]}
        assert set(nodes) == {"alpha", "beta"} and nodes["beta"]["processes"] == 2
        for name in ("alpha", "beta"):
            assert nodes[name]["address"].startswith(ssh_home.addresses[name] + ":")
        up.wait_line("[server@alpha] ")
        down = up.achilles("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.proc.wait(30) == 0
        assert not os.path.exists(copied)
        for name in ("alpha", "beta"):
            wait_for(lambda: not ssh_home.node_pids(name), timeout=20, what=f"{name} to be empty")
    finally:
        up.close()


def test_server_on_is_refused_with_slurm(tmp_path) -> None:
    """``achilles up --slurm --server-on first`` exits 2 saying --server-on is for SSH hosts
    (under SLURM the server runs here)."""
    achilles.gen_config(str(tmp_path / ".env"), port=0)
    out = subprocess.run([sys.executable, "-m", "achilles", "up", "--slurm", "--server-on", "first"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--server-on is for --ssh/--hostfile" in out.stderr, out.stderr
