"""Import boundaries, checked over the parsed source (every import, also inside functions).

Layers: the core (``achilles.core.*``) imports only the core; each role (``achilles.server``,
``achilles.node``, ``achilles.controller``, from the top-level ``server/``, ``node/``,
``controller/`` folders) imports only the core and itself; the facade (every other
``achilles.*`` module) may import anything. Third-party and standard-library imports are free.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = ("server", "node", "controller")


def source_modules(root: str) -> Dict[str, Tuple[str, bool]]:
    """``{module name: (path, is_package)}`` for every .py under achilles/ and the role folders,
    named as installed (``server/scheduler.py`` is ``achilles.server.scheduler``)."""
    found: Dict[str, Tuple[str, bool]] = {}
    for top, package in [("achilles", "achilles")] + [(r, f"achilles.{r}") for r in ROLES]:
        base = os.path.join(root, top)
        for folder, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(folder, base)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                if name == "__init__.py":
                    found[prefix] = (path, True)
                else:
                    found[f"{prefix}.{name[:-3]}"] = (path, False)
    return found


def layer(module: str) -> str:
    """``core``, ``facade``, the role's name, or ``external`` (not part of Achilles)."""
    parts = module.split(".")
    if parts[0] != "achilles":
        return "external"
    if len(parts) > 1 and parts[1] in ROLES:
        return parts[1]
    if len(parts) > 1 and parts[1] == "core":
        return "core"
    return "facade"


def imported_modules(path: str, module: str, is_package: bool,
                     known: Set[str]) -> List[Tuple[int, str]]:
    """``(line, module)`` for every import in the file, relative ones resolved; for
    ``from X import name`` the target is ``X.name`` when that is a module, else ``X``."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    package = module if is_package else module.rpartition(".")[0]
    out: List[Tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.append((node.lineno, candidate if candidate in known else base))
    return out


def allowed(source_layer: str, target_layer: str) -> bool:
    """The boundary rules (see the module docstring)."""
    if target_layer == "external" or source_layer == "facade":
        return True
    if source_layer == "core":
        return target_layer == "core"
    return target_layer in ("core", source_layer)


def violations(root: str) -> List[str]:
    """One line per import that crosses a boundary, saying where and what to do instead."""
    modules = source_modules(root)
    known = set(modules)
    problems = []
    for module, (path, is_package) in sorted(modules.items()):
        source = layer(module)
        for line, target in imported_modules(path, module, is_package, known):
            dest = layer(target)
            if not allowed(source, dest):
                rel = os.path.relpath(path, root)
                problems.append(
                    f"{rel}:{line}: {module} ({source}) imports {target} ({dest}); "
                    + ("the core may import only achilles.core" if source == "core" else
                       f"the {source} role may import only achilles.core and achilles.{source}")
                    + ": move what both need into achilles/core/")
    return problems


def test_the_tree_keeps_its_boundaries() -> None:
    """No module under achilles/, server/, node/ or controller/ crosses a layer boundary."""
    assert violations(ROOT) == []


def _write(root: str, rel: str, text: str = "") -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def test_checker_reports_every_kind_of_crossing(tmp_path) -> None:
    """The checker flags core->role, core->facade, role->role and role->facade imports, also
    inside functions and as relative imports, and accepts the allowed directions."""
    root = str(tmp_path)
    for rel in ["achilles/__init__.py", "achilles/api.py", "achilles/core/__init__.py",
                "server/__init__.py", "node/__init__.py", "controller/__init__.py"]:
        _write(root, rel)
    _write(root, "achilles/core/wire.py", "import json\n")
    _write(root, "achilles/core/bad.py",
           "from achilles.core import wire\n"
           "def f():\n    from achilles.server import jobs\n"
           "import achilles.api\n")
    _write(root, "server/jobs.py", "from achilles.core import wire\nfrom . import sched\n")
    _write(root, "server/sched.py", "from achilles.node import pool\n")
    _write(root, "node/pool.py", "from .. import api\nfrom achilles.core.wire import x\n")
    _write(root, "controller/cluster.py",
           "def g():\n    from achilles.graph import task\n    import achilles\n")
    _write(root, "achilles/local.py", "from achilles.controller import cluster\n")
    found = violations(root)
    pairs = sorted((p.split(":")[0], p.split(" imports ")[1].split(" ")[0]) for p in found)
    assert pairs == sorted([
        ("achilles/core/bad.py", "achilles.server.jobs"),
        ("achilles/core/bad.py", "achilles.api"),
        ("server/sched.py", "achilles.node.pool"),
        ("node/pool.py", "achilles.api"),
        ("controller/cluster.py", "achilles.graph"),
        ("controller/cluster.py", "achilles"),
    ]), found
    assert all("move what both need into achilles/core/" in p for p in found)


@pytest.mark.parametrize("source,target,ok", [
    ("achilles.core.wire", "achilles.core.errors", True),
    ("achilles.core.wire", "achilles.server.jobs", False),
    ("achilles.core.wire", "achilles.api", False),
    ("achilles.server.jobs", "achilles.server.graphs", True),
    ("achilles.server.jobs", "achilles.controller.job", False),
    ("achilles.node.worker", "achilles.graph", False),
    ("achilles.api", "achilles.controller.cluster", True),
    ("achilles.node.worker", "dill", True),
])
def test_rules_table(source: str, target: str, ok: bool) -> None:
    """Each pair of layers is allowed or refused exactly as the rules say."""
    assert allowed(layer(source), layer(target)) is ok


def _python(code: str, cwd: str) -> "subprocess.CompletedProcess[str]":
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_roles_are_single_module_objects_from_a_checkout() -> None:
    """From the checkout root, the roles import only as achilles.<role> (from the checkout's
    folders), no module is loaded twice, and `import server`/`node`/`controller` gives no copy."""
    code = textwrap.dedent(f"""
        import sys
        import achilles.server.scheduler, achilles.server.service, achilles.node.pool
        import achilles.node.worker, achilles.controller.cluster, achilles.core.wire
        for role in {ROLES!r}:
            try:
                __import__(role)
            except ImportError as exc:
                assert "achilles." + role in str(exc), exc
            else:
                raise AssertionError("import " + role + " gave a module")
        assert not [m for m in sys.modules if m.split(".")[0] in {ROLES!r}], sorted(sys.modules)
        files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
        files = [f for f in files if f and f.startswith({ROOT!r} + "/")]
        assert len(files) == len(set(files)), "a file of the checkout is loaded as two modules"
        print(achilles.server.scheduler.__file__)
    """)
    out = _python(code, ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join(ROOT, "server", "scheduler.py")


def test_bare_role_name_before_achilles_is_refused_clearly() -> None:
    """`import server` from the checkout root, before achilles is imported, fails with a
    message that names achilles.server and how to reach a module of one's own."""
    out = _python("import server", ROOT)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "achilles.server" in out.stderr
    assert "module of your own" in out.stderr


def test_users_own_module_named_like_a_role_is_not_shadowed(tmp_path) -> None:
    """With the checkout before a user's folder on sys.path, the user's own `server` module is
    the one `import server` finds once achilles is imported (not the checkout's role folder)."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "server.py").write_text("WHO = 'user'\n")
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {str(user)!r}]; import achilles, server; "
            "import achilles.server.scheduler; print(server.WHO)")
    out = _python(code, str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "user"
