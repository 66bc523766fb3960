"""TLS: certificates made with ``cryptography`` and Twisted contexts for each role.

TLS wraps the connection; the HMAC handshake still runs inside it, so a peer must both trust
the certificate chain and know the shared secret. With a client CA on the server, TLS is
mutual: nodes and controllers must also present a certificate that CA signed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any, Dict, List, Optional, Sequence

from achilles.core.config import write_file_safely
from achilles.core.errors import ConfigError

CERT_FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")


def generate_certs(directory: str, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                   days: int = 825, overwrite: bool = False) -> Dict[str, str]:
    """Write a CA, a server certificate valid for ``hosts`` and a client certificate.

    Returns the paths by file name (``ca.pem``, ``server.pem``, ``server.key``, ``client.pem``,
    ``client.key``, ``ca.key``). Keys end mode 0600 and certificates 0644, even when they
    replace existing files; nothing is written through a symbolic link.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in CERT_FILES}
    existing = [p for p in paths.values() if os.path.lexists(p)]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists; pass overwrite=True (or --force) to replace it")
    now = datetime.datetime.now(datetime.timezone.utc)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Achilles"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, public: Any, issuer: Any) -> Any:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days)))

    ca_key = key()
    ca_name = name("Achilles cluster CA")
    ca = (builder("Achilles cluster CA", ca_key.public_key(), ca_name)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))

    sans: List[Any] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))

    def leaf(cn: str, usage: Any, san: bool) -> tuple:
        k = key()
        b = (builder(cn, k.public_key(), ca_name)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    server_key, server = leaf(hosts[0] if hosts else "achilles-server",
                              ExtendedKeyUsageOID.SERVER_AUTH, True)
    client_key, client = leaf("achilles-client", ExtendedKeyUsageOID.CLIENT_AUTH, False)

    def pem_key(k: Any) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    pem = serialization.Encoding.PEM
    for file_name, data in (("ca.pem", ca.public_bytes(pem)), ("ca.key", pem_key(ca_key)),
                            ("server.pem", server.public_bytes(pem)),
                            ("server.key", pem_key(server_key)),
                            ("client.pem", client.public_bytes(pem)),
                            ("client.key", pem_key(client_key))):
        write_file_safely(paths[file_name], data, overwrite=overwrite,
                          mode=0o600 if file_name.endswith(".key") else 0o644)
    return paths


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_context(cert: str, key: str, client_ca: Optional[str] = None) -> Any:
    """TLS options for the server; with ``client_ca`` peers must present a certificate."""
    from twisted.internet import ssl

    try:
        private = ssl.PrivateCertificate.loadPEM(_read(cert, "TLS certificate") + b"\n" +
                                                 _read(key, "TLS key"))
        if client_ca:
            authority = ssl.Certificate.loadPEM(_read(client_ca, "client CA certificate"))
            return private.options(authority)
        return private.options()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"invalid TLS certificate or key ({cert}, {key}): {exc}") from None


def client_context(host: str, ca: str, cert: Optional[str] = None, key: Optional[str] = None) -> Any:
    """TLS options for a node or controller: verify the server against ``ca`` and ``host``;
    present ``cert``/``key`` for mutual TLS."""
    from twisted.internet import ssl

    try:
        authority = ssl.Certificate.loadPEM(_read(ca, "CA certificate"))
        client = None
        if cert or key:
            if not (cert and key):
                raise ConfigError("mutual TLS needs both a client certificate and its key")
            client = ssl.PrivateCertificate.loadPEM(_read(cert, "TLS certificate") + b"\n" +
                                                    _read(key, "TLS key"))
        return ssl.optionsForClientTLS(host, trustRoot=authority, clientCertificate=client)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"invalid TLS files ({ca}): {exc}") from None
