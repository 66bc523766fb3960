"""The Achilles node: connects to the server and runs chunks in a pool of worker processes.

Importable only as ``achilles.node``. The source folder ``node/`` sits at the top of a
checkout; importing it under its folder name would load every module a second time (and take
the name ``node`` from a module of the user's own).
"""

if __name__ != "achilles.node":
    raise ImportError(
        f"{__name__!r} here is the Achilles node role ({__path__[0]}), which is imported "
        f"only as 'achilles.node'. Import achilles.node instead; if you meant a module of "
        f"your own named {__name__!r}, put its folder before this checkout on sys.path (or "
        f"import achilles first, which makes {__name__!r} skip the checkout), or rename it.",
        name=__name__, path=__path__[0])
