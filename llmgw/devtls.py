"""
A throwaway certificate authority and server certificates for the demo and the tests.

The gateway verifies its upstream's certificate, so even the demo needs a CA that the gateway
trusts and a server certificate that the stand-in model presents.  Nothing here is meant to
protect anything: the CA's private key is never written to disk, so each CA can only ever sign
what it signs while it is in memory.

It sticks to the parts of ``cryptography`` that Debian 12's version 38 also has.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = timedelta(days=30)
"""Short, so that a leaked demo certificate is soon worthless."""

BACKDATE = timedelta(hours=1)
"""Tolerates a peer whose clock runs a little behind ours."""

RENEW_BEFORE = timedelta(days=1)
"""`write_demo_files` replaces files that would expire within this margin."""


@attrs.frozen
class CertificateAuthority:
    """A CA held only in memory: its key and its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        """The certificate as PEM, the form a client takes as its trust root."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


@attrs.frozen
class DemoFiles:
    """Where `write_demo_files` put the CA certificate, server certificate and server key."""

    ca: Path
    cert: Path
    key: Path


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now


def _new_key() -> ec.EllipticCurvePrivateKey:
    """P-256: fast to generate and to sign with, and every TLS stack accepts it."""
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(
    common_name: str = "llmgw demo CA",
    *,
    now: datetime | None = None,
    valid_for: timedelta = VALIDITY,
) -> CertificateAuthority:
    """Make a new CA that may sign server certificates but no further CAs."""
    start = _now(now) - BACKDATE
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key=key, cert=cert)


def issue_server_certificate(
    ca: CertificateAuthority,
    hostnames: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1", "::1"),
    *,
    now: datetime | None = None,
    valid_for: timedelta = VALIDITY,
) -> tuple[bytes, bytes]:
    """
    Issue a TLS server certificate for exactly ``hostnames`` and ``ips``, and return it and its
    new key as ``(cert_pem, key_pem)``.

    Clients check the subjectAltName, not the common name, so the names given here are the
    whole of what the certificate is good for: a test passes ``hostnames=("wrong.example",),
    ips=()`` to get one that a client must reject.
    """
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if not names:
        raise ValueError("a server certificate needs at least one hostname or IP address")
    first = names[0].value
    start = _now(now) - BACKDATE
    key = _new_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
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
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _not_valid_after(cert: x509.Certificate) -> datetime:
    """The expiry as an aware datetime; cryptography 38 only has the naive UTC one."""
    try:
        return cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_after.replace(tzinfo=UTC)


def _still_good(files: DemoFiles, now: datetime) -> bool:
    """
    Whether the files on disk still make a usable set: both certificates far from expiry, the
    server certificate signed by the CA, and the key the one the certificate is for.
    """
    try:
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if any(_not_valid_after(c) - RENEW_BEFORE < now for c in (ca, cert)):
        return False
    ca_key = ca.public_key()
    hash_algorithm = cert.signature_hash_algorithm
    if not isinstance(ca_key, ec.EllipticCurvePublicKey) or hash_algorithm is None:
        return False
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
    except InvalidSignature:
        return False
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki))


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and a rename, so that a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def write_demo_files(
    directory: str | os.PathLike[str],
    *,
    now: datetime | None = None,
) -> DemoFiles:
    """
    Make sure ``directory`` holds ``ca.pem``, ``server.pem`` and ``server.key`` (mode 0600) for
    ``localhost``, ``127.0.0.1`` and ``::1``.

    Files that are still good are kept, so that running the demo twice does not make a
    gateway already running with the old CA distrust a restarted model server.
    """
    where = Path(directory)
    files = DemoFiles(ca=where / "ca.pem", cert=where / "server.pem", key=where / "server.key")
    moment = _now(now)
    if _still_good(files, moment):
        return files
    where.mkdir(parents=True, exist_ok=True)
    ca = make_ca(now=moment)
    cert_pem, key_pem = issue_server_certificate(ca, now=moment)
    _write_atomically(files.key, key_pem, 0o600)
    _write_atomically(files.cert, cert_pem, 0o644)
    _write_atomically(files.ca, ca.cert_pem, 0o644)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llmgw.devtls DIR``: make (or keep) the demo's TLS files in DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m llmgw.devtls",
        description="Write a throwaway CA and a localhost server certificate for the demo.",
    )
    parser.add_argument("directory", help="where to write ca.pem, server.pem and server.key")
    arguments = parser.parse_args(argv)
    files = write_demo_files(arguments.directory)
    for path in (files.ca, files.cert, files.key):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
