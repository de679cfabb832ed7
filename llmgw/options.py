"""Command-line options, parsed once into a frozen L{Config}.

The rest of the gateway sees only the L{Config}: every value in it has been
checked here, so a bad flag ends start-up with a usage error that says what to
do, never with a traceback from deep inside the service.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
import re
import sys
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn
from urllib.parse import urlsplit

import attrs
from twisted.python import usage

from llmgw.files import load_trust_root, read_client_keys, read_secret
from llmgw.validation import RECONFIGURING_FIELDS

#: The console script's name, and the twistd plugin's.
COMMAND = "llmgw"

DEFAULT_MODEL = "TheBloke/Mistral-7B-Instruct-v0.2-AWQ"

#: A placeholder for the user's model server: tests and demos always replace it.
DEFAULT_AIHOST = "10.0.0.1"
MIB = 1024 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class Config:
    """Everything the gateway was told, checked and typed."""

    bindip: str = "127.0.0.1"
    bindport: int = 42069
    aihost: str = DEFAULT_AIHOST
    aihostport: int = 443
    aischeme: str = "https"
    aica: str | None = None
    timeout: float = 600.0
    connect_timeout: float = 10.0
    stream_idle_timeout: float = 120.0
    read_timeout: float = 30.0
    max_body: int = 4 * MIB
    default_model: str = DEFAULT_MODEL
    workers: int = 1
    grace: float = 30.0
    verbose: bool = False
    rate_limit: int = 1000
    rate_window: int = 900
    rate_key: str = "ip"
    ipv6_prefix: int = 56
    trusted_proxies: tuple[Network, ...] = ()
    allowed_fields: frozenset[str] = frozenset()
    aikey_file: str | None = None
    api_keys_file: str | None = None
    upstreams: tuple[str, ...] = ()
    """Replica origins from C{--upstream}; empty when C{--aihost} names the one model server."""
    upstream_idle_timeout: float = 4.0
    health_interval: float = 5.0
    fail_timeout: float = 10.0
    retries: int = 2
    access_log: str | None = None
    """C{--access-log}: the file of JSON access lines, or L{None} for none."""
    metrics_bind: str | None = None
    """C{HOST:PORT} (C{[::1]:PORT} for IPv6) of the parent's C{/metrics}; off when L{None}."""
    rate_store: str | None = None
    """The shared limiter's Redis, as C{redis://host:port/db} or C{unix:///path?db=N}."""
    rate_store_password_file: str | None = None
    rate_store_timeout: float = 0.25
    rate_store_fallback: str = "local"

    @property
    def upstream_base(self) -> bytes:
        """The model server's origin, e.g. C{https://10.0.0.1:443}."""
        host = f"[{self.aihost}]" if ":" in self.aihost else self.aihost
        return f"{self.aischeme}://{host}:{self.aihostport}".encode()

    @property
    def origins(self) -> tuple[str, ...]:
        """Every model server requests may go to: the replicas, or the one C{--aihost}."""
        return self.upstreams or (self.upstream_base.decode(),)


def _without_credentials(url: str) -> str:
    """C{url} with any user and password masked, fit to be printed back."""
    return re.sub(r"(?<=//)[^/?#]*@", "***@", url)


def upstream_origin(url: str) -> str:
    """
    The origin C{scheme://host:port} of an C{--upstream} URL, checked.

    A URL with a path, a query or credentials is refused rather than trimmed:
    requests always go to the replica's C{/v1/...}, and a key belongs in
    C{--aikey-file}, where C{ps} cannot show it.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("give it as https://host:port or http://host:port")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL; put the key in --aikey-file")
    if parts.netloc.count(":") > 1 and "[" not in parts.netloc:
        raise ValueError("put IPv6 addresses in brackets, as https://[::1]:8000")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("give the origin alone, without a path: requests go to its /v1/...")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("the port is not a number from 1 to 65535") from None
    if not host or any(c in host for c in "[]@ \t"):
        raise ValueError("the host is missing or malformed (put IPv6 addresses in brackets)")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("put IPv6 addresses in brackets, as https://[::1]:8000") from None
        host = f"[{host}]"
    if port == 0:
        raise ValueError("the port is not a number from 1 to 65535")
    port = port or (443 if scheme == "https" else 80)
    return f"{scheme}://{host}:{port}"


def split_host_port(value: str) -> tuple[str, int]:
    """
    C{127.0.0.1:9464} or C{[::1]:9464} as an address and a port.

    @raise ValueError: not an IP address and a port in that form.
    """
    host, colon, port_text = value.strip().rpartition(":")
    if not colon or not host:
        raise ValueError("give it as HOST:PORT, for example 127.0.0.1:9464 or [::1]:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError("only IPv6 addresses go in brackets")
    elif ":" in host:
        raise ValueError("put IPv6 addresses in brackets, as [::1]:9464")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return str(address), _port(port_text)


def _host_port(value: str) -> str:
    """The C{--metrics-bind} value, checked and written the one way."""
    try:
        host, port = split_host_port(value)
    except ValueError as e:
        raise ValueError(f"{value!r}: {e}") from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class RateStoreAddress:
    """Where the shared limiter's Redis listens: a TCP host and port, or a Unix socket."""

    host: str | None
    port: int
    path: str | None
    db: int

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


