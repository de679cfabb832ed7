"""
A stand-in for the model server: an OpenAI-compatible server that answers like vLLM.

The demo, the tests and the benchmarks need an upstream that is always there, costs nothing and
misbehaves on demand.  It echoes the last user message back, whole or as a paced event stream,
and it can hang, reset, answer garbage or fail; either by default for the whole server, or for
one request through a ``"mock"`` field in the body, which a gateway forwards untouched::

    {"model": "m", "messages": [...], "stream": true,
     "mock": {"delay": 0.5, "chunks": 4, "interval": 0.01, "fault": "reset"}}

It counts the generations it started, completed, and lost to a client that went away, so that
tests can see whether a gateway really cancels upstream work (`MockModel`, ``GET /mock/stats``).
"""

# twisted.web's request and resource methods are not annotated, even on Twisted 26.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from llmgw.startup import cannot_listen_message, refuse_to_start

DEFAULT_MODEL = "TheBloke/Mistral-7B-Instruct-v0.2-AWQ"

FAULTS = ("none", "hang", "reset", "garbage", "500", "503", "429", "slow-first-byte")
"""
How a reply can go wrong:

- ``hang``: accept the request and never answer.
- ``reset``: abort the TCP connection; a stream first sends its role chunk and half its
  content chunks.
- ``garbage``: 200 with an HTML body that is not JSON.
- ``500``, ``503``, ``429``: that status with an OpenAI-shaped error body (an overloaded
  replica answers 503, a rate-limited one 429).
- ``slow-first-byte``: nothing before ``delay`` has passed; every reply waits ``delay``
  before its status line anyway, so this is the same as ``none``, named for readability.
"""

GARBAGE = b"<html><body><h1>502 Bad Gateway</h1>mock fault: not JSON</body></html>\n"

_JSON = b"application/json"
_FAULT_MESSAGES = {
    500: "mock fault: internal server error",
    503: "mock fault: service unavailable",
    429: "mock fault: rate limited",
}
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def _json_bytes(value: object) -> bytes:
    """Compact, like vLLM's pydantic serialisation, with one encoder made once."""
    return _encode_json(value).encode("utf-8")


def error_body(status: int, message: str) -> bytes:
    """The one place the mock builds the OpenAI error shape (as recent vLLM sends it)."""
    kind = _ERROR_TYPES.get(status, "Error")
    return _json_bytes({"error": {"message": message, "type": kind, "param": None, "code": status}})


def chat_completion_body(
    request_id: str, created: int, model: str, text: str, usage: Mapping[str, int]
) -> dict[str, Any]:
    """
    vLLM's non-streamed C{chat.completion}, with every field its OpenAI server
    sends (an assistant message with C{tool_calls: []}, and the rest null), so
    that clients meet the shapes they will meet in production.
    """
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**usage, "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def model_listing(
    model: str, created: int, permission_id: str = "modelperm-mock", max_model_len: int = 32768
) -> dict[str, Any]:
    """vLLM's C{GET /v1/models} body for its one served model."""
    permission = {
        "id": permission_id,
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": model,
                "parent": None,
                "max_model_len": max_model_len,
                "permission": [permission],
            }
        ],
    }


def _answer(request: Request, status: int, content_type: bytes, body: bytes) -> None:
    """Send a whole reply at once, with a length, so that it is not chunked."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


def _chunk_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
    return value


def _fault(value: object, name: str) -> str:
    if not isinstance(value, str) or value not in FAULTS:
        raise ValueError(f"{name} must be one of {', '.join(FAULTS)}; not {value!r}")
    return value


@attrs.frozen
class Behaviour:
    """How replies are paced and whether they fail: the server's defaults, or one request's."""

    delay: float = 0.0
    chunks: int = 8
    interval: float = 0.05
    fault: str = "none"

    def overridden_by(self, overrides: object) -> Behaviour:
        """Apply a request's ``"mock"`` field; `ValueError` says what is wrong with it."""
        if not isinstance(overrides, dict):
            raise ValueError(f"mock must be an object, not {overrides!r}")
        unknown = sorted(set(overrides) - {"delay", "chunks", "interval", "fault"})
        if unknown:
            raise ValueError(
                f"mock has unknown fields {unknown}; known: chunks delay fault interval"
            )
        return Behaviour(
            delay=_seconds(overrides.get("delay", self.delay), "mock.delay"),
            chunks=_chunk_count(overrides.get("chunks", self.chunks), "mock.chunks"),
            interval=_seconds(overrides.get("interval", self.interval), "mock.interval"),
            fault=_fault(overrides.get("fault", self.fault), "mock.fault"),
        )


