"""Certificates made in the test (PyPI cryptography), for servers and clients on 127.0.0.1.

make_certs(dir) writes a CA, a server certificate for IP 127.0.0.1, a client certificate
signed by the CA, and one signed by another CA (for "not signed by our CA" tests).
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

_VALID = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Certs:
    """Paths of PEM files; server_pem is the certificate and its key in one file (influxd)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    server_pem: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path  # signed by other_ca_cert, not by ca_cert
    other_client_key: Path


@dataclass(frozen=True)
class _Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def make_certs(directory: Path) -> Certs:
    """Write every certificate and key under directory and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory / "ca", "influx-spout test CA")
    other_ca = _make_ca(directory / "other-ca", "another CA")
    server_cert, server_key = _make_leaf(directory / "server", ca, "127.0.0.1", server=True)
    client_cert, client_key = _make_leaf(directory / "client", ca, "client", server=False)
    other_cert, other_key = _make_leaf(directory / "other-client", other_ca, "rogue", False)
    server_pem = directory / "server.pem"
    server_pem.write_bytes(server_cert.read_bytes() + server_key.read_bytes())
    return Certs(
        ca_cert=directory / "ca.crt",
        server_cert=server_cert,
        server_key=server_key,
        server_pem=server_pem,
        client_cert=client_cert,
        client_key=client_key,
        other_ca_cert=directory / "other-ca.crt",
        other_client_cert=other_cert,
        other_client_key=other_key,
    )


def _make_ca(stem: Path, common_name: str) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .sign(key, hashes.SHA256())
    )
    stem.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return _Issuer(name, key)


def _make_leaf(stem: Path, issuer: _Issuer, common_name: str, server: bool) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(name, issuer.name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        # clients match 127.0.0.1 against the IP SAN, never against the common name
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(common_name))])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(issuer.key, hashes.SHA256())
    cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
