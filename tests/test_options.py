"""
Tests for L{llmgw.options}: every flag's default, every flag parsed into the
L{Config}, and a usage error (never a traceback) for each kind of bad value.
"""

from __future__ import annotations

import importlib.metadata
import io
import ipaddress
import os
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.python import usage
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from llmgw.devtls import make_ca
from llmgw.options import DEFAULT_AIHOST, Config, Options

MIB = 1024 * 1024


def parse(*argv: str) -> Config:
    options = Options()
    options.parseOptions(list(argv))
    config = options.config
    assert isinstance(config, Config)
    return config


class DefaultsTests(SynchronousTestCase):
    """With no flags, every value is the documented default."""

    def test_every_default(self) -> None:
        self.patch(os, "cpu_count", lambda: 6)
        self.assertEqual(
            parse(),
            Config(
                bindip="127.0.0.1",
                bindport=42069,
                aihost=DEFAULT_AIHOST,
                aihostport=443,
                aischeme="https",
                aica=None,
                timeout=600.0,
                connect_timeout=10.0,
                stream_idle_timeout=120.0,
                read_timeout=30.0,
                max_body=4 * MIB,
                default_model="TheBloke/Mistral-7B-Instruct-v0.2-AWQ",
                workers=6,
                grace=30.0,
                verbose=False,
                rate_limit=1000,
                rate_window=900,
                rate_key="ip",
                ipv6_prefix=56,
                trusted_proxies=(),
                allowed_fields=frozenset(),
                aikey_file=None,
                api_keys_file=None,
            ),
        )

    def test_values_one_by_one(self) -> None:
        """The same defaults, named, so a failure says which one moved."""
        self.patch(os, "cpu_count", lambda: 3)
        config = parse()
        expected: dict[str, object] = {
            "bindip": "127.0.0.1",
            "bindport": 42069,
            "aihost": DEFAULT_AIHOST,
            "aihostport": 443,
            "aischeme": "https",
            "aica": None,
            "timeout": 600,
            "max_body": 4194304,
            "default_model": "TheBloke/Mistral-7B-Instruct-v0.2-AWQ",
            "workers": 3,
            "rate_limit": 1000,
            "rate_window": 900,
            "ipv6_prefix": 56,
            "read_timeout": 30,
            "connect_timeout": 10,
            "stream_idle_timeout": 120,
            "grace": 30,
            "rate_key": "ip",
            "verbose": False,
        }
        for name, value in expected.items():
            self.assertEqual(getattr(config, name), value, name)

    def test_workers_default_is_cpu_count(self) -> None:
        self.patch(os, "cpu_count", lambda: 13)
        self.assertEqual(parse().workers, 13)

    def test_workers_default_when_cpu_count_unknown(self) -> None:
        self.patch(os, "cpu_count", lambda: None)
        self.assertEqual(parse().workers, 1)

    def test_workers_given_ignores_cpu_count(self) -> None:
        self.patch(os, "cpu_count", lambda: 13)
        self.assertEqual(parse("--workers", "1").workers, 1)

    def test_help_shows_defaults(self) -> None:
        text = str(Options())
        for default in (
            "42069",
            DEFAULT_AIHOST,
            "TheBloke/Mistral-7B-Instruct-v0.2-AWQ",
            "4194304",
        ):
            self.assertIn(default, text)