@attrs.frozen
class Completion:
    """What one request asks for, read and checked before any reply is started."""

    model: str
    text: str
    stream: bool
    include_usage: bool
    behaviour: Behaviour
    usage: Mapping[str, int]


def _text_of(content: object) -> str:
    """A message's text: a string, or the text parts of a multi-part content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def read_completion(body: bytes, defaults: Behaviour, served_model: str) -> Completion:
    """
    Parse a chat completion request; raise `ValueError` with a message for the client.

    Token counts are whitespace-separated words: deterministic, cheap, and close enough for a
    stand-in.
    """
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise ValueError("request body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of objects")
    texts = [_text_of(m.get("content")) for m in messages]
    user_texts = [t for m, t in zip(messages, texts, strict=True) if m.get("role") == "user"]
    reply = user_texts[-1] if user_texts else ""
    behaviour = defaults
    if "mock" in request:
        behaviour = defaults.overridden_by(request["mock"])
    stream_options = request.get("stream_options")
    prompt_tokens = sum(len(t.split()) for t in texts)
    completion_tokens = len(reply.split())
    model = request.get("model")
    return Completion(
        model=model if isinstance(model, str) else served_model,
        text=reply,
        stream=request.get("stream") is True,
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
        behaviour=behaviour,
        usage={
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        },
    )


def split_evenly(text: str, pieces: int) -> list[str]:
    """Exactly ``pieces`` consecutive slices of ``text`` (some empty if it is short)."""
    size = len(text)
    return [text[i * size // pieces : (i + 1) * size // pieces] for i in range(pieces)]


class MockModel:
    """
    The state every request shares: the defaults, the clock and the counters.

    ``started`` counts accepted chat completions; each then ends as exactly one of
    ``completed`` (its reply was sent whole, faults included), ``cancelled`` (its client went
    away first), or ``aborted`` (a ``reset`` fault dropped the connection); ``active`` is the
    rest.
    """

    def __init__(
        self,
        clock: IReactorTime,
        defaults: Behaviour = Behaviour(),
        served_model: str = DEFAULT_MODEL,
    ) -> None:
        self.clock = clock
        self.defaults = defaults
        self.served_model = served_model
        self.started = 0
        self.completed = 0
        self.cancelled = 0
        self.aborted = 0
        self.last_authorization: bytes | None = None
        """The C{Authorization} header of the latest chat request, so tests can see keys."""
        self.request_ids: list[bytes | None] = []
        """The C{X-Request-Id} of every chat request, in order, so tests can see ids."""

    @property
    def last_request_id(self) -> bytes | None:
        """The C{X-Request-Id} of the latest chat request."""
        return self.request_ids[-1] if self.request_ids else None

    @property
    def active(self) -> int:
        return self.started - self.completed - self.cancelled - self.aborted

    def stats(self) -> dict[str, int]:
        return {
            "started": self.started,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "aborted": self.aborted,
            "active": self.active,
        }


class Generation:
    """
    One chat completion in flight.

    It holds at most one pending timer, so a client that goes away cancels exactly the work
    still to come; and it settles the counters exactly once.
    """

    def __init__(self, model: MockModel, request: Request, completion: Completion) -> None:
        self._model = model
        self._request = request
        self._completion = completion
        self._behaviour = completion.behaviour
        self._timer: IDelayedCall | None = None
        self._settled = False
        model.started += 1
        self._id = f"chatcmpl-{model.started:032x}"
        self._created = int(model.clock.seconds())
        self._sent = 0
        self._content_events: list[bytes] = []
        request.notifyFinish().addErrback(self._client_gone)

    def start(self) -> None:
        if self._behaviour.fault == "hang":
            return
        self._after(self._behaviour.delay, self._respond)

    def _after(self, seconds: float, step: Callable[[], None]) -> None:
        """Run ``step`` now if no wait is due, so an undelayed reply starts within render."""
        if seconds > 0:
            self._timer = self._model.clock.callLater(seconds, self._fire, step)
        else:
            step()

    def _fire(self, step: Callable[[], None]) -> None:
        self._timer = None
        step()

    def _settle(self, outcome: Literal["completed", "cancelled", "aborted"]) -> bool:
        if self._settled:
            return False
        self._settled = True
        setattr(self._model, outcome, getattr(self._model, outcome) + 1)
        return True

    def _client_gone(self, reason: Failure) -> None:
        if self._settle("cancelled") and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self) -> None:
        self._settle("aborted")
        cast(ITCPTransport, self._request.transport).abortConnection()

    def _finish(self, status: int, content_type: bytes, body: bytes) -> None:
        self._settle("completed")
        _answer(self._request, status, content_type, body)

    def _respond(self) -> None:
        fault = self._behaviour.fault
        if fault == "garbage":
            self._finish(200, b"text/html; charset=utf-8", GARBAGE)
        elif fault in ("500", "503", "429"):
            status = int(fault)
            self._finish(status, _JSON, error_body(status, _FAULT_MESSAGES[status]))
        elif self._completion.stream:
            self._start_stream()
        elif fault == "reset":
            self._abort()
        else:
            self._finish(200, _JSON, self._whole_reply())

    def _whole_reply(self) -> bytes:
        c = self._completion
        return _json_bytes(chat_completion_body(self._id, self._created, c.model, c.text, c.usage))

    def _event(self, choices: list[dict[str, Any]], **extra: object) -> bytes:
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._completion.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + _json_bytes(chunk) + b"\n\n"

    def _delta_event(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = None
        return self._event([choice])

    def _encode_content_events(self) -> list[bytes]:
        """
        Every content chunk, encoded up front.  They differ only in their text, so the rest is
        encoded once, around a placeholder, and each piece of text is spliced in: streams are
        what the benchmarks hammer.
        """
        template = self._delta_event({"content": "\0"})
        before, _, after = template.rpartition(b'"\\u0000"')
        pieces = split_evenly(self._completion.text, self._behaviour.chunks)
        return [before + _json_bytes(piece) + after for piece in pieces]

    def _start_stream(self) -> None:
        self._content_events = self._encode_content_events()
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(self._delta_event({"role": "assistant", "content": ""}))
        self._schedule_next()

    def _schedule_next(self) -> None:
        self._timer = self._model.clock.callLater(self._behaviour.interval, self._fire, self._tick)

    def _tick(self) -> None:
        if self._behaviour.fault == "reset" and self._sent == len(self._content_events) // 2:
            self._abort()
            return
        request = self._request
        request.write(self._content_events[self._sent])
        self._sent += 1
        if self._sent < len(self._content_events):
            self._schedule_next()
            return
        self._settle("completed")
        request.write(self._delta_event({"content": ""}, "stop"))
        if self._completion.include_usage:
            request.write(self._event([], usage=dict(self._completion.usage)))
        request.write(b"data: [DONE]\n\n")
        request.finish()


class _JsonResource(Resource):
    """Answers unknown children and unsupported methods in the OpenAI error shape."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _NotFound()

    def render(self, request: Request) -> bytes | int:
        try:
            result: bytes | int = super().render(request)
        except UnsupportedMethod as e:
            request.setHeader(b"allow", b", ".join(e.allowedMethods))
            request.setHeader(b"content-type", _JSON)
            request.setResponseCode(405)
            method = request.method.decode("ascii", "replace")
            return error_body(405, f"{method} is not allowed here")
        return result


