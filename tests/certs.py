"""Test certificates for TLS and mutual TLS (a helper module, not a test file).

``make_certificates(directory)`` writes PEM files for a trusted CA, a server certificate for
``localhost`` / ``127.0.0.1`` and a client certificate (CN ``tenant-client``) signed by it, plus a
second, untrusted CA with a client certificate of its own (same CN) to check that a server refuses it.
All keys are EC P-256, unencrypted PKCS#8; certificates are valid from an hour ago for two days.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The common name of both client certificates.
CLIENT_CN = "tenant-client"


@dataclass(frozen=True)
class Certificates:
    """Paths of the PEM files written by ``make_certificates``."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fewshot tests"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (BasicConstraints CA=true, may sign certificates)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(common_name), _name(common_name), key, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    common_name: str,
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An end-entity certificate signed by ``ca`` for extended key usage ``usage``."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca_cert.subject, key, ca_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_certificates(directory: Path) -> Certificates:
    """Writes a fresh set of test certificates and keys into ``directory`` (created if needed):
    ``ca.pem``; ``server.pem``/``server.key`` (serverAuth, SAN DNS:localhost and IP:127.0.0.1) and
    ``client.pem``/``client.key`` (clientAuth, CN ``tenant-client``), both signed by that CA; and
    ``other-ca.pem`` with ``other-client.pem``/``other-client.key`` (clientAuth, same CN) signed by a
    second CA that nothing trusts."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca("fewshot test CA")
    server = _leaf(
        ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    client = _leaf(ca, CLIENT_CN, ExtendedKeyUsageOID.CLIENT_AUTH)
    other_ca = _ca("fewshot untrusted test CA")
    other_client = _leaf(other_ca, CLIENT_CN, ExtendedKeyUsageOID.CLIENT_AUTH)

    return Certificates(
        ca_cert=_write_cert(d / "ca.pem", ca[1]),
        server_cert=_write_cert(d / "server.pem", server[1]),
        server_key=_write_key(d / "server.key", server[0]),
        client_cert=_write_cert(d / "client.pem", client[1]),
        client_key=_write_key(d / "client.key", client[0]),
        other_ca_cert=_write_cert(d / "other-ca.pem", other_ca[1]),
        other_client_cert=_write_cert(d / "other-client.pem", other_client[1]),
        other_client_key=_write_key(d / "other-client.key", other_client[0]),
    )
