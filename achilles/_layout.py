"""Make ``achilles.server``, ``achilles.node`` and ``achilles.controller`` importable from a checkout.

In the source tree the three role packages live beside ``achilles/`` (``server/``, ``node/``,
``controller/``) and are mapped under ``achilles.`` by setuptools ``package_dir`` at install time.
When Python imports ``achilles`` straight from a checkout (running from the repository root, with
or without an install), this finder maps ``achilles.<role>`` to ``<checkout>/<role>`` so the
checkout is complete on its own and never half-shadows an installed copy.

The same folders must never import under their folder names (``import server`` with the
checkout on ``sys.path``): that would make a second copy of each module and take the name from
a user's own ``server``/``node``/``controller`` module. Each role's ``__init__`` refuses any name
but ``achilles.<role>``, and once ``achilles`` is imported from a checkout this finder makes the
bare names skip the checkout, so a user's own module of that name is found as if the checkout
were not on ``sys.path``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
from importlib.machinery import PathFinder
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Optional, Sequence

ROLES = ("server", "node", "controller")


class _RoleFinder(importlib.abc.MetaPathFinder):
    """Finds ``achilles.<role>`` in the checkout's top-level ``<role>/`` folder, and looks for a
    bare ``<role>`` everywhere on ``sys.path`` except the checkout."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[ModuleSpec]:
        if fullname in ROLES:
            elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != self.root]
            return PathFinder.find_spec(fullname, elsewhere)
        prefix, _, role = fullname.partition(".")
        if prefix != "achilles" or role not in ROLES:
            return None
        folder = os.path.join(self.root, role)
        init = os.path.join(folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[folder]
        )


def install(package_dir: str) -> None:
    """Install the finder when ``package_dir`` is a checkout's ``achilles/`` folder."""
    if os.path.isdir(os.path.join(package_dir, ROLES[0])):
        return  # an installed tree: the roles sit inside the package already
    root = os.path.dirname(os.path.realpath(package_dir))
    if not all(os.path.isfile(os.path.join(root, r, "__init__.py")) for r in ROLES):
        return
    if not any(isinstance(f, _RoleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RoleFinder(root))
