"""Command line, configuration, kill and packaging, with real processes."""

from __future__ import annotations

import os
import shutil
import site
import stat
import subprocess
import sys
import venv

import pytest

import achilles
from achilles.core.config import Config, gen_config, load_config
from achilles.controller.cluster import Cluster
from achilles.core.errors import AchillesError, ConfigError
from conftest import ROOT, group_members, wait_for

pytestmark = pytest.mark.timeout(120)


def run(args, cwd, env=None, timeout=90):
    return subprocess.run(args, cwd=str(cwd), capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def test_kill_stops_every_process(daemons, secret):
    """kill(command_verified=True) stops every node and the server and returns when they are
    gone: no server, node or worker process is left."""
    port = daemons.server(secret)
    nodes = [daemons.start("node", "--host", "127.0.0.1", "--port", str(port), "--processes", "2",
                           "--name", f"n{i}", secret=secret) for i in range(2)]
    c = Cluster(Config(host="127.0.0.1", port=port, username="tester", secret_key=secret))
    wait_for(lambda: len(c.status()["nodes"]) == 2, what="two nodes")
    assert c.map(abs, [-1]) == [1]
    assert c.kill(command_verified=True) == 2
    server = daemons.procs[0]
    for proc in [server] + nodes:
        assert proc.wait(10) == 0, daemons.log(proc)
    for proc in [server] + nodes:
        wait_for(lambda proc=proc: not group_members(proc.pid), timeout=10, what="workers to exit")


def test_kill_without_terminal_refuses(make_cluster):
    """Without a terminal, kill() refuses and names command_verified=True; nothing stops."""
    lc = make_cluster(nodes=1, processes=1)
    with pytest.raises(AchillesError, match="command_verified=True"):
        lc.cluster.kill()
    assert lc.cluster.map(abs, [-5]) == [5]
    assert lc.server.poll() is None


def test_demo_exits_zero(tmp_path):
    """`achilles demo` runs a job on a local cluster and exits 0, leaving nothing behind."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = run([sys.executable, "-m", "achilles", "demo", "--processes", "2"], tmp_path, env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "demo finished" in out.stdout


def test_config_writes_private_env(tmp_path):
    """`achilles config` writes a 0600 .env with a fresh secret and says where; it is then used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    env["PYTHONPATH"] = ROOT
    out = run([sys.executable, "-m", "achilles", "config", "--port", "4567"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    path = tmp_path / ".env"
    assert str(path) in out.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "ACHILLES_PORT=4567" in text
    key = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ACHILLES_SECRET_KEY=")][0]
    assert len(key) >= 32 and key not in out.stdout
    again = run([sys.executable, "-m", "achilles", "config"], tmp_path, env)
    assert again.returncode == 2 and "--force" in again.stderr
    zero = run([sys.executable, "-m", "achilles", "config", "--port", "0", "--force"], tmp_path, env)
    assert zero.returncode == 0 and "ACHILLES_PORT=0\n" in path.read_text()


def test_config_precedence(tmp_path, monkeypatch):
    """Arguments beat the environment, which beats the .env file."""
    for var in list(os.environ):
        if var.startswith("ACHILLES_"):
            monkeypatch.delenv(var)
    s1, s2 = "first-secret-0123456789", "second-secret-0123456789"
    gen_config(str(tmp_path / ".env"), host="10.1.1.1", port=1111, username="file", secret_key=s1)
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert (cfg.host, cfg.port, cfg.username, cfg.secret_key) == ("10.1.1.1", 1111, "file", s1)
    monkeypatch.setenv("ACHILLES_PORT", "2222")
    monkeypatch.setenv("ACHILLES_SECRET_KEY", s2)
    cfg = load_config()
    assert (cfg.port, cfg.secret_key, cfg.username) == (2222, s2, "file")
    cfg = load_config(port=3333, username="arg")
    assert (cfg.port, cfg.username) == (3333, "arg")
    assert s2 not in repr(cfg)
    other = tmp_path / "other.env"
    other.write_text("ACHILLES_USERNAME=elsewhere\n")
    os.chmod(other, 0o600)
    monkeypatch.setenv("ACHILLES_ENV_FILE", str(other))
    assert load_config().username == "elsewhere"


def test_world_readable_env_warns(tmp_path, monkeypatch):
    """A .env readable by other users produces a warning naming chmod 600."""
    for var in list(os.environ):
        if var.startswith("ACHILLES_"):
            monkeypatch.delenv(var)
    path = gen_config(str(tmp_path / ".env"), secret_key="a-long-enough-secret-0123")
    os.chmod(path, 0o644)
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="chmod 600"):
        load_config()


def test_bad_config_is_one_clear_line(tmp_path):
    """A missing secret or a bad port gives one line saying what to do, not a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    env["PYTHONPATH"] = ROOT
    out = run([sys.executable, "-m", "achilles.server", "--port", "0"], tmp_path, env)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "achilles config" in out.stderr
    env["ACHILLES_SECRET_KEY"] = "x" * 32
    env["ACHILLES_PORT"] = "nine"
    out = run([sys.executable, "-m", "achilles.node"], tmp_path, env)
    assert out.returncode == 2 and "ACHILLES_PORT must be a whole number" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_secret_in_library(monkeypatch, tmp_path):
    """achilles.connect() without a secret raises ConfigError telling how to get one."""
    for var in list(os.environ):
        if var.startswith("ACHILLES_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="ACHILLES_SECRET_KEY"):
        achilles.connect()


def _pip_into(env_dir) -> list:
    """Create a fresh venv at ``env_dir``; return the pip command that installs into it.

    This environment's pip installs into it (``pip --python``, pip 22.3+), so the venv needs no
    pip of its own: bootstrapping one (ensurepip) was most of this test's time."""
    import pip

    if tuple(int(p) for p in pip.__version__.split(".")[:2]) >= (22, 3):
        venv.create(env_dir, with_pip=False)
        return [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python")]
    venv.create(env_dir, with_pip=True)
    return [str(env_dir / "bin" / "python"), "-m", "pip"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_gives_console_scripts(tmp_path, editable):
    """`pip install .` (and `pip install -e .`) into a fresh venv installs achilles,
    achilles-server and achilles-node, with the roles under achilles.* and nothing named
    server/node/controller top-level, and the installed copy runs a map on a local cluster."""
    env_dir = tmp_path / "venv"
    py = env_dir / "bin" / "python"
    pip = _pip_into(env_dir)
    # Offline: the new venv sees this environment's packages (twisted, setuptools, wheel...)
    # through a folder of links that leaves out any Achilles installed here, so only the copy
    # installed below can be imported.
    view = tmp_path / "outer-packages"
    view.mkdir()
    for sp in (p for p in site.getsitepackages() if os.path.isdir(p)):
        for entry in os.listdir(sp):
            if entry.lower().startswith(("achilles", "__editable__")) or (view / entry).exists():
                continue
            (view / entry).symlink_to(os.path.join(sp, entry))
    site_dir = next((env_dir / "lib").glob("python*/site-packages"))
    (site_dir / "outer-env.pth").write_text(f"{view}\n")
    source = tmp_path / "src"  # build from a copy: the build leaves build/ and egg-info behind
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    out = run(pip + ["install", "--no-deps", "--no-build-isolation", "-q"]
              + (["-e"] if editable else []) + [str(source)], tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    for script in ("achilles", "achilles-server", "achilles-node"):
        res = run([str(env_dir / "bin" / script), "--help"], tmp_path)
        assert res.returncode == 0, res.stderr
        assert "usage" in res.stdout.lower()
    check = run([str(py), "-c", (
        "import achilles.server.scheduler, achilles.node.pool, achilles.controller.cluster, "
        "importlib.util as u, achilles, os;"
        "assert all(u.find_spec(m) is None for m in ('server', 'node', 'controller'));"
        "print(os.path.dirname(achilles.__file__))")], tmp_path)
    assert check.returncode == 0, check.stderr
    assert str(source if editable else env_dir) in check.stdout
    assert not any((site_dir / name).exists() for name in ("server", "node", "controller"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_") and k != "PYTHONPATH"}
    # A real cluster from the installed copy: its server and node daemons, started with the
    # venv's Python, import achilles.server / achilles.node from the install.
    job = run([str(py), "-c", "import achilles\n"
               "with achilles.LocalCluster(nodes=1, processes=1) as c:\n"
               "    print(c.map(abs, [-1, -2, 3]))\n"], tmp_path, env, timeout=120)
    assert job.returncode == 0 and job.stdout.strip() == "[1, 2, 3]", job.stdout + job.stderr
