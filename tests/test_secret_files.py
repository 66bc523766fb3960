"""Files holding secrets, attacked for real on the filesystem: links planted where the .env or a
private key is written, keys left readable by an earlier mode, and .env files that someone
else can change."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings

import pytest

from achilles.core.config import gen_config, load_config
from achilles.core.errors import ConfigError
from achilles.core.tls import generate_certs
from conftest import ROOT

pytestmark = pytest.mark.timeout(120)

SECRET = "secret-files-test-0123456789abcdef"


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def achilles_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACHILLES_")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "achilles", *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No ACHILLES_* variables; the working directory is tmp_path."""
    for var in list(os.environ):
        if var.startswith("ACHILLES_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- writing: gen_config ------------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "force"])
def test_gen_config_refuses_a_dangling_symlink(tmp_path, overwrite):
    """A dangling symlink planted at the .env path makes gen_config refuse (with or without
    overwrite): the link's target is never created, so the secret goes nowhere."""
    target = tmp_path / "elsewhere" / "stolen"
    target.parent.mkdir()
    link = tmp_path / ".env"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        gen_config(str(link), secret_key=SECRET, overwrite=overwrite)
    assert not os.path.lexists(target)
    assert os.path.islink(link)


def test_config_command_refuses_a_symlink_to_an_existing_file(tmp_path):
    """`achilles config --force` over a symlink to another file exits 2 with one line naming
    the link, and leaves the other file exactly as it was."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.chmod(victim, 0o644)
    (tmp_path / ".env").symlink_to(victim)
    out = achilles_cli("config", "--force", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "symbolic link" in out.stderr and out.stderr.strip().count("\n") == 0
    assert victim.read_text() == "precious\n" and mode_of(victim) == 0o644


def test_gen_config_refuses_a_hard_link(tmp_path):
    """With overwrite, a .env that is a hard link to another file is refused and that file is
    left untouched (writing would put the secret in it)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / ".env")
    with pytest.raises(ConfigError, match="hard links"):
        gen_config(str(tmp_path / ".env"), secret_key=SECRET, overwrite=True)
    assert victim.read_text() == "precious\n"


def test_gen_config_force_makes_an_open_env_private(tmp_path):
    """Replacing a 0644 .env with overwrite leaves it 0600 with the new secret."""
    path = tmp_path / ".env"
    path.write_text("ACHILLES_SECRET_KEY=old-secret-0123456789abc\n")
    os.chmod(path, 0o644)
    gen_config(str(path), secret_key=SECRET, overwrite=True)
    assert mode_of(path) == 0o600
    assert f"ACHILLES_SECRET_KEY={SECRET}\n" in path.read_text()
    assert "old-secret" not in path.read_text()


def test_gen_config_mode_ignores_umask(tmp_path):
    """A new .env is exactly 0600 whatever the umask (fchmod on the open file)."""
    old = os.umask(0o777)
    try:
        path = gen_config(str(tmp_path / ".env"), secret_key=SECRET)
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600


# --- writing: certificates ---------------------------------------------------------------------

def test_certs_force_turns_a_readable_key_private(tmp_path):
    """`achilles certs --force` over keys someone made 0644 writes new keys that end 0600
    (certificates 0644)."""
    certs = tmp_path / "certs"
    paths = generate_certs(str(certs))
    old_key = open(paths["server.key"], "rb").read()
    for name in ("ca.key", "server.key", "client.key"):
        os.chmod(paths[name], 0o644)
    out = achilles_cli("certs", str(certs), "--force", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("ca.key", "server.key", "client.key"):
        assert mode_of(paths[name]) == 0o600, name
    for name in ("ca.pem", "server.pem", "client.pem"):
        assert mode_of(paths[name]) == 0o644, name
    assert open(paths["server.key"], "rb").read() != old_key


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "force"])
def test_certs_refuse_a_symlinked_key(tmp_path, overwrite):
    """A dangling symlink planted at client.key makes generate_certs refuse, and its target is
    never created."""
    certs = tmp_path / "certs"
    certs.mkdir()
    target = tmp_path / "stolen.key"
    (certs / "client.key").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link" if overwrite else "exists"):
        generate_certs(str(certs), overwrite=overwrite)
    assert not os.path.lexists(target)


# --- reading: .env anyone else can change -------------------------------------------------------

def load_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config()
    return cfg, [str(w.message) for w in caught]


def test_private_env_loads_silently(clean_env):
    """Control: a 0600 .env owned by this user loads without any warning."""
    gen_config(".env", secret_key=SECRET)
    cfg, messages = load_warnings()
    assert cfg.secret_key == SECRET and messages == []


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602], ids=["0666", "group", "other"])
def test_writable_env_warns(clean_env, mode):
    """A .env that the group or everyone may write gives a warning saying so and naming
    chmod 600; it is still read (and the secret is not in the message)."""
    gen_config(".env", secret_key=SECRET)
    os.chmod(".env", mode)
    cfg, messages = load_warnings()
    assert cfg.secret_key == SECRET
    writable = [m for m in messages if "writable by other users" in m]
    assert len(writable) == 1 and "chmod 600" in writable[0]
    assert all(SECRET not in m for m in messages)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_env_owned_by_another_user_warns(clean_env):
    """A 0600 .env chowned to another uid (65534) gives a warning naming that owner."""
    gen_config(".env", secret_key=SECRET)
    os.chown(".env", 65534, 65534)
    cfg, messages = load_warnings()
    assert cfg.secret_key == SECRET
    foreign = [m for m in messages if "owned by another user (uid 65534)" in m]
    assert len(foreign) == 1 and "achilles config" in foreign[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_env_file_variable_is_checked_too(clean_env, monkeypatch):
    """The file named by ACHILLES_ENV_FILE gets the same checks as ./.env."""
    path = gen_config(str(clean_env / "cluster.env"), secret_key=SECRET)
    os.chmod(path, 0o666)
    os.chown(path, 65534, 65534)
    monkeypatch.setenv("ACHILLES_ENV_FILE", path)
    _, messages = load_warnings()
    assert any("writable by other users" in m for m in messages)
    assert any("owned by another user" in m for m in messages)