#: The fallback policies of C{--rate-store-fallback}, the default first.
RATE_STORE_FALLBACKS = ("local", "open", "closed")

#: A worker stops waiting for the parent's admission after this many seconds
#: (L{llmgw.worker.ADMIT_TIMEOUT}); a Redis decision must end well before.
_WORKER_ADMIT_SECONDS = 1.0


def rate_store_address(url: str) -> RateStoreAddress:
    """
    The address in a C{--rate-store} URL, checked.

    A password is refused, not used: a URL is on the command line, where
    C{ps} shows it to every user; C{--rate-store-password-file} is not.  The
    messages never repeat the URL, for the same reason.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if parts.password is not None or parts.username is not None or "@" in parts.netloc:
        raise ValueError(
            "the URL holds credentials; put the password in --rate-store-password-file"
        )
    if scheme == "unix":
        if parts.netloc or parts.fragment or not parts.path.startswith("/"):
            raise ValueError("give a Unix socket as unix:///absolute/path/redis.sock[?db=N]")
        return RateStoreAddress(None, 0, parts.path, _rate_store_db(parts.query, query=True))
    if scheme != "redis":
        raise ValueError("give it as redis://host[:port][/db] or unix:///path/redis.sock[?db=N]")
    if parts.query or parts.fragment:
        raise ValueError("a redis:// URL takes no query; give the database as redis://host/N")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("the port is not a number from 1 to 65535") from None
    if not host or any(c in host for c in "[] \t/"):
        raise ValueError("the host is missing or malformed (put IPv6 addresses in brackets)")
    if port == 0:
        raise ValueError("the port is not a number from 1 to 65535")
    return RateStoreAddress(host, port or 6379, None, _rate_store_db(parts.path, query=False))


def _rate_store_db(text: str, *, query: bool) -> int:
    if query:
        if not text:
            return 0
        name, _, value = text.partition("=")
        if name != "db" or not value:
            raise ValueError("the only query a unix:// URL takes is ?db=N")
    else:
        value = text.removeprefix("/")
        if not value:
            return 0
    if not value.isdigit() or len(value) > 5:
        raise ValueError(f"the database {value!r} is not a number from 0 up")
    return int(value)


def _rate_store_fallback(value: str) -> str:
    if value not in RATE_STORE_FALLBACKS:
        raise ValueError(f"{value!r} is not a policy; use local, open or closed")
    return value


def _rate_store_timeout(value: str) -> float:
    seconds = _seconds(value)
    if seconds >= _WORKER_ADMIT_SECONDS:
        raise ValueError(
            f"{value} is too long: a worker stops waiting for an admission after "
            f"{_WORKER_ADMIT_SECONDS:g} s; use less"
        )
    return seconds


def _port(value: str) -> int:
    port = _integer(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"{value} is not a TCP port; use 1 to 65535")
    return port


def _integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def coerce(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            wanted = "a whole number" if kind is int else "a number"
            raise ValueError(f"{value!r} is not {wanted}") from None
        if not number > 0 or number == float("inf"):
            raise ValueError(f"{value} must be a finite number above 0")
        return number

    return coerce


def _seconds(value: str) -> float:
    return _positive(float)(value)


def _size(value: str) -> int:
    return int(_positive(int)(value))


def _count(value: str) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError(f"{value} must be 0 or more")
    return number


def _naming_flag(flag: str, coerce: Callable[[str], object]) -> Callable[[str], object]:
    """
    Make a coercer's C{ValueError} a usage error that starts with the flag.

    L{usage.CoerceParameter} would report C{Parameter type enforcement failed:
    70000 is not a TCP port}, which does not say which flag was wrong; a
    L{usage.UsageError} passes through it untouched.
    """

    def coerce_naming_flag(value: str) -> object:
        try:
            return coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"{flag}: {e}") from None

    return coerce_naming_flag


def version() -> str:
    """
    llmgw's version, from the installed package's metadata (so it is written
    once, in pyproject.toml), or a note that a source tree has none.
    """
    try:
        return importlib.metadata.version(COMMAND)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version: not installed as a package)"


def _run_as_console_script() -> bool:
    """Whether the C{llmgw} command (L{llmgw.cli}) runs us, rather than twistd."""
    return os.path.basename(sys.argv[0]) == COMMAND


class Options(usage.Options):
    """C{twistd llmgw} and C{llmgw} take these."""

    synopsis = "[options]"
    longdesc = (
        "Serve an OpenAI-compatible /v1/chat/completions that validates each request, "
        "limits each client, and forwards it over verified HTTPS to a model server."
    )

    optFlags: ClassVar[list[list[str | None]]] = [
        ["verbose", "v", "Log each request and reply in full (coloured on a terminal)."],
    ]

    optParameters: ClassVar[list[list[Any]]] = [
        ["bindip", None, "127.0.0.1", "Address to listen on."],
        ["bindport", None, 42069, "Port to listen on.", _port],
        ["aihost", None, None, f"Model server host name or address [default: {DEFAULT_AIHOST}]."],
        ["aihostport", None, None, "Model server port [default: 443].", _port],
        ["aischeme", None, None, "Model server scheme: https or http [default: https]."],
        [
            "aica",
            None,
            None,
            "PEM bundle to trust for the model server (default: the platform trust store).",
        ],
        [
            "timeout",
            None,
            600.0,
            "Seconds to wait for the model server's reply headers and, for a reply that "
            "is not streamed, the whole reply.",
            _seconds,
        ],
        [
            "connect-timeout",
            None,
            10.0,
            "Seconds to wait to connect to the model server.",
            _seconds,
        ],
        [
            "stream-idle-timeout",
            None,
            120.0,
            "Longest silence, in seconds, between two chunks of a streamed reply.",
            _seconds,
        ],
        ["read-timeout", None, 30.0, "Seconds a client has to send a whole request.", _seconds],
        ["max-body", None, 4 * MIB, "Largest request body, in bytes.", _size],
        ["default-model", None, DEFAULT_MODEL, "Model used when a request names none."],
        ["workers", None, None, "Worker processes (default: one per CPU).", _size],
        ["grace", None, 30.0, "Seconds to let requests finish on shutdown.", _seconds],
        ["rate-limit", None, 1000, "Requests per client per window; 0 turns limiting off.", _count],
        ["rate-window", None, 900, "Length of the sliding window, in seconds.", _size],
        ["rate-key", None, "ip", "What the limiter counts by: ip or key."],
        ["ipv6-prefix", None, 56, "IPv6 clients are grouped by this prefix length.", _integer],
        ["aikey-file", None, None, "File holding the model server's API key."],
        [
            "upstream-idle-timeout",
            None,
            4.0,
            "Seconds an idle connection to a model server is kept for reuse.",
            _seconds,
        ],
        [
            "health-interval",
            None,
            5.0,
            "Seconds between health checks of each --upstream replica.",
            _seconds,
        ],
        [
            "fail-timeout",
            None,
            10.0,
            "Seconds a worker avoids a replica it could not connect to.",
            _seconds,
        ],
        ["retries", None, 2, "Other replicas a failed request may be sent to.", _count],
        [
            "api-keys-file",
            None,
            None,
            "File of client API keys, one a line; when set, every /v1 request needs one.",
        ],
        [
            "access-log",
            None,
            None,
            "Append one JSON line per request to this file (reopened on SIGHUP).",
        ],
        [
            "metrics-bind",
            None,
            None,
            "Serve Prometheus metrics at http://HOST:PORT/metrics ([::1]:PORT for IPv6); "
            "off unless given.",
            _host_port,
        ],
        [
            "rate-store",
            None,
            None,
            "Share the limit between hosts through Redis: redis://host[:port][/db] or "
            "unix:///path/redis.sock[?db=N] (default: each host counts alone).",
        ],
        ["rate-store-password-file", None, None, "File holding the --rate-store's password."],
        [
            "rate-store-timeout",
            None,
            0.25,
            "Seconds one --rate-store decision may take before the fallback decides.",
            _rate_store_timeout,
        ],
        [
            "rate-store-fallback",
            None,
            "local",
            "While the --rate-store cannot be reached: local (this host's own limit), "
            "open (admit) or closed (503).",
            _rate_store_fallback,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["trusted_proxies"] = []
        self["allowed_fields"] = []
        self["upstreams"] = []
        # Every flag with a coercer, those added later included, names itself
        # when its value is refused.
        for name, handler in self._dispatch.items():
            if isinstance(handler, usage.CoerceParameter):
                handler.coerce = _naming_flag(f"--{name}", handler.coerce)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse; as a twistd subcommand, report a usage error in one line and exit.

        twistd answers a subcommand's usage error by printing its whole option
        list first, and Twisted 22.4's twistd then exits with status 0.  Under
        twistd (and so under the C{llmgw} command, which runs twistd) the error
        is printed here, with a pointer to C{--help}, and the exit status is 1,
        as C{--help} itself exits from inside parsing.  Without a parent (tests,
        other programs) the L{usage.UsageError} propagates.
        """
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            if self.parent is None:
                raise
            self._exit_with_usage_error(e)

    def _exit_with_usage_error(self, error: usage.UsageError) -> NoReturn:
        command = self.getSynopsis().removeprefix("Usage: ").replace(" [options]", "")
        sys.stderr.write(f"{error}\nRun {command} --help for the list of options.\n")
        sys.stderr.flush()
        raise SystemExit(1)

    def getSynopsis(self) -> str:
        """
        C{Usage: llmgw [options]} when run as C{llmgw}; under twistd, twistd's
        own C{Usage: twistd [options] llmgw [options]}.
        """
        if self.parent is None or _run_as_console_script():
            return f"Usage: {COMMAND} {self.synopsis}"
        synopsis: str = super().getSynopsis()
        return synopsis

    def opt_version(self) -> NoReturn:
        """Print llmgw's version and exit."""
        print(f"{COMMAND} {version()}")
        raise SystemExit(0)

    def parseArgs(self, *arguments: str) -> None:
        if arguments:
            raise usage.UsageError(
                f"{COMMAND} takes only options, not the argument {arguments[0]!r}"
            )

    def opt_trusted_proxy(self, cidr: str) -> None:
        """Believe X-Forwarded-For and Forwarded from peers in CIDR (repeatable)."""
        try:
            self["trusted_proxies"].append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise usage.UsageError(f"--trusted-proxy {cidr!r} is not an address or CIDR") from None

    def opt_allow_field(self, name: str) -> None:
        """Forward chat_template, chat_template_kwargs or logits_processors (repeatable)."""
        if name not in RECONFIGURING_FIELDS:
            raise usage.UsageError(
                f"--allow-field: {name!r} is not a field that can be allowed; "
                f"use {', '.join(RECONFIGURING_FIELDS[:-1])} or {RECONFIGURING_FIELDS[-1]}"
            )
        self["allowed_fields"].append(name)

    def opt_upstream(self, url: str) -> None:
        """A model server replica, as https://host:port (repeatable; replaces --aihost)."""
        shown = _without_credentials(url)
        try:
            origin = upstream_origin(url)
        except ValueError as e:
            raise usage.UsageError(f"--upstream {shown!r}: {e}") from None
        if origin in self["upstreams"]:
            raise usage.UsageError(f"--upstream {shown!r} is given twice")
        self["upstreams"].append(origin)

    def postOptions(self) -> None:
        self.config = self._config()

    def _config(self) -> Config:
        named = [
            f"--{flag}" for flag in ("aihost", "aihostport", "aischeme") if self[flag] is not None
        ]
        if named and self["upstreams"]:
            raise usage.UsageError(
                f"--upstream replaces {', '.join(named)}: give the model servers either as "
                "--upstream https://host:port (repeatable) or as --aihost/--aihostport/--aischeme"
            )
        defaults = Config()
        for flag in ("aihost", "aihostport", "aischeme"):
            if self[flag] is None:
                self[flag] = getattr(defaults, flag)
        scheme = self["aischeme"].lower()
        if scheme not in ("https", "http"):
            raise usage.UsageError(f"--aischeme must be https or http, not {self['aischeme']!r}")
        if self["rate-key"] not in ("ip", "key"):
            raise usage.UsageError(f"--rate-key must be ip or key, not {self['rate-key']!r}")
        if not 0 <= self["ipv6-prefix"] <= 128:
            raise usage.UsageError("--ipv6-prefix must be between 0 and 128")
        if self["rate-key"] == "key" and not self["api-keys-file"]:
            raise usage.UsageError("--rate-key key needs --api-keys-file")
        try:
            ipaddress.ip_address(self["bindip"])
        except ValueError:
            raise usage.UsageError(f"--bindip {self['bindip']!r} is not an IP address") from None
        for flag in ("aica", "aikey-file", "api-keys-file"):
            path = self[flag]
            if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise usage.UsageError(f"--{flag} {path!r}: no such readable file")
        if self["aica"] is not None:
            try:
                load_trust_root(self["aica"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--aica {self['aica']!r}: {e}") from None
        # Read as the gateway will read them (llmgw.keys), so that a file
        # accepted here is one it can use.
        try:
            if self["aikey-file"] is not None:
                read_secret(self["aikey-file"])
            if self["api-keys-file"] is not None:
                read_client_keys(self["api-keys-file"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"key file: {e}") from None
        access_log = self["access-log"]
        if access_log is not None:
            directory = os.path.dirname(os.path.abspath(access_log))
            if not access_log or os.path.isdir(access_log) or not os.path.isdir(directory):
                raise usage.UsageError(
                    f"--access-log {access_log!r}: give a file in a directory that exists"
                )
            access_log = os.path.abspath(access_log)
        aihost = self["aihost"].strip()
        if aihost.startswith("[") and aihost.endswith("]"):
            aihost = aihost[1:-1]
        if not aihost or any(c in aihost for c in "/[]@ \t"):
            raise usage.UsageError(
                f"--aihost {self['aihost']!r} is not a host name or address; give the "
                "host alone, with the port in --aihostport and the scheme in --aischeme"
            )
        workers = self["workers"] if self["workers"] is not None else (os.cpu_count() or 1)
        rate_store = self._rate_store()
        return Config(
            bindip=self["bindip"],
            bindport=self["bindport"],
            aihost=aihost,
            aihostport=self["aihostport"],
            aischeme=scheme,
            aica=self["aica"],
            timeout=self["timeout"],
            connect_timeout=self["connect-timeout"],
            stream_idle_timeout=self["stream-idle-timeout"],
            read_timeout=self["read-timeout"],
            max_body=self["max-body"],
            default_model=self["default-model"],
            workers=workers,
            grace=self["grace"],
            verbose=bool(self["verbose"]),
            rate_limit=self["rate-limit"],
            rate_window=self["rate-window"],
            rate_key=self["rate-key"],
            ipv6_prefix=self["ipv6-prefix"],
            trusted_proxies=tuple(self["trusted_proxies"]),
            allowed_fields=frozenset(self["allowed_fields"]),
            aikey_file=self["aikey-file"],
            api_keys_file=self["api-keys-file"],
            upstreams=tuple(self["upstreams"]),
            upstream_idle_timeout=self["upstream-idle-timeout"],
            health_interval=self["health-interval"],
            fail_timeout=self["fail-timeout"],
            retries=self["retries"],
            access_log=access_log,
            metrics_bind=self["metrics-bind"],
            rate_store=rate_store,
            rate_store_password_file=self["rate-store-password-file"],
            rate_store_timeout=self["rate-store-timeout"],
            rate_store_fallback=self["rate-store-fallback"],
        )

    def _rate_store(self) -> str | None:
        """The C{--rate-store} URL in its canonical form, after checking its flags."""
        password_file = self["rate-store-password-file"]
        if self["rate-store"] is None:
            if password_file is not None:
                raise usage.UsageError("--rate-store-password-file needs --rate-store")
            return None
        try:
            address = rate_store_address(self["rate-store"])
        except ValueError as e:
            raise usage.UsageError(f"--rate-store: {e}") from None
        if not self["rate-limit"]:
            raise usage.UsageError("--rate-store needs limiting on: --rate-limit above 0")
        if password_file is not None and not (
            os.path.isfile(password_file) and os.access(password_file, os.R_OK)
        ):
            raise usage.UsageError(
                f"--rate-store-password-file {password_file!r}: no such readable file"
            )
        return str(address)
