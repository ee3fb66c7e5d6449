"""TLS for every tidemq service and client: the cluster CA, certificates, contexts.

``tide up`` calls :func:`ensure_cluster_pki` once per data directory: a private CA
(``ca.pem``) and one certificate per service (``<name>.pem`` / ``<name>-key.pem``),
each valid for ``localhost`` and ``127.0.0.1`` and usable as both server and client
certificate (mutual TLS between services). The ``client`` certificate is what
``tide env`` hands to programs. Keys are EC P-256, files mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_DAYS = 3650


@dataclass(frozen=True)
class TlsFiles:
    """Where one party's TLS material lives. Any field may be None (no TLS / no cert)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def server_context(files: TlsFiles, require_client_cert: bool = True) -> ssl.SSLContext:
    """Mutual TLS by default: callers must present a certificate of the cluster CA,
    whose common name is their identity (service/callers.py)."""
    if not files.cert_file or not files.key_file:
        raise ValueError("a TLS server needs a certificate and a key")
    if require_client_cert and not files.ca_file:
        raise ValueError("mutual TLS needs the cluster CA file to verify callers' certificates")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.options |= ssl.OP_NO_RENEGOTIATION  # a connection's identity never changes
    context.load_cert_chain(files.cert_file, files.key_file)
    if files.ca_file:
        context.load_verify_locations(files.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """Verifies the server against the cluster CA; presents a client cert if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca_file)
    if files.cert_file and files.key_file:
        context.load_cert_chain(files.cert_file, files.key_file)
    return context


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tidemq cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _create_ca(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("tidemq cluster CA"))
        .issuer_name(_name("tidemq cluster CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
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
    _write_private(directory / "ca-key.pem", _key_pem(key))
    (directory / "ca.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _issue(directory: Path, name: str, hosts: list[str]) -> None:
    ca_key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    ca_certificate = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the cluster CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alternative_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alternative_names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(directory / f"{name}-key.pem", _key_pem(key))
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def ensure_cluster_pki(
    directory: Path, names: list[str], hosts: list[str] | None = None
) -> dict[str, TlsFiles]:
    """Creates the CA on first use and a certificate for each missing name.

    Idempotent: existing files are kept, so restarting a cluster keeps its identity.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "ca.pem").exists():
        _create_ca(directory)
    ca_file = str(directory / "ca.pem")
    out: dict[str, TlsFiles] = {}
    for name in names:
        if not (directory / f"{name}.pem").exists():
            _issue(directory, name, hosts or ["localhost", "127.0.0.1", "::1"])
        out[name] = TlsFiles(
            ca_file, str(directory / f"{name}.pem"), str(directory / f"{name}-key.pem")
        )
    return out