class FlagTests(SynchronousTestCase):
    """Each flag lands in the L{Config}, converted to its type."""

    def write(self, content: bytes) -> str:
        path = Path(self.mktemp())
        path.write_bytes(content)
        return str(path)

    def ca_file(self) -> str:
        return self.write(make_ca().cert_pem)

    def test_every_flag(self) -> None:
        ca = self.ca_file()
        aikey = self.write(b"sk-upstream\n")
        clients = self.write(b"# clients\nsk-client\n")
        config = parse(
            "--bindip",
            "0.0.0.0",
            "--bindport",
            "8080",
            "--aihost",
            "models.internal",
            "--aihostport",
            "8443",
            "--aischeme",
            "http",
            "--aica",
            ca,
            "--timeout",
            "12.5",
            "--connect-timeout",
            "2",
            "--stream-idle-timeout",
            "7.25",
            "--read-timeout",
            "4",
            "--max-body",
            "1024",
            "--default-model",
            "org/model",
            "--workers",
            "5",
            "--grace",
            "1.5",
            "--verbose",
            "--rate-limit",
            "10",
            "--rate-window",
            "60",
            "--rate-key",
            "key",
            "--ipv6-prefix",
            "64",
            "--trusted-proxy",
            "192.0.2.0/24",
            "--allow-field",
            "chat_template",
            "--aikey-file",
            aikey,
            "--api-keys-file",
            clients,
        )
        self.assertEqual(
            config,
            Config(
                bindip="0.0.0.0",
                bindport=8080,
                aihost="models.internal",
                aihostport=8443,
                aischeme="http",
                aica=ca,
                timeout=12.5,
                connect_timeout=2.0,
                stream_idle_timeout=7.25,
                read_timeout=4.0,
                max_body=1024,
                default_model="org/model",
                workers=5,
                grace=1.5,
                verbose=True,
                rate_limit=10,
                rate_window=60,
                rate_key="key",
                ipv6_prefix=64,
                trusted_proxies=(ipaddress.ip_network("192.0.2.0/24"),),
                allowed_fields=frozenset({"chat_template"}),
                aikey_file=aikey,
                api_keys_file=clients,
            ),
        )

    def test_types(self) -> None:
        config = parse("--bindport", "8080", "--timeout", "3", "--max-body", "10")
        self.assertIs(type(config.bindport), int)
        self.assertIs(type(config.timeout), float)
        self.assertIs(type(config.max_body), int)
        self.assertIs(type(config.rate_limit), int)

    def test_short_verbose(self) -> None:
        self.assertTrue(parse("-v").verbose)

    def test_port_bounds_accepted(self) -> None:
        self.assertEqual(parse("--bindport", "1").bindport, 1)
        self.assertEqual(parse("--aihostport", "65535").aihostport, 65535)

    def test_scheme_case_folded(self) -> None:
        self.assertEqual(parse("--aischeme", "HTTP").aischeme, "http")
        self.assertEqual(parse("--aischeme", "Https").aischeme, "https")

    def test_rate_limit_zero_turns_limiting_off(self) -> None:
        self.assertEqual(parse("--rate-limit", "0").rate_limit, 0)

    def test_ipv6_prefix_bounds_accepted(self) -> None:
        self.assertEqual(parse("--ipv6-prefix", "0").ipv6_prefix, 0)
        self.assertEqual(parse("--ipv6-prefix", "128").ipv6_prefix, 128)

    def test_ipv6_bindip(self) -> None:
        self.assertEqual(parse("--bindip", "::1").bindip, "::1")

    def test_trusted_proxy_repeatable(self) -> None:
        config = parse(
            "--trusted-proxy",
            "192.0.2.0/24",
            "--trusted-proxy",
            "192.0.2.7",
            "--trusted-proxy",
            "2001:db8::/32",
        )
        self.assertEqual(
            config.trusted_proxies,
            (
                ipaddress.IPv4Network("192.0.2.0/24"),
                ipaddress.IPv4Network("192.0.2.7/32"),
                ipaddress.IPv6Network("2001:db8::/32"),
            ),
        )

    def test_trusted_proxy_host_bits_masked(self) -> None:
        self.assertEqual(
            parse("--trusted-proxy", "192.0.2.3/24").trusted_proxies,
            (ipaddress.IPv4Network("192.0.2.0/24"),),
        )

    def test_allow_field_repeatable(self) -> None:
        config = parse(
            "--allow-field",
            "chat_template",
            "--allow-field",
            "logits_processors",
            "--allow-field",
            "chat_template",
        )
        self.assertEqual(config.allowed_fields, frozenset({"chat_template", "logits_processors"}))

    def test_repeatable_lists_not_shared(self) -> None:
        """A second L{Options} starts empty, not with the first one's values."""
        parse("--trusted-proxy", "192.0.2.0/24", "--allow-field", "chat_template")
        config = parse()
        self.assertEqual((config.trusted_proxies, config.allowed_fields), ((), frozenset()))

    def test_rate_key_key_with_keys_file(self) -> None:
        clients = self.write(b"sk-client\n")
        self.assertEqual(
            parse("--rate-key", "key", "--api-keys-file", clients).rate_key,
            "key",
        )

    def test_ca_bundle_with_two_certificates(self) -> None:
        bundle = self.write(make_ca().cert_pem + make_ca().cert_pem)
        self.assertEqual(parse("--aica", bundle).aica, bundle)


