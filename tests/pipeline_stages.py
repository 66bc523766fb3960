"""Pipeline stages used by the tests (importable by the nodes, which get the caller's sys.path)."""

import os

import achilles
from tasks import TaskFailure, pause


class Add(achilles.Stage):
    """Adds the number given to setup."""

    def setup(self, n):
        self.n = n

    def do(self, x):
        self.put(x + self.n)


class Double(achilles.Stage):
    def do(self, x):
        self.put(2 * x)


class Tag(achilles.Stage):
    """Passes ``(name, x)`` on."""

    def setup(self, name):
        self.name = name

    def do(self, x):
        self.put((self.name, x))


class Explode(achilles.Stage):
    """Emits ``x`` copies of ``x`` (zero for 0)."""

    def do(self, x):
        for _ in range(x):
            self.put(x)


class Lifecycle(achilles.Stage):
    """Records setup and teardown in files under ``folder``; teardown puts the item count."""

    def setup(self, folder):
        self.folder = folder
        self.count = 0
        with open(os.path.join(folder, f"setup-{os.getpid()}"), "w"):
            pass

    def do(self, x):
        self.count += 1
        self.put(x)

    def teardown(self):
        with open(os.path.join(self.folder, f"teardown-{os.getpid()}"), "w") as fh:
            fh.write(str(self.count))
        self.put(("count", self.count))


class Count(achilles.Stage):
    """A source stage: generates 0..n-1 with meta {"i": i}."""

    def setup(self, n):
        for i in range(n):
            self.meta["i"] = i
            self.put(i)


class Forever(achilles.Stage):
    """An endless source; teardown leaves a file so the test sees it ran."""

    def setup(self, folder):
        self.folder = folder
        i = 0
        while True:
            self.put(i)
            i += 1

    def teardown(self):
        with open(os.path.join(self.folder, f"source-teardown-{os.getpid()}"), "w"):
            pass


class MetaTag(achilles.Stage):
    """Sets meta["seen"] to its argument and passes the item on."""

    def setup(self, mark):
        self.mark = mark

    def do(self, x):
        self.meta["seen"] = self.meta.get("seen", "") + self.mark
        self.put(x)


class ReadMeta(achilles.Stage):
    """Outputs ``(x, meta)`` as the last stage saw them."""

    def do(self, x):
        self.put((x, dict(self.meta)))


class Slow(achilles.Stage):
    def setup(self, seconds):
        self.seconds = seconds

    def do(self, x):
        pause(self.seconds)
        self.put(x)


class PidFile(achilles.Stage):
    """Writes its pid to ``folder`` at setup, then works ``seconds`` per item."""

    def setup(self, folder, seconds):
        self.seconds = seconds
        with open(os.path.join(folder, f"pid-{os.getpid()}"), "w"):
            pass

    def do(self, x):
        pause(self.seconds)
        self.put(x)


class FailOn(achilles.Stage):
    """Raises TaskFailure on multiples of ``k``."""

    def setup(self, k):
        self.k = k

    def do(self, x):
        if x % self.k == 0:
            raise TaskFailure(f"no multiples of {self.k}: {x}")
        self.put(x)


class Collecting(FailOn):
    on_error = "collect"


class Gpu(achilles.Stage):
    resources = {"gpu": 1}

    def do(self, x):
        self.put(self.node_name)


def hostname_of_node(x):
    """Which process ran the item (a function stage)."""
    return (os.getpid(), x)


class BadSetup(achilles.Stage):
    def setup(self):
        raise TaskFailure("cannot load the model")


class DieInSetup(achilles.Stage):
    """Its process dies in setup, every time."""

    def setup(self):
        os._exit(3)


class Marker(achilles.Stage):
    """Writes its pid at setup and a file at teardown; slow per item."""

    def setup(self, folder):
        self.folder = folder
        with open(os.path.join(folder, f"pid-{os.getpid()}"), "w"):
            pass

    def do(self, x):
        pause(0.01)
        self.put(x)

    def teardown(self):
        with open(os.path.join(self.folder, f"teardown-{os.getpid()}"), "w"):
            pass


class Chatty(achilles.Stage):
    """Prints in setup, do and teardown, writes to stderr and logs a warning per item."""

    def setup(self):
        print("setting up")

    def do(self, x):
        import logging
        import sys

        print(f"out {x}")
        sys.stderr.write(f"err {x}\n")
        logging.getLogger("chatty").warning("log %d", x)
        self.put(x)

    def teardown(self):
        print("tearing down", end="")  # no newline: still a line at the end


class ChattyFail(achilles.Stage):
    """Prints before raising on 3."""

    def do(self, x):
        print(f"before {x}", flush=True)
        if x == 3:
            raise TaskFailure("three")
        self.put(x)
