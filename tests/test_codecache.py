"""The controller's cache of pickled functions (achilles.core.codecache): a function is
pickled once while nothing its bytes depend on changes, and never served stale."""

from __future__ import annotations

import math

import pytest

from achilles.core.codecache import dumps_code_cached
from achilles.core.serialization import dumps_code, loads_code
from tasks import square

pytestmark = pytest.mark.timeout(60)


def by_value(source: str) -> dict:
    """Run ``source`` as if it were a script's ``__main__``: its functions travel by value."""
    namespace: dict = {"__name__": "__main__"}
    exec(source, namespace)
    return namespace


def fresh_and_cached(func):
    """The cached bytes, after checking they are what pickling afresh gives."""
    cached = dumps_code_cached(func)
    assert cached == dumps_code(func)
    return cached


def test_unchanged_function_is_pickled_once():
    """A by-value function whose code, globals and closure are unchanged is served from the
    cache: the same bytes object, equal to a fresh pickle; by-reference functions too."""
    ns = by_value("K = 3\ndef f(x):\n    return math.floor(x) + K\n")
    ns["math"] = math
    first = fresh_and_cached(ns["f"])
    assert dumps_code_cached(ns["f"]) is first
    ref = fresh_and_cached(square)
    assert dumps_code_cached(square) is ref


def test_changed_global_is_pickled_afresh():
    """Rebinding a global the function reads (a number, a module, a helper function, or a
    new global that shadows a builtin) gives new bytes that load to the new behaviour."""
    ns = by_value("K = 3\ndef helper(x):\n    return x + K\n"
                  "def f(x):\n    return helper(x) + len([x])\n")
    f = ns["f"]
    before = fresh_and_cached(f)
    assert loads_code(before)(1) == 5
    ns["K"] = 10  # read by the helper function, one level down
    after = fresh_and_cached(f)
    assert after != before and loads_code(after)(1) == 12
    ns["helper"] = lambda x: -x
    assert loads_code(fresh_and_cached(f))(1) == 0
    ns["len"] = lambda seq: 100  # was the builtin
    assert loads_code(fresh_and_cached(f))(1) == 99


def test_changed_closure_defaults_and_attributes_are_pickled_afresh():
    """A closure cell rebound, defaults replaced or mutated, a function attribute added and
    the code object swapped each give fresh bytes."""
    k = 1

    def f(x, y=2, *, z=3):
        return x + y + z + k

    assert loads_code(fresh_and_cached(f))(0) == 6
    k = 100
    assert loads_code(fresh_and_cached(f))(0) == 105
    f.__defaults__ = (20,)
    assert loads_code(fresh_and_cached(f))(0) == 123
    f.__kwdefaults__["z"] = 0
    assert loads_code(fresh_and_cached(f))(0) == 120
    f.marker = "x"
    assert loads_code(fresh_and_cached(f)).marker == "x"
    f.__code__ = (lambda x, y=2, *, z=3: -x - k).__code__
    assert loads_code(fresh_and_cached(f))(7) == -107


def test_mutable_state_is_never_cached():
    """A function that reads a mutable value (a list in a global or a cell, an instance) is
    pickled on every call, so a change inside the value is always seen."""
    ns = by_value("ITEMS = [1]\ndef f(x):\n    return x + sum(ITEMS)\n")
    f = ns["f"]
    first = fresh_and_cached(f)
    ns["ITEMS"].append(10)
    second = fresh_and_cached(f)
    assert second is not first and loads_code(second)(0) == 11
    box = {"n": 1}

    def g(x):
        return x + box["n"]

    assert dumps_code_cached(g) is not dumps_code_cached(g)
    box["n"] = 5
    assert loads_code(dumps_code_cached(g))(0) == 5


def test_changed_closure_reaches_the_nodes(cluster):
    """On a real cluster, calls with the same closure object see each new value of its
    cell and of a mutable value it reads: the cache never sends an old function."""
    offset = 0
    seen = [0]

    def add(x):
        return x + offset + seen[0]

    assert cluster.map(add, [1]) == [1]
    offset = 10
    assert cluster.map(add, [1]) == [11]
    assert cluster.map(add, [1]) == [11]
    seen[0] = 5
    assert cluster.map(add, [1]) == [16]
