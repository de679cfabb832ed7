"""What the gateway says about each request: an access line, and the verbose view.

Every request gets its access line, whether C{--verbose} is on or off and
whatever the console switches it to; the verbose view (the validated input and
the reply in full) comes in addition, before it.

With C{--access-log}, each finished request is also one JSON line in a file
of its own (L{access_log_line}), written by one process for all workers
(L{AccessLogFile}), in batches of a tenth of a second (L{BatchedAccessLines}).

Events are structured (C{twisted.logger} fields); formatting is deferred to the
observer, so the hot path only builds a dict.  Secrets never reach an event:
request bodies are logged, headers are not, so an C{Authorization} header or a
key file's content cannot leak into the log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import Request

from llmgw.record import RequestRecord

log = Logger(namespace="llmgw.access")
_log = Logger()

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


def request_id(request: Request) -> str | None:
    """The id the gateway gave C{request}, if it has a record (a L{GatewaySite}'s do)."""
    record: RequestRecord | None = getattr(request, "record", None)
    return None if record is None else record.request_id


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
            client = f"{_CLIENT}{{client}}{_RESET} "
            self._request_format = f"{client}{_REQUEST}{{method}} {{path}}{_RESET} {{body}}"
            self._reply_format = f"{client}{{colour}}{{status}}{_RESET} {{body}}"
            self._ok, self._bad = _REPLY, _ERROR
        else:
            self._request_format = "{client} {method} {path} {body}"
            self._reply_format = "{client} {colour}{status} {body}"
            self._ok = self._bad = ""
        # The same, with the request's id after the client, for a gateway's
        # requests (a plain Site's have none).
        self._request_format_id = self._request_format.replace("{client}", "{client} {request_id}")
        self._reply_format_id = self._reply_format.replace("{client}", "{client} {request_id}")

    def access(self, request: Request) -> None:
        """One line per finished request (the Site's log hook), ending with its id."""
        started = getattr(request, "started", None)
        elapsed = 0.0 if started is None else (self.clock.seconds() - started) * 1000
        identifier = request_id(request)
        log.info(
            "{client} {method} {path} {status} {bytes} {ms:.1f}ms"
            if identifier is None
            else "{client} {method} {path} {status} {bytes} {ms:.1f}ms {request_id}",
            client=peer_host(request),
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            status=request.code,
            bytes=request.sentLength,
            ms=elapsed,
            request_id=identifier,
        )

    def request(self, request: Request, body: bytes) -> None:
        """The validated input, as the model server will see it."""
        if self.verbose:
            identifier = request_id(request)
            log.info(
                self._request_format if identifier is None else self._request_format_id,
                client=peer_host(request),
                request_id=identifier,
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
                body=body.decode("utf-8", "replace"),
            )

    def reply(self, request: Request, status: int, body: bytes) -> None:
        """The model's reply, or the error the client got."""
        if self.verbose:
            identifier = request_id(request)
            log.info(
                self._reply_format if identifier is None else self._reply_format_id,
                client=peer_host(request),
                request_id=identifier,
                colour=self._ok if status < 400 else self._bad,
                status=status,
                body=body.decode("utf-8", "replace").strip(),
            )


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def iso_utc(seconds: float) -> str:
    """C{2026-12-02T04:13:00.123Z}: ISO 8601, in UTC, to the millisecond."""
    whole = int(seconds)
    milliseconds = min(int((seconds - whole) * 1000), 999)
    return _utc_second(whole) + f".{milliseconds:03d}Z"


@lru_cache(maxsize=8)
def _utc_second(whole: int) -> str:
    """
    The date and time to the second: the same for every request in that
    second, so formatted once, not once a line.
    """
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


#: The encoder of access-log lines, made once: C{json.dumps} with any argument
#: makes a new one for every line.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def access_log_line(record: RequestRecord) -> str:
    """
    One C{--access-log} line: a JSON object and a newline.

    The fields are the same for every request (C{null} where they do not
    apply), so a reader never has to guess; C{time} is when the request
    began.  A record holds no body and no key, so neither does the line.
    """
    return (
        _COMPACT_JSON.encode(
            {
                "time": iso_utc(record.started),
                "request_id": record.request_id,
                "client": record.client,
                "method": record.method,
                "route": record.route,
                "status": record.status,
                "duration_ms": _milliseconds(record.duration),
                "ttft_ms": _milliseconds(record.ttft),
                "model": record.model,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "upstream": record.upstream,
                "attempts": len(record.attempts),
                "bytes_out": record.bytes_out,
                "user_agent": record.user_agent,
            }
        )
        + "\n"
    )


class AccessLogFile:
    """
    The C{--access-log} file: appended to by one process for all workers, and
    reopened on SIGHUP so that logrotate can move it away.

    Each batch is written and flushed at once, so that nothing waits in a
    buffer for a process that is about to exit.  Writes that fail (a full
    disk) are logged once, not once a batch, until one succeeds again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._failing = False

    def _open(self) -> TextIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return open(fd, "a", encoding="utf-8")

    def open(self) -> None:
        """
        Open the file for appending (start-up).

        @raise OSError: it cannot be, which the caller reports.
        """
        self._file = self._open()

    def reopen(self) -> None:
        """Open the path again (logrotate moved the file); keep the old file if that fails."""
        try:
            new = self._open()
        except OSError as e:
            _log.error(
                "Cannot reopen --access-log {path} ({why}); still writing to the old file",
                path=self.path,
                why=e.strerror,
            )
            return
        old, self._file = self._file, new
        if old is not None:
            _close(old)

    def write(self, lines: str) -> None:
        """Append lines, each ending with a newline."""
        if self._file is None:
            return
        try:
            self._file.write(lines)
            self._file.flush()
        except OSError as e:
            if not self._failing:
                self._failing = True
                _log.error(
                    "Cannot write --access-log {path} ({why}); lines are lost until it can be",
                    path=self.path,
                    why=e.strerror,
                )
            return
        if self._failing:
            self._failing = False
            _log.info("Writing --access-log {path} again", path=self.path)

    def close(self) -> None:
        if self._file is not None:
            _close(self._file)
            self._file = None


def _close(file: TextIO) -> None:
    """Close C{file}; lines its last flush could not write (a full disk) are lost."""
    try:
        file.close()
    except OSError:
        pass


#: Seconds access-log lines wait to be handed on with the ones that follow.
ACCESS_LOG_BATCH_SECONDS = 0.1


class BatchedAccessLines:
    """
    Access-log lines gathered for up to L{ACCESS_LOG_BATCH_SECONDS}, then
    handed on together: to the file in a lone process, to the parent over
    AMP in a worker.

    Under load a reactor turn finishes only a request or two; a message to
    the parent per turn cost a system call here and a wake-up there for
    nearly every request (6 % of the gateway's CPU per request in make
    bench).  A tenth of a second later in the file costs nothing; the drain
    and the shutdown flush what is left.

    @ivar send: takes the text of a whole batch.
    """

    def __init__(self, reactor: Any, send: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.send = send
        self.lines: list[str] = []
        self._timer: Any = None

    def add_record(self, record: RequestRecord) -> None:
        """A L{GatewaySite.record_observers} hook."""
        if not self.lines:
            self._timer = self.reactor.callLater(ACCESS_LOG_BATCH_SECONDS, self.flush)
        self.lines.append(access_log_line(record))

    def flush(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.lines:
            lines, self.lines = self.lines, []
            self.send("".join(lines))
