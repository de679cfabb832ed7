"""What happened to one request: filled in along the request path, read once it ends.

Each stage writes what it learns (the id, the model, the replica and each
attempt's outcome, the first token's time, the tokens used, why it was
refused or why its stream ended) into one L{RequestRecord}.  When the request
is finished, the same record feeds the metrics and the JSON access log, so
that the two always agree and the path is instrumented in one place.

Labels taken from a record are bounded: C{route} is one of L{ROUTES} or
C{other}, reasons and causes are fixed words, and nothing in it is a client
address or a key apart from C{client}, which only the access log uses.
"""

from __future__ import annotations

import re
import secrets
from itertools import count

import attrs

#: The routes metrics are labelled with; any other path counts as C{other}.
ROUTES = ("/v1/chat/completions", "/v1/models", "/healthz", "/readyz")

#: Why a request was refused before it reached a model server.
REJECT_REASONS = ("rate_limit", "auth", "validation", "too_large", "read_timeout")

#: Why a stream ended before the model server finished it.
ABORT_CAUSES = ("client_gone", "upstream_broke", "idle_timeout")

#: How one attempt at a model server ended.
OUTCOMES = ("ok", "unreachable", "unavailable", "error", "timeout", "cancelled")


#: What an incoming C{X-Request-Id} must look like to be kept.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}\Z")


def route_label(path: bytes) -> str:
    """The bounded C{route} label of a request path."""
    text = path.decode("ascii", "replace")
    return text if text in ROUTES else "other"


@attrs.define
class Attempt:
    """One try at one model server."""

    upstream: str
    outcome: str = "ok"
    """One of L{OUTCOMES}; C{ok} means it answered, whatever its status."""


@attrs.define
class RequestRecord:
    """
    One request, as the gateway saw it.

    @ivar started: clock time its first byte arrived (or the connection
        opened, for a request refused at the connection level).
    @ivar ttft: seconds from C{started} to the first event of a streamed reply.
    @ivar retry_reasons: why each attempt after the first was made: the
        previous attempt's outcome (C{unreachable} or C{unavailable}).
    """

    request_id: str
    started: float
    client: str
    method: str
    route: str
    user_agent: str | None = None
    model: str | None = None
    status: int | None = None
    finished: float | None = None
    stream: bool = False
    ttft: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    bytes_out: int = 0
    rejected: str | None = None
    """One of L{REJECT_REASONS}, if it was refused."""
    stream_abort: str | None = None
    """One of L{ABORT_CAUSES}, if its stream ended early."""
    attempts: list[Attempt] = attrs.Factory(list)
    retry_reasons: list[str] = attrs.Factory(list)

    @property
    def upstream(self) -> str | None:
        """The model server of the last attempt."""
        return self.attempts[-1].upstream if self.attempts else None

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    def take_usage(self, usage: object) -> None:
        """Keep the token counts of a reply's (or a stream's last chunk's) C{usage}."""
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if type(prompt) is int:
            self.prompt_tokens = prompt
        if type(completion) is int:
            self.completion_tokens = completion


class RequestIds:
    """
    Request ids: a random prefix for this process, then a counter.

    Unique across workers and restarts (48 random bits each time a process
    starts) and cheap: no system call and no UUID per request.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = secrets.token_hex(6) if prefix is None else prefix
        self._counter = count(1)

    def new(self) -> str:
        return f"{self.prefix}{next(self._counter):08x}"

    def choose(self, incoming: bytes | None, trusted: bool) -> str:
        """
        The id of a request: the one it came with, if it came from a trusted
        proxy and looks like an id (letters, digits and C{._:-}, at most 128
        of them), else a new one.  Anything else could forge or flood the
        logs of the gateway and of the model server.
        """
        if trusted and incoming is not None and _REQUEST_ID.match(incoming):
            return incoming.decode("ascii")
        return self.new()


def attempt_request_id(request_id: str, attempt: int) -> str:
    """
    The C{X-Request-Id} of one attempt at a model server: the request's id for
    the first, C{<id>-2}, C{<id>-3} for the others.  vLLM takes it as its own
    request id, which must not repeat.
    """
    return request_id if attempt == 1 else f"{request_id}-{attempt}"
