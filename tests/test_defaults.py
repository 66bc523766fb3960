"""Inside ``with LocalCluster()`` / ``with connect()`` the module-level calls use that cluster."""

from __future__ import annotations

import threading

import pytest

import achilles
from achilles import task
from achilles.local import LocalCluster
from conftest import group_members

pytestmark = pytest.mark.timeout(90)


@task
def plus(a, b):
    return a + b


@task
def const(n):
    return n


def square(x):
    return x * x


@pytest.fixture
def no_config(tmp_path, monkeypatch):
    """No secret anywhere: outside a ``with`` block the module-level calls cannot connect."""
    monkeypatch.chdir(tmp_path)
    for var in ("ACHILLES_SECRET_KEY", "ACHILLES_ENV_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("achilles.api._default", None)


def _gone(lc: LocalCluster) -> None:
    for proc in lc.nodes + [lc.server]:
        assert not group_members(proc.pid), f"processes of group {proc.pid} outlived the test"


def test_local_cluster_block_is_the_default(no_config):
    """Inside ``with LocalCluster() as cluster``: achilles.map/imap/imap_unordered/status,
    g.result() and g() (also from a thread started in the block) run on that cluster, with no
    secret configured; after the block they need a configuration again (ConfigError)."""
    lc = LocalCluster(nodes=1, processes=2)
    with lc as cluster:
        assert achilles.default_cluster() is cluster
        assert achilles.map(square, range(10)) == [x * x for x in range(10)]
        assert list(achilles.imap(square, range(5))) == [0, 1, 4, 9, 16]
        assert sorted(achilles.imap_unordered(square, range(5))) == [0, 1, 4, 9, 16]
        assert len(achilles.status()["nodes"]) == 1
        g = plus(plus(const(6), const(1)), plus(const(5), const(-2)))
        assert g.result() == 10
        assert g() == 10
        seen = []
        t = threading.Thread(target=lambda: seen.append(plus(const(1), const(2)).result()))
        t.start()
        t.join(30)
        assert seen == [3]
    _gone(lc)
    with pytest.raises(achilles.ConfigError, match="secret"):
        achilles.map(square, range(3))
    with pytest.raises(achilles.ConfigError, match="secret"):
        plus(const(1), const(2)).result()


def test_connect_block_is_the_default_and_blocks_nest(no_config):
    """``with achilles.connect(...) as c`` makes ``c`` the default inside the block, nested
    inside a LocalCluster block; leaving it restores the LocalCluster's connection, and
    leaving that leaves no default."""
    lc = LocalCluster(nodes=1, processes=1)
    with lc as outer:
        with achilles.connect(host="127.0.0.1", port=lc.port, username="local",
                              secret_key=lc._secret) as inner:
            assert inner is not outer
            assert achilles.default_cluster() is inner
            assert plus(const(2), const(3))() == 5
            assert achilles.map(square, [3]) == [9]
        assert achilles.default_cluster() is outer
        assert achilles.map(square, [4]) == [16]
    _gone(lc)
    with pytest.raises(achilles.ConfigError, match="secret"):
        achilles.default_cluster()