class _NotFound(_JsonResource):
    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _JSON)
        request.setResponseCode(404)
        return error_body(404, f"no such path: {request.path.decode('utf-8', 'replace')}")


class ChatCompletions(_JsonResource):
    """``POST /v1/chat/completions``."""

    def __init__(self, model: MockModel) -> None:
        super().__init__()
        self._model = model

    def render_POST(self, request: Request) -> bytes | int:
        self._model.last_authorization = request.getHeader(b"authorization")
        self._model.request_ids.append(request.getHeader(b"x-request-id"))
        try:
            body = b"" if request.content is None else request.content.read()
            completion = read_completion(body, self._model.defaults, self._model.served_model)
        except ValueError as e:
            request.setHeader(b"content-type", _JSON)
            request.setResponseCode(400)
            return error_body(400, str(e))
        Generation(self._model, request, completion).start()
        return NOT_DONE_YET


class Models(_JsonResource):
    """``GET /v1/models``: always answers at once, whatever the default behaviour."""

    def __init__(self, model: MockModel) -> None:
        super().__init__()
        self._model = model

    def render_GET(self, request: Request) -> bytes:
        listing = model_listing(self._model.served_model, int(self._model.clock.seconds()))
        request.setHeader(b"content-type", _JSON)
        return _json_bytes(listing)


