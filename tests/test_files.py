"""
Tests for L{llmgw.files}: key files and CA bundles, and that the options read
them without reaching up into the request path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from llmgw.devtls import make_ca
from llmgw.files import load_trust_root, read_client_keys, read_keys, read_secret

UPSTREAM = b"sk-upstream-Secret-0123"


class FileTests(SynchronousTestCase):
    def write(self, content: bytes) -> str:
        path = Path(self.mktemp())
        path.write_bytes(content)
        return str(path)

    def test_keys_with_comments_and_blank_lines(self) -> None:
        path = self.write(
            b"# client keys for the gateway\n"
            b"\n"
            b"sk-one\n"
            b"   \t\n"
            b"  sk-two  \n"
            b"sk-three # the intern's key\n"
            b"#sk-disabled\n"
            b"   # indented comment\n"
            b"sk-four\r\n"
            b"sk-five"
        )
        self.assertEqual(
            read_keys(path), [b"sk-one", b"sk-two", b"sk-three", b"sk-four", b"sk-five"]
        )

    def test_empty_file(self) -> None:
        self.assertEqual(read_keys(self.write(b"")), [])

    def test_only_comments(self) -> None:
        self.assertEqual(read_keys(self.write(b"# nothing\n\n  # here\n")), [])

    def test_missing_file(self) -> None:
        self.assertRaises(OSError, read_keys, self.mktemp())

    def test_secret_is_first_key(self) -> None:
        path = self.write(b"# upstream\n\n  " + UPSTREAM + b"  \nsk-second\n")
        self.assertEqual(read_secret(path), UPSTREAM)

    def test_secret_from_file_without_newline(self) -> None:
        self.assertEqual(read_secret(self.write(UPSTREAM)), UPSTREAM)

    def test_secret_missing_is_value_error(self) -> None:
        self.assertRaises(ValueError, read_secret, self.write(b"# no key\n\n"))

    def test_client_keys_none_is_value_error(self) -> None:
        self.assertEqual(read_client_keys(self.write(b"sk-a\n# b\n")), [b"sk-a"])
        self.assertRaises(ValueError, read_client_keys, self.write(b"# rotating\n"))


class TrustRootTests(SynchronousTestCase):
    def test_empty_bundle(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"not a certificate\n")
        self.assertRaises(ValueError, load_trust_root, path)

    def test_broken_certificate(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertRaises(ValueError, load_trust_root, path)


class OptionsLayerTests(SynchronousTestCase):
    """The design's one import circle is gone: options check files through llmgw.files."""

    def test_parsing_checks_the_files_without_the_request_path(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        ca = directory / "ca.pem"
        ca.write_bytes(make_ca().cert_pem)
        (directory / "aikey").write_bytes(UPSTREAM + b"\n")
        (directory / "api-keys").write_bytes(b"sk-client\n")
        program = (
            "import sys\n"
            "from llmgw.options import Options\n"
            "Options().parseOptions(sys.argv[1:])\n"
            "print(sorted(m for m in sys.modules if m in ('llmgw.upstream', 'llmgw.keys')))\n"
        )
        argv = [
            f"--aica={ca}",
            f"--aikey-file={directory / 'aikey'}",
            f"--api-keys-file={directory / 'api-keys'}",
            "--workers=1",
        ]
        output = subprocess.run(
            [sys.executable, "-c", program, *argv],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        ).stdout
        self.assertEqual(output, "[]\n")
