"""mypy over the package as installed (what users' type checkers see), with zero errors.

The checkout maps ``achilles.server`` & co. onto top-level folders only at run time, which type
checkers cannot follow; the installed tree has the real layout, so the check installs a copy of
the checkout into a temporary folder and runs ``mypy -p achilles`` there with the project's
``[mypy]`` settings from setup.cfg.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = ("server", "node", "controller")


def _run(args, cwd, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A copy of the checkout installed with pip into a private folder: ``(source, target)``."""
    base = tmp_path_factory.mktemp("typecheck")
    source, target = base / "src", base / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
        ".mypy_cache", "tests", "bench", "examples"))
    out = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                "--no-compile", "--target", str(target), str(source)], base, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return source, target


def test_installed_package_is_typed(installed) -> None:
    """The install ships py.typed for achilles and each role, and nothing top-level but
    achilles (no server/node/controller beside it)."""
    _, target = installed
    for package in ["achilles", "achilles/core"] + [f"achilles/{r}" for r in ROLES]:
        assert (target / package / "py.typed").is_file(), package
    assert not any((target / r).exists() for r in ROLES)


@pytest.mark.timeout(600)
def test_mypy_passes_on_the_installed_package(installed) -> None:
    """`mypy -p achilles` over the installed copy, with setup.cfg's [mypy] settings, reports
    no error."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    source, target = installed
    out = _run([sys.executable, "-m", "mypy", "--config-file", str(source / "setup.cfg"),
                "--cache-dir", str(target.parent / "mypy-cache"), "--no-error-summary",
                "-p", "achilles"], target, timeout=540)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_installed_package_ships_the_dashboard(installed) -> None:
    """The install carries the dashboard's page, script and style sheet, and the installed
    server reads them as package data (no checkout, no CDN)."""
    _, target = installed
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        assert (target / "achilles" / "server" / "static" / name).is_file(), name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", "import achilles.server.dashboard as d, sys; "
                          "sys.stdout.write(d.__file__ + ' ' + str(len(d.static_file('index.html'))))"],
                         cwd=str(target.parent), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path, size = out.stdout.split()
    assert path.startswith(str(target)) and int(size) > 0
