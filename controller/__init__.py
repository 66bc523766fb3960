"""The controller library: the Pool API (map / imap / imap_unordered) over an Achilles cluster.

Importable only as ``achilles.controller``. The source folder ``controller/`` sits at the top of a
checkout; importing it under its folder name would load every module a second time (and take
the name ``controller`` from a module of the user's own).
"""

if __name__ != "achilles.controller":
    raise ImportError(
        f"{__name__!r} here is the Achilles controller role ({__path__[0]}), which is imported "
        f"only as 'achilles.controller'. Import achilles.controller instead; if you meant a module of "
        f"your own named {__name__!r}, put its folder before this checkout on sys.path (or "
        f"import achilles first, which makes {__name__!r} skip the checkout), or rename it.",
        name=__name__, path=__path__[0])
