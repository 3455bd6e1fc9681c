"""A private CA and a server certificate for 127.0.0.1, as an Asterisk or Redis admin would make.

``make_pki(directory)`` writes ``ca.pem`` (the CA), ``bundle.pem`` (another CA first, then the
right one: every certificate of a bundle must be trusted), ``server.pem`` and ``server.key`` (for
servers run as processes, such as redis-server) and returns their paths, with ``server_options``
for Twisted TLS listeners.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import CertificateOptions

__all__ = ["make_pki"]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key: Any, issuer: x509.Name, signer: Any, serial: int,
                 extension: Any) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
            .sign(signer, hashes.SHA256()))


def _ca(subject: str, serial: int) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    constraints = x509.BasicConstraints(ca=True, path_length=None)
    return key, _certificate(subject, key, _name(subject), key, serial, constraints)


def make_pki(directory: Path) -> dict[str, Any]:
    ca_key, ca = _ca("Test PBX CA", 1)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate("pbx", key, ca.subject, ca_key, 2,
                        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    _, other_ca = _ca("Other CA", 3)
    pem = serialization.Encoding.PEM
    files = {name: directory / f"{name}.pem" for name in ("ca", "bundle", "server")}
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["bundle"].write_bytes(other_ca.public_bytes(pem) + b"\n" + ca.public_bytes(pem))
    files["server"].write_bytes(cert.public_bytes(pem))
    server_key = directory / "server.key"
    server_key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_key.chmod(0o600)
    from OpenSSL import crypto

    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
    )
    return {"ca_file": str(files["ca"]), "bundle": str(files["bundle"]), "cert_file": str(files["server"]),
            "key_file": str(server_key), "server_options": options}