class UsageErrorTests(SynchronousTestCase):
    """
    Each bad value is a L{usage.UsageError} (one test per row, added below);
    twistd turns that into a message and a non-zero exit.
    """

    def write(self, content: bytes) -> str:
        path = Path(self.mktemp())
        path.write_bytes(content)
        return str(path)

    def check_refused(self, argv: list[str]) -> None:
        options = Options()
        self.assertRaises(usage.UsageError, options.parseOptions, argv)

    def test_missing_ca_file(self) -> None:
        self.check_refused(["--aica", self.mktemp()])

    def test_ca_not_pem(self) -> None:
        self.check_refused(["--aica", self.write(b"this is not a certificate\n")])

    def test_ca_der(self) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        self.check_refused(["--aica", self.write(make_ca().cert.public_bytes(Encoding.DER))])

    def test_ca_empty(self) -> None:
        self.check_refused(["--aica", self.write(b"")])

    def test_ca_pem_garbage(self) -> None:
        self.check_refused(
            [
                "--aica",
                self.write(
                    b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
                ),
            ]
        )

    def test_ca_private_key_only(self) -> None:
        self.check_refused(
            [
                "--aica",
                self.write(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            ]
        )

    def test_missing_aikey_file(self) -> None:
        self.check_refused(["--aikey-file", self.mktemp()])

    def test_missing_api_keys_file(self) -> None:
        self.check_refused(["--api-keys-file", self.mktemp()])

    def test_rate_key_key_needs_keys_file(self) -> None:
        self.check_refused(["--rate-key", "key"])


BAD_ARGUMENTS: dict[str, list[str]] = {
    "bindport_0": ["--bindport", "0"],
    "bindport_65536": ["--bindport", "65536"],
    "bindport_negative": ["--bindport", "-1"],
    "bindport_word": ["--bindport", "abc"],
    "bindport_fraction": ["--bindport", "80.5"],
    "bindport_empty": ["--bindport", ""],
    "aihostport_0": ["--aihostport", "0"],
    "aihostport_65536": ["--aihostport", "65536"],
    "aihostport_word": ["--aihostport", "https"],
    "scheme_ftp": ["--aischeme", "ftp"],
    "scheme_empty": ["--aischeme", ""],
    "scheme_with_colon": ["--aischeme", "https:"],
    "bindip_hostname": ["--bindip", "localhost"],
    "bindip_word": ["--bindip", "nope"],
    "bindip_empty": ["--bindip", ""],
    "bindip_out_of_range": ["--bindip", "256.0.0.1"],
    "bindip_cidr": ["--bindip", "192.0.2.0/24"],
    "trusted_proxy_word": ["--trusted-proxy", "proxy.example"],
    "trusted_proxy_prefix_33": ["--trusted-proxy", "192.0.2.0/33"],
    "trusted_proxy_bad_octet": ["--trusted-proxy", "300.1.1.1"],
    "trusted_proxy_ipv6_prefix_129": ["--trusted-proxy", "2001:db8::/129"],
    "trusted_proxy_empty": ["--trusted-proxy", ""],
    "ipv6_prefix_129": ["--ipv6-prefix", "129"],
    "ipv6_prefix_negative": ["--ipv6-prefix", "-1"],
    "ipv6_prefix_word": ["--ipv6-prefix", "abc"],
    "rate_key_unknown": ["--rate-key", "user"],
    "rate_limit_negative": ["--rate-limit", "-1"],
    "rate_limit_word": ["--rate-limit", "many"],
    "rate_window_zero": ["--rate-window", "0"],
    "rate_window_negative": ["--rate-window", "-900"],
    "rate_window_fraction": ["--rate-window", "0.5"],
    "max_body_zero": ["--max-body", "0"],
    "max_body_negative": ["--max-body", "-1"],
    "max_body_fraction": ["--max-body", "1.5"],
    "max_body_word": ["--max-body", "4MiB"],
    "workers_zero": ["--workers", "0"],
    "workers_negative": ["--workers", "-2"],
    "workers_word": ["--workers", "auto"],
    "allow_field_unknown": ["--allow-field", "foo"],
    "allow_field_empty": ["--allow-field", ""],
    "allow_field_wrong_case": ["--allow-field", "Chat_Template"],
    "unknown_flag": ["--no-such-flag"],
    "stray_argument": ["serve"],
}
for _flag in ("timeout", "connect-timeout", "stream-idle-timeout", "read-timeout", "grace"):
    for _label, _value in (
        ("negative", "-1"),
        ("zero", "0"),
        ("minus_zero", "-0.0"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("minus_inf", "-inf"),
        ("word", "soon"),
        ("empty", ""),
    ):
        BAD_ARGUMENTS[f"{_flag.replace('-', '_')}_{_label}"] = [f"--{_flag}", _value]


def _add_bad_argument_tests() -> None:
    def refused(argv: list[str]) -> Callable[[UsageErrorTests], None]:
        return lambda self: self.check_refused(argv)

    for name, argv in BAD_ARGUMENTS.items():
        setattr(UsageErrorTests, f"test_{name}", refused(argv))


_add_bad_argument_tests()


class MessageTests(SynchronousTestCase):
    """A refused value is reported in one line that names its flag."""

    def refusal(self, *argv: str) -> str:
        error = self.assertRaises(usage.UsageError, Options().parseOptions, list(argv))
        return str(error)

    def test_bindport_out_of_range(self) -> None:
        self.assertEqual(
            self.refusal("--bindport", "70000"),
            "--bindport: 70000 is not a TCP port; use 1 to 65535",
        )

    def test_exact_messages(self) -> None:
        for argv, message in [
            (["--aihostport", "https"], "--aihostport: 'https' is not a whole number"),
            (["--max-body", "1.5"], "--max-body: '1.5' is not a whole number"),
            (["--workers", "0"], "--workers: 0 must be a finite number above 0"),
            (["--timeout", "soon"], "--timeout: 'soon' is not a number"),
            (["--grace", "inf"], "--grace: inf must be a finite number above 0"),
            (["--rate-limit", "-1"], "--rate-limit: -1 must be 0 or more"),
            (["--ipv6-prefix", "abc"], "--ipv6-prefix: 'abc' is not a whole number"),
        ]:
            self.assertEqual(self.refusal(*argv), message, argv)

    def test_every_coerced_flag_names_itself(self) -> None:
        """
        Each flag with a coercer (those added later too) reports every value
        its coercer refuses as C{--flag: <the coercer's message>}.
        """
        candidates = ["", "x", "1.5", "-1", "0", "-0.0", "nan", "inf", "70000", "1e999"]
        coerced = [entry for entry in Options.optParameters if len(entry) >= 5 and entry[4]]
        self.assertTrue(coerced)
        for name, _short, _default, _doc, coerce in coerced:
            refused = 0
            for value in candidates:
                try:
                    coerce(value)
                except ValueError as e:
                    refused += 1
                    self.assertEqual(self.refusal(f"--{name}", value), f"--{name}: {e}")
            self.assertTrue(refused, f"--{name} accepts every candidate")

    def test_allow_field_lists_the_fields(self) -> None:
        self.assertEqual(
            self.refusal("--allow-field", "foo"),
            "--allow-field: 'foo' is not a field that can be allowed; use chat_template, "
            "chat_template_kwargs or logits_processors",
        )

    def test_allow_field_help_lists_the_fields(self) -> None:
        help_text = " ".join(str(Options()).split())
        self.assertIn(
            "--allow-field= Forward chat_template, chat_template_kwargs or logits_processors "
            "(repeatable).",
            help_text,
        )

    def test_stray_argument(self) -> None:
        self.assertEqual(
            self.refusal("--verbose", "serve"),
            "llmgw takes only options, not the argument 'serve'",
        )


class CommandLineTests(SynchronousTestCase):
    """
    What C{twistd llmgw} and C{llmgw} (twistd under another name) print, with
    the real twistd L{ServerOptions} as the parent: one line and a pointer to
    C{--help} on a usage error, never twistd's whole option list.
    """

    def setUp(self) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def run_twistd(self, program: str, *argv: str) -> int | str | None:
        """Parse C{program llmgw argv...} as twistd does; return the exit status."""
        self.patch(sys, "argv", [program, "llmgw", *argv])
        exit = self.assertRaises(SystemExit, ServerOptions().parseOptions, ["llmgw", *argv])
        code: int | str | None = exit.code
        return code

    def test_twistd_bad_number(self) -> None:
        self.assertEqual(self.run_twistd("twistd", "--bindport", "70000"), 1)
        self.assertEqual(
            (self.stdout.getvalue(), self.stderr.getvalue()),
            (
                "",
                "--bindport: 70000 is not a TCP port; use 1 to 65535\n"
                "Run twistd llmgw --help for the list of options.\n",
            ),
        )

    def test_llmgw_bad_number(self) -> None:
        self.assertEqual(self.run_twistd("llmgw", "--workers", "none"), 1)
        self.assertEqual(
            (self.stdout.getvalue(), self.stderr.getvalue()),
            (
                "",
                "--workers: 'none' is not a whole number\n"
                "Run llmgw --help for the list of options.\n",
            ),
        )

    def test_twistd_checks_after_parsing(self) -> None:
        """Errors found once every flag is read are reported the same way."""
        self.assertEqual(self.run_twistd("twistd", "--aischeme", "ftp"), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            "--aischeme must be https or http, not 'ftp'\n"
            "Run twistd llmgw --help for the list of options.\n",
        )

    def test_twistd_unknown_flag(self) -> None:
        self.assertEqual(self.run_twistd("twistd", "--no-such-flag"), 1)
        self.assertEqual(
            self.stderr.getvalue(),
            "option --no-such-flag not recognized\n"
            "Run twistd llmgw --help for the list of options.\n",
        )

    def test_twistd_help(self) -> None:
        self.assertEqual(self.run_twistd("twistd", "--help"), 0)
        self.assertEqual(
            self.stdout.getvalue().splitlines()[:2],
            ["Usage: twistd [options] llmgw [options]", "Options:"],
        )

    def test_llmgw_help(self) -> None:
        self.assertEqual(self.run_twistd("llmgw", "--help"), 0)
        self.assertEqual(
            self.stdout.getvalue().splitlines()[:2], ["Usage: llmgw [options]", "Options:"]
        )

    def test_usage_without_twistd(self) -> None:
        self.assertEqual(str(Options()).splitlines()[:2], ["Usage: llmgw [options]", "Options:"])

    def test_version_from_package_metadata(self) -> None:
        versions: list[str] = []

        def version(name: str) -> str:
            versions.append(name)
            return "9.8.7"

        self.patch(importlib.metadata, "version", version)
        self.assertEqual(self.run_twistd("twistd", "--version"), 0)
        self.assertEqual((self.stdout.getvalue(), versions), ("llmgw 9.8.7\n", ["llmgw"]))

    def test_version_without_package_metadata(self) -> None:
        def version(name: str) -> str:
            raise importlib.metadata.PackageNotFoundError(name)

        self.patch(importlib.metadata, "version", version)
        self.assertEqual(self.run_twistd("llmgw", "--version"), 0)
        self.assertEqual(
            self.stdout.getvalue(), "llmgw (unknown version: not installed as a package)\n"
        )


class UpstreamBaseTests(SynchronousTestCase):
    """L{Config.upstream_base} is the origin requests are sent to."""

    def test_default(self) -> None:
        self.assertEqual(Config().upstream_base, b"https://%s:443" % DEFAULT_AIHOST.encode())

    def test_ipv4(self) -> None:
        config = Config(aihost="192.0.2.10", aihostport=8000, aischeme="http")
        self.assertEqual(config.upstream_base, b"http://192.0.2.10:8000")

    def test_hostname(self) -> None:
        config = Config(aihost="models.example.internal", aihostport=8443)
        self.assertEqual(config.upstream_base, b"https://models.example.internal:8443")

    def test_ipv6_bracketed(self) -> None:
        self.assertEqual(Config(aihost="::1").upstream_base, b"https://[::1]:443")
        config = Config(aihost="2001:db8::5", aihostport=8000, aischeme="http")
        self.assertEqual(config.upstream_base, b"http://[2001:db8::5]:8000")

    def test_from_options(self) -> None:
        config = parse("--aihost", "::1", "--aihostport", "9000", "--aischeme", "HTTP")
        self.assertEqual(config.upstream_base, b"http://[::1]:9000")


class CaDirectoryTests(SynchronousTestCase):
    def test_ca_directory(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--aica", str(directory)])


class EmptyKeyFileTests(SynchronousTestCase):
    def test_empty_aikey_file(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"# no key here\n\n")
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--aikey-file", str(path)])


class AccessLogFlagTests(SynchronousTestCase):
    """C{--access-log PATH}: off unless given; a file in a directory that exists."""

    def test_off_by_default(self) -> None:
        self.assertIsNone(parse().access_log)

    def test_path_made_absolute(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        path = str((directory / "access.log").absolute())
        self.assertEqual(parse("--access-log", str(directory / "access.log")).access_log, path)
        absolute = str(directory.absolute())
        self.patch(os, "getcwd", lambda: absolute)
        self.assertEqual(parse("--access-log=access.log").access_log, path)

    def test_missing_directory_refused(self) -> None:
        path = os.path.join(self.mktemp(), "access.log")
        error = self.assertRaises(usage.UsageError, parse, "--access-log", path)
        self.assertEqual(
            str(error), f"--access-log {path!r}: give a file in a directory that exists"
        )

    def test_directory_refused(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.assertRaises(usage.UsageError, parse, "--access-log", directory)


# --- Several model servers (issue 10): --upstream and its numeric flags. ---
# Kept in one block at the end of the module; documentation addresses only.

A_REPLICA = "https://192.0.2.10:8000"
ANOTHER_REPLICA = "https://192.0.2.11:8000"
COMBINED = (
    "give the model servers either as --upstream https://host:port (repeatable) "
    "or as --aihost/--aihostport/--aischeme"
)
NOT_AN_ORIGIN = "give it as https://host:port or http://host:port"
IPV6_IN_BRACKETS = "put IPv6 addresses in brackets, as https://[::1]:8000"
NO_CREDENTIALS = "credentials do not belong in the URL; put the key in --aikey-file"
NO_PATH = "give the origin alone, without a path: requests go to its /v1/..."
BAD_PORT = "the port is not a number from 1 to 65535"
BAD_HOST = "the host is missing or malformed (put IPv6 addresses in brackets)"


def refusal(case: SynchronousTestCase, *argv: str) -> str:
    """The message of the usage error that C{argv} ends in."""
    error = case.assertRaises(usage.UsageError, Options().parseOptions, list(argv))
    return str(error)


class UpstreamFlagTests(SynchronousTestCase):
    """C{--upstream} accepts an origin in several spellings and keeps it canonical."""

    def upstreams(self, *urls: str) -> tuple[str, ...]:
        argv: list[str] = []
        for url in urls:
            argv += ["--upstream", url]
        return parse(*argv).upstreams

    def test_https(self) -> None:
        self.assertEqual(self.upstreams("https://192.0.2.10:8443"), ("https://192.0.2.10:8443",))

    def test_http(self) -> None:
        self.assertEqual(self.upstreams("http://192.0.2.10:8000"), ("http://192.0.2.10:8000",))

    def test_host_name(self) -> None:
        self.assertEqual(
            self.upstreams("https://models.example:8000"), ("https://models.example:8000",)
        )

    def test_default_ports(self) -> None:
        self.assertEqual(
            self.upstreams("https://192.0.2.10", "http://192.0.2.11"),
            ("https://192.0.2.10:443", "http://192.0.2.11:80"),
        )

    def test_ipv6_in_brackets(self) -> None:
        self.assertEqual(
            self.upstreams("https://[2001:db8::10]:8000", "http://[::1]", "https://[2001:DB8::11]"),
            ("https://[2001:db8::10]:8000", "http://[::1]:80", "https://[2001:db8::11]:443"),
        )

    def test_case_folded(self) -> None:
        self.assertEqual(
            self.upstreams("HTTPS://Models.Example:8000"), ("https://models.example:8000",)
        )

    def test_trailing_slash_and_spaces(self) -> None:
        self.assertEqual(self.upstreams(" https://192.0.2.10:8000/ "), (A_REPLICA,))

    def test_repeated_in_order(self) -> None:
        self.assertEqual(
            self.upstreams(ANOTHER_REPLICA, A_REPLICA, "http://[2001:db8::1]:9000"),
            (ANOTHER_REPLICA, A_REPLICA, "http://[2001:db8::1]:9000"),
        )

    def test_not_shared_between_parsers(self) -> None:
        self.upstreams(A_REPLICA)
        self.assertEqual(parse().upstreams, ())

    def test_config(self) -> None:
        """Only C{upstreams} differs from the defaults; the C{--aihost} values stay unused."""
        self.patch(os, "cpu_count", lambda: 2)
        self.assertEqual(
            parse("--upstream", A_REPLICA, "--upstream", ANOTHER_REPLICA),
            Config(workers=2, upstreams=(A_REPLICA, ANOTHER_REPLICA)),
        )

    def test_with_ca_and_key(self) -> None:
        """C{--aica} and C{--aikey-file} apply to every replica, so they combine."""
        ca = Path(self.mktemp())
        ca.write_bytes(make_ca().cert_pem)
        key = Path(self.mktemp())
        key.write_bytes(b"sk-upstream\n")
        config = parse("--upstream", A_REPLICA, "--aica", str(ca), "--aikey-file", str(key))
        self.assertEqual(
            (config.upstreams, config.aica, config.aikey_file), ((A_REPLICA,), str(ca), str(key))
        )

    def test_help(self) -> None:
        text = str(Options())
        for flag in (
            "--upstream=",
            "--upstream-idle-timeout=",
            "--health-interval=",
            "--fail-timeout=",
            "--retries=",
        ):
            self.assertIn(flag, text)


class OriginsTests(SynchronousTestCase):
    """L{Config.origins}: every model server, whichever way they were named."""

    def test_default(self) -> None:
        self.assertEqual(Config().origins, (f"https://{DEFAULT_AIHOST}:443",))
        self.assertEqual(parse().origins, (f"https://{DEFAULT_AIHOST}:443",))

    def test_aihost(self) -> None:
        config = parse("--aihost", "192.0.2.20", "--aihostport", "8000", "--aischeme", "http")
        self.assertEqual(config.origins, ("http://192.0.2.20:8000",))

    def test_aihost_ipv6(self) -> None:
        self.assertEqual(parse("--aihost", "2001:db8::20").origins, ("https://[2001:db8::20]:443",))

    def test_upstreams(self) -> None:
        config = parse("--upstream", A_REPLICA, "--upstream", "http://[2001:db8::1]")
        self.assertEqual(config.origins, (A_REPLICA, "http://[2001:db8::1]:80"))

    def test_upstreams_replace_aihost(self) -> None:
        self.assertEqual(Config(aihost="192.0.2.30", upstreams=(A_REPLICA,)).origins, (A_REPLICA,))


class UpstreamRefusedTests(SynchronousTestCase):
    """Each refused C{--upstream} ends in a usage error that says what to give instead."""

    def check(self, url: str, why: str) -> None:
        self.assertEqual(refusal(self, "--upstream", url), f"--upstream {url!r}: {why}")

    def test_path(self) -> None:
        self.check("https://192.0.2.10:8000/v1", NO_PATH)
        self.check("https://192.0.2.10:8000/v1/chat/completions", NO_PATH)

    def test_query(self) -> None:
        self.check("https://192.0.2.10:8000?model=m", NO_PATH)
        self.check("https://192.0.2.10:8000/?model=m", NO_PATH)

    def test_fragment(self) -> None:
        self.check("https://192.0.2.10:8000#models", NO_PATH)

    def check_credentials(self, url: str) -> None:
        """The URL may be shown with its credentials masked, so only the reason is compared."""
        message = refusal(self, "--upstream", url)
        self.assertTrue(message.startswith("--upstream 'https://"), message)
        self.assertTrue(message.endswith(f"': {NO_CREDENTIALS}"), message)

    def test_credentials(self) -> None:
        self.check_credentials("https://user:pass@192.0.2.10")
        self.check_credentials("https://user@192.0.2.10")
        self.check_credentials("https://@192.0.2.10")
        self.check_credentials("https://user:@[2001:db8::1]:8000")

    def test_credentials_with_port(self) -> None:
        """The colons of credentials and a port are not taken for an IPv6 address."""
        self.check_credentials("https://user:pass@192.0.2.10:8000")

    def test_credentials_not_repeated(self) -> None:
        """A key put in the URL is not printed back to the terminal or the journal."""
        message = refusal(self, "--upstream", "https://user:sk-s3cr3t@192.0.2.10")
        self.assertTrue(message.endswith(NO_CREDENTIALS), message)
        self.assertNotIn("sk-s3cr3t", message)

    def test_unbracketed_ipv6(self) -> None:
        self.check("https://2001:db8::10", IPV6_IN_BRACKETS)
        self.check("https://2001:db8::10:8000", IPV6_IN_BRACKETS)
        self.check("http://::1", IPV6_IN_BRACKETS)

    def test_bracketed_not_ipv6(self) -> None:
        """Python's own words (its urlsplit refuses them first), but a usage error."""
        for url in ("https://[::1", "https://[2001:db8::zz]:8000"):
            self.assertTrue(refusal(self, "--upstream", url).startswith(f"--upstream {url!r}: "))

    def test_bad_port(self) -> None:
        for port in ("0", "65536", "99999", "-1", "http", "8o00", "1.5"):
            self.check(f"https://192.0.2.10:{port}", BAD_PORT)
        self.check("https://[2001:db8::10]:0", BAD_PORT)

    def test_port_bounds_accepted(self) -> None:
        self.assertEqual(
            parse(
                "--upstream", "https://192.0.2.10:1", "--upstream", "https://192.0.2.10:65535"
            ).upstreams,
            ("https://192.0.2.10:1", "https://192.0.2.10:65535"),
        )

    def test_bad_scheme(self) -> None:
        for url in (
            "ftp://192.0.2.10:21",
            "ws://192.0.2.10:8000",
            "192.0.2.10:8000",
            "models.example:8000",
            "//192.0.2.10:8000",
            "https://",
            "https:///v1",
            "",
        ):
            self.check(url, NOT_AN_ORIGIN)

    def test_missing_or_malformed_host(self) -> None:
        self.check("https://:8000", BAD_HOST)
        self.check("https://models example:8000", BAD_HOST)

    def test_duplicate(self) -> None:
        self.assertEqual(
            refusal(self, "--upstream", A_REPLICA, "--upstream", A_REPLICA),
            f"--upstream {A_REPLICA!r} is given twice",
        )

    def test_duplicate_spelled_differently(self) -> None:
        """The same origin twice would count one server as two replicas."""
        self.assertEqual(
            refusal(
                self, "--upstream", "https://192.0.2.10", "--upstream", "HTTPS://192.0.2.10:443/"
            ),
            "--upstream 'HTTPS://192.0.2.10:443/' is given twice",
        )

    def test_same_host_other_port_or_scheme(self) -> None:
        self.assertEqual(
            parse(
                "--upstream", "https://192.0.2.10", "--upstream", "http://192.0.2.10",
                "--upstream", "https://192.0.2.10:8443",
            ).upstreams,
            ("https://192.0.2.10:443", "http://192.0.2.10:80", "https://192.0.2.10:8443"),
        )  # fmt: skip


class UpstreamCombinedTests(SynchronousTestCase):
    """Naming the model servers both ways is refused, whatever the order of the flags."""

    def test_each_aihost_flag(self) -> None:
        for flag, value in (("aihost", "192.0.2.20"), ("aihostport", "8000"), ("aischeme", "http")):
            expected = f"--upstream replaces --{flag}: {COMBINED}"
            self.assertEqual(refusal(self, "--upstream", A_REPLICA, f"--{flag}", value), expected)
            self.assertEqual(refusal(self, f"--{flag}", value, "--upstream", A_REPLICA), expected)

    def test_all_three(self) -> None:
        self.assertEqual(
            refusal(
                self,
                "--aischeme", "https",
                "--upstream", A_REPLICA,
                "--aihostport", "443",
                "--aihost", "127.0.0.2",
            ),
            f"--upstream replaces --aihost, --aihostport, --aischeme: {COMBINED}",
        )  # fmt: skip

    def test_default_values_named(self) -> None:
        """Naming a default is still naming it: the user meant two things."""
        self.assertEqual(
            refusal(self, "--aihost", DEFAULT_AIHOST, "--upstream", A_REPLICA),
            f"--upstream replaces --aihost: {COMBINED}",
        )

    def test_aihost_alone_unchanged(self) -> None:
        config = parse("--aihost", "192.0.2.20", "--aihostport", "8000")
        self.assertEqual((config.upstreams, config.aihost), ((), "192.0.2.20"))


class ReplicaNumbersTests(SynchronousTestCase):
    """C{--upstream-idle-timeout}, C{--health-interval}, C{--fail-timeout}, C{--retries}."""

    def test_defaults(self) -> None:
        config = parse()
        values = (
            config.upstream_idle_timeout,
            config.health_interval,
            config.fail_timeout,
            config.retries,
        )
        self.assertEqual(values, (4.0, 5.0, 10.0, 2))
        self.assertEqual([type(value) for value in values], [float, float, float, int])

    def test_given(self) -> None:
        config = parse(
            "--upstream-idle-timeout",
            "1.5",
            "--health-interval",
            "0.25",
            "--fail-timeout",
            "30",
            "--retries",
            "5",
        )
        values = (
            config.upstream_idle_timeout,
            config.health_interval,
            config.fail_timeout,
            config.retries,
        )
        self.assertEqual(values, (1.5, 0.25, 30.0, 5))
        self.assertEqual([type(value) for value in values], [float, float, float, int])

    def test_with_one_aihost(self) -> None:
        """They apply to a lone --aihost too (the idle timeout above all)."""
        config = parse("--aihost", "192.0.2.20", "--upstream-idle-timeout", "2", "--retries", "1")
        self.assertEqual((config.upstream_idle_timeout, config.retries), (2.0, 1))

    def test_retries_zero(self) -> None:
        self.assertEqual(parse("--retries", "0").retries, 0)

    def test_smallest_timeouts(self) -> None:
        for flag, field in (
            ("upstream-idle-timeout", "upstream_idle_timeout"),
            ("health-interval", "health_interval"),
            ("fail-timeout", "fail_timeout"),
        ):
            self.assertEqual(getattr(parse(f"--{flag}", "0.001"), field), 0.001)

    def test_timeouts_refused(self) -> None:
        for flag in ("upstream-idle-timeout", "health-interval", "fail-timeout"):
            for value, why in (
                ("0", "0 must be a finite number above 0"),
                ("-0.0", "-0.0 must be a finite number above 0"),
                ("-1", "-1 must be a finite number above 0"),
                ("nan", "nan must be a finite number above 0"),
                ("inf", "inf must be a finite number above 0"),
                ("-inf", "-inf must be a finite number above 0"),
                ("soon", "'soon' is not a number"),
                ("", "'' is not a number"),
            ):
                self.assertEqual(
                    refusal(self, f"--{flag}", value),
                    f"--{flag}: {why}",
                    (flag, value),
                )

    def test_retries_refused(self) -> None:
        for value, why in (
            ("-1", "-1 must be 0 or more"),
            ("1.5", "'1.5' is not a whole number"),
            ("two", "'two' is not a whole number"),
            ("", "'' is not a whole number"),
        ):
            self.assertEqual(refusal(self, "--retries", value), f"--retries: {why}")
