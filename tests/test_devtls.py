"""
Tests for `llmgw.devtls`: the certificates' contents, the demo files, and that a real TLS client
trusts exactly what it should.
"""

# twisted.web, trial and treq are not fully annotated, even on Twisted 26.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import ipaddress
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.SSL import Error as TLSError
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.trial import unittest
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseNeverReceived,
)

from llmgw import devtls
from llmgw.mock import MockOptions, makeService

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def not_valid_before(cert: x509.Certificate) -> datetime:
    try:
        return cert.not_valid_before_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_before.replace(tzinfo=UTC)


def not_valid_after(cert: x509.Certificate) -> datetime:
    try:
        return cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        return cert.not_valid_after.replace(tzinfo=UTC)


def load(cert_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_pem)


def extension(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def public_pem(key: object) -> bytes:
    assert isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey))
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    try:
        ca_key.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
    except Exception:
        return False
    return True


class AuthorityTests(unittest.TestCase):
    def test_ca(self) -> None:
        ca = devtls.make_ca("Test CA", now=NOW)
        cert = load(ca.cert_pem)
        self.assertEqual(cert, ca.cert)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
        self.assertEqual((cert.subject, cert.issuer), (name, name))
        self.assertTrue(signed_by(cert, cert))
        self.assertIsInstance(ca.key.curve, ec.SECP256R1)
        constraints = extension(cert, x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertEqual(constraints.value, x509.BasicConstraints(ca=True, path_length=0))
        usage = extension(cert, x509.KeyUsage)
        self.assertTrue(usage.critical)
        assert isinstance(usage.value, x509.KeyUsage)
        self.assertTrue(usage.value.key_cert_sign)
        self.assertFalse(usage.value.digital_signature)
        self.assertEqual(not_valid_before(cert), NOW - timedelta(hours=1))
        self.assertEqual(not_valid_after(cert), NOW - timedelta(hours=1) + timedelta(days=30))

    def test_server_certificate(self) -> None:
        ca = devtls.make_ca(now=NOW)
        cert_pem, key_pem = devtls.issue_server_certificate(ca, now=NOW)
        cert = load(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        self.assertEqual(public_pem(key), public_pem(cert.public_key()))
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertTrue(key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n"))
        self.assertEqual(cert.issuer, ca.cert.subject)
        self.assertTrue(signed_by(cert, ca.cert))
        self.assertEqual(
            cert.subject, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        )
        san = extension(cert, x509.SubjectAlternativeName).value
        assert isinstance(san, x509.SubjectAlternativeName)
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertEqual(
            extension(cert, x509.ExtendedKeyUsage).value,
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        )
        constraints = extension(cert, x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertEqual(constraints.value, x509.BasicConstraints(ca=False, path_length=None))
        aki = extension(cert, x509.AuthorityKeyIdentifier).value
        ski = extension(ca.cert, x509.SubjectKeyIdentifier).value
        assert isinstance(aki, x509.AuthorityKeyIdentifier)
        assert isinstance(ski, x509.SubjectKeyIdentifier)
        self.assertEqual(aki.key_identifier, ski.digest)
        self.assertEqual(not_valid_before(cert), NOW - timedelta(hours=1))
        self.assertEqual(not_valid_after(cert), NOW - timedelta(hours=1) + timedelta(days=30))

    def test_chosen_names(self) -> None:
        ca = devtls.make_ca()
        cert = load(devtls.issue_server_certificate(ca, ("wrong.example",), ())[0])
        san = extension(cert, x509.SubjectAlternativeName).value
        assert isinstance(san, x509.SubjectAlternativeName)
        self.assertEqual(list(san), [x509.DNSName("wrong.example")])
        cert = load(devtls.issue_server_certificate(ca, (), ("127.0.0.1",))[0])
        self.assertEqual(
            cert.subject, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        )

    def test_no_names(self) -> None:
        ca = devtls.make_ca()
        self.assertRaises(ValueError, devtls.issue_server_certificate, ca, (), ())

    def test_every_certificate_is_new(self) -> None:
        ca = devtls.make_ca()
        first, second = devtls.issue_server_certificate(ca), devtls.issue_server_certificate(ca)
        self.assertNotEqual(load(first[0]).serial_number, load(second[0]).serial_number)
        self.assertNotEqual(first[1], second[1])


class DemoFilesTests(unittest.TestCase):
    def contents(self, files: devtls.DemoFiles) -> tuple[bytes, bytes, bytes]:
        return files.ca.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()

    def test_writes_a_matching_set(self) -> None:
        directory = Path(self.mktemp())
        files = devtls.write_demo_files(directory, now=NOW)
        self.assertEqual(
            files,
            devtls.DemoFiles(
                ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
            ),
        )
        self.assertEqual(
            sorted(p.name for p in directory.iterdir()), ["ca.pem", "server.key", "server.pem"]
        )
        self.assertEqual(stat.S_IMODE(files.key.stat().st_mode), 0o600)
        ca, cert = load(files.ca.read_bytes()), load(files.cert.read_bytes())
        self.assertTrue(signed_by(cert, ca))
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        self.assertEqual(public_pem(key), public_pem(cert.public_key()))

    def test_keeps_files_still_good(self) -> None:
        directory = self.mktemp()
        before = self.contents(devtls.write_demo_files(directory, now=NOW))
        after = self.contents(devtls.write_demo_files(directory, now=NOW + timedelta(days=28)))
        self.assertEqual(before, after)

    def test_replaces_files_near_expiry(self) -> None:
        directory = self.mktemp()
        before = self.contents(devtls.write_demo_files(directory, now=NOW))
        after = self.contents(devtls.write_demo_files(directory, now=NOW + timedelta(days=29)))
        self.assertNotEqual(before[0], after[0])
        self.assertNotEqual(before[1], after[1])
        self.assertNotEqual(before[2], after[2])

    def test_replaces_a_broken_set(self) -> None:
        directory = self.mktemp()
        files = devtls.write_demo_files(directory, now=NOW)
        other = devtls.make_ca(now=NOW)
        other_cert, other_key = devtls.issue_server_certificate(other, now=NOW)
        breakages = [
            lambda: files.key.unlink(),
            lambda: files.cert.write_bytes(b"not a certificate"),
            lambda: files.key.write_bytes(other_key),
            lambda: files.cert.write_bytes(other_cert),
            lambda: files.ca.write_bytes(other.cert_pem),
        ]
        for breakage in breakages:
            good = self.contents(devtls.write_demo_files(directory, now=NOW))
            breakage()
            replaced = self.contents(devtls.write_demo_files(directory, now=NOW))
            self.assertNotEqual(replaced[0], good[0])
            self.assertEqual(stat.S_IMODE(files.key.stat().st_mode), 0o600)
            self.assertTrue(signed_by(load(replaced[1]), load(replaced[0])))

    def test_key_mode_is_reset(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "server.key").write_bytes(b"stale")
        (directory / "server.key").chmod(0o644)
        files = devtls.write_demo_files(directory)
        self.assertEqual(stat.S_IMODE(files.key.stat().st_mode), 0o600)
        self.assertEqual(
            sorted(p.name for p in directory.iterdir()), ["ca.pem", "server.key", "server.pem"]
        )

    def test_command_line(self) -> None:
        directory = Path(self.mktemp())
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(devtls.main([str(directory)]), 0)
        self.assertEqual(
            out.getvalue(),
            f"{directory / 'ca.pem'}\n{directory / 'server.pem'}\n{directory / 'server.key'}\n",
        )
        self.assertTrue(
            signed_by(
                load((directory / "server.pem").read_bytes()),
                load((directory / "ca.pem").read_bytes()),
            )
        )


class TrustTests(unittest.TestCase):
    """A verifying client, the gateway's kind, against the mock serving devtls certificates."""

    def serve(self, cert_pem: bytes, key_pem: bytes) -> int:
        cert, key = Path(self.mktemp()), Path(self.mktemp())
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        options = MockOptions()
        options.parseOptions(["--port=0", f"--cert={cert}", f"--key={key}"])
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        assert service.port is not None
        address = service.port.getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    def client(self, trusted: devtls.CertificateAuthority) -> HTTPClient:
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        trust = trustRootFromCertificates([Certificate.loadPEM(trusted.cert_pem)])
        return HTTPClient(
            Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust), pool=pool)
        )

    async def _test_trusted(self) -> None:
        ca = devtls.make_ca()
        port = self.serve(*devtls.issue_server_certificate(ca))
        for host in ("127.0.0.1", "localhost"):
            response = await self.client(ca).get(f"https://{host}:{port}/v1/models")
            self.assertEqual(response.code, 200)
            await response.content()

    def test_trusted(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._test_trusted())

    async def rejected(self, client: HTTPClient, url: str, reason: type[Exception]) -> None:
        failure = await self.assertFailure(client.get(url), ResponseNeverReceived)
        self.assertEqual([type(r.value) for r in failure.reasons], [reason])

    async def _test_other_ca(self) -> None:
        ca, other = devtls.make_ca("served"), devtls.make_ca("trusted")
        port = self.serve(*devtls.issue_server_certificate(ca))
        await self.rejected(self.client(other), f"https://127.0.0.1:{port}/v1/models", TLSError)

    def test_other_ca(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._test_other_ca())

    async def _test_wrong_name(self) -> None:
        ca = devtls.make_ca()
        port = self.serve(*devtls.issue_server_certificate(ca, ("wrong.example",), ()))
        for host in ("127.0.0.1", "localhost"):
            url = f"https://{host}:{port}/v1/models"
            await self.rejected(self.client(ca), url, VerificationError)

    def test_wrong_name(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._test_wrong_name())
