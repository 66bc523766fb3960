"""Make ``achilles.server``, ``achilles.node`` and ``achilles.controller`` importable from a checkout.

In the source tree the three role packages live beside ``achilles/`` (``server/``, ``node/``,
``controller/``) and are mapped under ``achilles.`` by setuptools ``package_dir`` at install time.
When Python imports ``achilles`` straight from a checkout (running from the repository root, with
or without an install), this finder maps ``achilles.<role>`` to ``<checkout>/<role>`` so the
checkout is complete on its own and never half-shadows an installed copy.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Optional, Sequence

ROLES = ("server", "node", "controller")


class _RoleFinder(importlib.abc.MetaPathFinder):
    """Finds ``achilles.<role>`` in the checkout's top-level ``<role>/`` folder."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[ModuleSpec]:
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
    root = os.path.dirname(package_dir)
    if not all(os.path.isfile(os.path.join(root, r, "__init__.py")) for r in ROLES):
        return
    if not any(isinstance(f, _RoleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RoleFinder(root))
