"""Import boundaries, checked over the parsed source (every import, also inside functions).

Layers: the core (``achilles.core.*``) imports only the core; each role (``achilles.server``,
``achilles.node``, ``achilles.controller``, from the top-level ``server/``, ``node/``,
``controller/`` folders) imports only the core and itself; the facade (every other
``achilles.*`` module) may import anything. Third-party and standard-library imports are free.
"""

from __future__ import annotations

import ast
import os
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
