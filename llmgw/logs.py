"""What the gateway says about each request: an access line, and the verbose view.

Every request gets its access line, whether C{--verbose} is on or off and
whatever the console switches it to; the verbose view (the validated input and
the reply in full) comes in addition, before it.

Events are structured (C{twisted.logger} fields); formatting is deferred to the
observer, so the hot path only builds a dict.  Secrets never reach an event:
request bodies are logged, headers are not, so an C{Authorization} header or a
key file's content cannot leak into the log.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import Request

log = Logger(namespace="llmgw.access")

_RESET = "\x1b[0m"
_CLIENT = "\x1b[36m"
_REQUEST = "\x1b[1;34m"
_REPLY = "\x1b[32m"
_ERROR = "\x1b[1;31m"


def use_colour(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """ANSI colours only for a terminal, and never when C{NO_COLOR} is set."""
    stream = sys.stdout if stream is None else stream
    environ = dict(os.environ) if environ is None else environ
    if environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def peer_host(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", address))


class RequestLog:
    """
    The access line for every request, and the verbose view when asked for.

    @ivar verbose: log validated input and replies in full; switchable while
        running (the console's C{verbose on|off}).
    """

    def __init__(self, clock: IReactorTime, *, verbose: bool, colour: bool) -> None:
        self.clock = clock
        self.verbose = verbose
        if colour:
            self._request_format = (
                f"{_CLIENT}{{client}}{_RESET} {_REQUEST}{{method}} {{path}}{_RESET} {{body}}"
            )
            self._reply_format = (
                f"{_CLIENT}{{client}}{_RESET} {{colour}}{{status}}{_RESET} {{body}}"
            )
            self._ok, self._bad = _REPLY, _ERROR
        else:
            self._request_format = "{client} {method} {path} {body}"
            self._reply_format = "{client} {colour}{status} {body}"
            self._ok = self._bad = ""

    def access(self, request: Request) -> None:
        """One line per finished request (the Site's log hook)."""
        started = getattr(request, "started", None)
        elapsed = 0.0 if started is None else (self.clock.seconds() - started) * 1000
        log.info(
            "{client} {method} {path} {status} {bytes} {ms:.1f}ms",
            client=peer_host(request),
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            status=request.code,
            bytes=request.sentLength,
            ms=elapsed,
        )

    def request(self, request: Request, body: bytes) -> None:
        """The validated input, as the model server will see it."""
        if self.verbose:
            log.info(
                self._request_format,
                client=peer_host(request),
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                body=body.decode("utf-8", "replace"),
            )

    def reply(self, request: Request, status: int, body: bytes) -> None:
        """The model's reply, or the error the client got."""
        if self.verbose:
            log.info(
                self._reply_format,
                client=peer_host(request),
                colour=self._ok if status < 400 else self._bad,
                status=status,
                body=body.decode("utf-8", "replace").strip(),
            )
