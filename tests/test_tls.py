"""TLS (server certificates, mutual TLS) under the HMAC handshake, and `achilles certs`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from achilles.core.config import Config
from achilles.controller.cluster import Cluster
from achilles.core.errors import AchillesError, ConfigError, ConnectionFailed
from achilles.core.tls import generate_certs
from conftest import ROOT
from tasks import square

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("mode", [True, "mutual"], ids=["tls", "mutual-tls"])
def test_map_over_tls(make_cluster, mode):
    """A whole cluster (server, node, controller) works over TLS and mutual TLS."""
    lc = make_cluster(nodes=1, processes=2, tls=mode, log_level="INFO")
    assert lc.cluster.map(square, range(50)) == [x * x for x in range(50)]
    assert "TLS" in lc.log_text("server")


def test_plain_client_against_tls_server(make_cluster):
    """A controller without TLS cannot talk to a TLS server and is told to set ACHILLES_TLS_CA."""
    lc = make_cluster(nodes=1, processes=1, tls=True)
    cfg = Config(host="127.0.0.1", port=lc.port, username="local",
                 secret_key=lc.cluster.config.secret_key)
    with pytest.raises(AchillesError, match="ACHILLES_TLS_CA"):
        Cluster(cfg, timeout=2)


def test_wrong_ca_is_refused(make_cluster, tmp_path):
    """A controller that trusts another CA refuses the server's certificate, and says so as a
    TLS failure (not as a busy server to retry)."""
    lc = make_cluster(nodes=1, processes=1, tls=True)
    other = generate_certs(str(tmp_path / "other"))
    cfg = Config(host="127.0.0.1", port=lc.port, username="local",
                 secret_key=lc.cluster.config.secret_key, tls_ca=other["ca.pem"])
    with pytest.raises(ConnectionFailed, match="TLS with the server .* ACHILLES_TLS_CA"):
        Cluster(cfg, timeout=5)


def test_mutual_tls_needs_client_certificate(make_cluster):
    """With mutual TLS, a controller without a client certificate is refused even with the
    right secret and CA, and told it is TLS that failed."""
    lc = make_cluster(nodes=1, processes=1, tls="mutual")
    cfg = Config(host="127.0.0.1", port=lc.port, username="local",
                 secret_key=lc.cluster.config.secret_key, tls_ca=lc.tls["tls_ca"])
    with pytest.raises(ConnectionFailed, match="TLS with the server .* ACHILLES_TLS_CLIENT_CERT"):
        c = Cluster(cfg, timeout=5)
        c.status()  # TLS 1.3 may report the refusal only on first use
    assert lc.cluster.map(square, [2]) == [4]


def test_tls_config_errors_are_clear(tmp_path):
    """Half a TLS configuration or a missing file is a ConfigError saying what is missing."""
    with pytest.raises(ConfigError, match="ACHILLES_TLS_KEY"):
        Config(tls_cert="x.pem").server_tls()
    with pytest.raises(ConfigError, match="cannot read the CA certificate"):
        Config(tls_ca=str(tmp_path / "missing.pem")).client_tls()
    with pytest.raises(ConfigError, match="ACHILLES_TLS_CA"):
        Config(tls_client_cert="c.pem", tls_client_key="k.pem").client_tls()


def test_certs_command(tmp_path):
    """`achilles certs DIR` writes a CA, server and client certificates; keys are 0600."""
    out = subprocess.run([sys.executable, "-m", "achilles", "certs", str(tmp_path / "c"),
                          "--host", "192.0.2.10", "--host", "example.org"],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    for name in ("ca.pem", "server.pem", "client.pem"):
        assert (tmp_path / "c" / name).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    for name in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE((tmp_path / "c" / name).stat().st_mode) == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "example.org" in san.get_values_for_type(x509.DNSName)
    assert "--tls-ca" in out.stdout