class Stats(_JsonResource):
    """``GET /mock/stats``: the counters of `MockModel`, for tests that run the mock apart."""

    def __init__(self, model: MockModel) -> None:
        super().__init__()
        self._model = model

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _JSON)
        request.setHeader(b"cache-control", b"no-store")
        return _json_bytes(self._model.stats())


def make_resource(model: MockModel) -> IResource:
    """The whole tree: ``/v1/chat/completions``, ``/v1/models`` and ``/mock/stats``."""
    root, v1, chat, mock = _JsonResource(), _JsonResource(), _JsonResource(), _JsonResource()
    root.putChild(b"v1", v1)
    root.putChild(b"mock", mock)
    v1.putChild(b"chat", chat)
    v1.putChild(b"models", Models(model))
    chat.putChild(b"completions", ChatCompletions(model))
    mock.putChild(b"stats", Stats(model))
    return root


class QuietSite(Site):
    """
    A `Site` without access lines: as a benchmark upstream the mock would spend real time on
    them, and the gateway in front logs every request already.
    """

    def log(self, request: http.Request) -> None:
        pass


class TrackedConnection(ProtocolWrapper):
    """
    Tells the HTTP channel that the connection is gone before it tells the tracker (the plain
    `ProtocolWrapper` does it the other way round), so that by the time the tracker says all
    connections are gone, every generation on them has been cancelled and counted.
    """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.wrappedProtocol.connectionLost(reason)
        self.factory.unregisterProtocol(self)
        self.wrappedProtocol = None  # type: ignore[assignment]  # break the reference cycle


class ConnectionTracker(WrappingFactory):
    """Knows the open connections, so that stopping the mock can close them and wait."""

    protocol = TrackedConnection

    def __init__(self, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self._emptied: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: object) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def close_all(self) -> defer.Deferred[None]:
        """Abort every open connection; fire once they are all gone."""
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._emptied.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


class MockService(Service):
    """
    Listens while running.  A bind failure raises from `startService`, so that ``twistd``
    stops loudly instead of running a server that serves nothing: with one line that
    names the flag (``--port 8443: address already in use``) and no traceback.
    """

    def __init__(
        self,
        model: MockModel,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        portfile: str | None = None,
    ) -> None:
        self.model = model
        self._endpoint = endpoint
        self._tracker = ConnectionTracker(factory)
        self._portfile = None if portfile is None else Path(portfile)
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        failures: list[Failure] = []
        d = self._endpoint.listen(self._tracker)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            error = failures[0].value
            if isinstance(error, CannotListenError):
                refuse_to_start(cannot_listen_message(error, "--port", "--bindip"))
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        if self._portfile is not None:
            temporary = self._portfile.with_name(self._portfile.name + ".tmp")
            address = port.getHost()
            assert isinstance(address, (IPv4Address, IPv6Address))
            temporary.write_text(f"{address.port}\n")
            os.replace(temporary, self._portfile)

    def stopService(self) -> defer.Deferred[None]:
        """Stop listening, then close the open connections, so nothing outlives the service."""
        super().stopService()
        port, self.port = self.port, None
        if self._portfile is not None:
            self._portfile.unlink(missing_ok=True)
        return defer.Deferred.fromCoroutine(self._stop(port))

    async def _stop(self, port: IListeningPort | None) -> None:
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        await self._tracker.close_all()


