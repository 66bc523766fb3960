"""The Achilles server: authenticates peers, schedules chunks over nodes, streams results back.

Importable only as ``achilles.server``. The source folder ``server/`` sits at the top of a
checkout; importing it under its folder name would load every module a second time (and take
the name ``server`` from a module of the user's own).
"""

if __name__ != "achilles.server":
    raise ImportError(
        f"{__name__!r} here is the Achilles server role ({__path__[0]}), which is imported "
        f"only as 'achilles.server'. Import achilles.server instead; if you meant a module of "
        f"your own named {__name__!r}, put its folder before this checkout on sys.path (or "
        f"import achilles first, which makes {__name__!r} skip the checkout), or rename it.",
        name=__name__, path=__path__[0])