def _option(
    check: Callable[[object, str], object], convert: Callable[[str], object], name: str
) -> Callable[[str], object]:
    """A `usage.Options` coercer: convert the text, then apply the same check a request gets."""

    def coerce(text: str) -> object:
        value: object = text
        try:
            value = convert(text)
        except ValueError:
            pass  # the check rejects the text itself, saying what it wanted
        return check(value, name)

    return coerce


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be an integer from 0 to 65535, not {text!r}")
    return port


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"--bindip must be an IP address, not {text!r}") from None


class MockOptions(usage.Options):
    """``twistd llmgw-mock``: the stand-in model server."""

    synopsis = "[--port 8443] [--cert server.pem --key server.key] [options]"

    optParameters: ClassVar[list[list[Any]]] = [
        ["bindip", None, "127.0.0.1", "Address to listen on.", _ip],
        ["port", "p", 8443, "TCP port to listen on; 0 picks a free one.", _port],
        ["cert", None, None, "PEM server certificate; with --key, serve HTTPS."],
        ["key", None, None, "PEM private key for --cert."],
        ["model", None, DEFAULT_MODEL, "Model name that /v1/models lists."],
        [
            "delay",
            None,
            0.0,
            "Seconds to wait before replying.",
            _option(_seconds, float, "--delay"),
        ],
        ["chunks", None, 8, "Content chunks per stream.", _option(_chunk_count, int, "--chunks")],
        [
            "interval",
            None,
            0.05,
            "Seconds between stream chunks.",
            _option(_seconds, float, "--interval"),
        ],
        ["fault", None, "none", f"One of: {', '.join(FAULTS)}.", _option(_fault, str, "--fault")],
        ["portfile", None, None, "Write the bound port number to this file once listening."],
    ]

    def postOptions(self) -> None:
        """Read the certificate now, so a bad one is a usage error and not a failed start."""
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("--cert and --key go together: give both for HTTPS, or neither")
        self["tls"] = None
        if self["cert"] is not None:
            self["tls"] = _load_tls(self["cert"], self["key"])

    def behaviour(self) -> Behaviour:
        return Behaviour(
            delay=self["delay"],
            chunks=self["chunks"],
            interval=self["interval"],
            fault=self["fault"],
        )


Options = MockOptions
"""The name a string-form ``ServiceMaker`` looks up."""


def _load_tls(cert_path: str, key_path: str) -> IOpenSSLContextFactory:
    try:
        cert_pem = Path(cert_path).read_bytes()
        key_pem = Path(key_path).read_bytes()
    except OSError as e:
        raise usage.UsageError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        certificate = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        # Session tickets on, as vLLM's uvicorn (Python's ssl) has them:
        # Twisted's default turns them off, and the gateway resumes sessions.
        options = CertificateOptions(
            privateKey=certificate.privateKey.original,
            certificate=certificate.original,
            enableSessionTickets=True,
        )
        options.getContext()
    except Exception as e:
        raise usage.UsageError(
            f"--cert {cert_path} and --key {key_path} are not a matching PEM certificate and "
            f"key: {e}"
        ) from None
    return cast(IOpenSSLContextFactory, options)


def makeService(options: MockOptions, reactor: IReactorTCP | None = None) -> MockService:
    """Compose the mock from parsed options; the global reactor is used only if none is given."""
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = cast(IReactorTCP, installed)
    model = MockModel(IReactorTime(reactor), options.behaviour(), options["model"])
    factory: IProtocolFactory = QuietSite(make_resource(model), reactor=reactor)
    if options["tls"] is not None:
        factory = TLSMemoryBIOFactory(options["tls"], False, factory)
    endpoint_type = TCP6ServerEndpoint if ":" in options["bindip"] else TCP4ServerEndpoint
    endpoint = endpoint_type(reactor, options["port"], interface=options["bindip"])
    return MockService(model, endpoint, factory, options["portfile"])
