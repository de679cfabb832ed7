"""The gateway's resources: one straight line per request.

C{POST /v1/chat/completions}: admit, check the media type, validate, forward,
relay.  C{GET /v1/models}: admit, forward, relay.  C{/healthz} answers locally;
C{/readyz} asks the model server, and only when called.  The tree is a single
leaf that routes on the exact path, so an unknown path or a wrong method gets
an OpenAI-shaped 404 or 405 instead of Twisted's HTML pages.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from io import BytesIO
from typing import Any, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmgw import errors
from llmgw.clients import ClientAddressPolicy
from llmgw.errors import ApiError
from llmgw.keys import KeyRing, bearer_token
from llmgw.logs import RequestLog, peer_host
from llmgw.options import Config
from llmgw.ratelimit import Decision, ILimiter, rate_limit_headers
from llmgw.site import render_error
from llmgw.upstream import EventStreamRelay, UpstreamClient
from llmgw.validation import validate_chat

log = Logger()

Handler = Callable[[Request], Awaitable[None]]

_JSON = b"application/json"
_EVENT_STREAM = b"text/event-stream"
_READY = json.dumps({"status": "ready"}).encode()
_HEALTHY = json.dumps({"status": "ok"}).encode()
_READYZ_DEADLINE = 10.0


@attrs.define
class Counters:
    """What the console's C{stats} shows for this worker."""

    started: float
    served: int = 0
    in_flight: int = 0
    refused: int = 0
    upstream_errors: int = 0


def _media_type(request: Request) -> bytes:
    value = request.getHeader(b"content-type") or b""
    return value.split(b";", 1)[0].strip().lower()


def _on_disconnect(request: Request, action: Callable[[], object]) -> None:
    """Run C{action} if the client goes away before its response is finished."""
    request.notifyFinish().addErrback(lambda _: action())


def _respond_json(request: Request, status: int, body: bytes) -> None:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", _JSON)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


class GatewayResource(Resource):
    """The whole tree: exact paths to per-method handlers."""

    isLeaf = True

    def __init__(
        self,
        config: Config,
        upstream: UpstreamClient,
        clock: IReactorTime,
        request_log: RequestLog,
        limiter: ILimiter | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.upstream = upstream
        self.clock = clock
        self.request_log = request_log
        self.limiter = limiter
        self.keys = keys if keys is not None else KeyRing(None, None)
        self.clients = ClientAddressPolicy(config.trusted_proxies, config.ipv6_prefix)
        self.counters = Counters(started=clock.seconds())
        self._routes: dict[bytes, dict[bytes, Handler]] = {
            b"/v1/chat/completions": {b"POST": self.chat_completions},
            b"/v1/models": {b"GET": self.models},
            b"/healthz": {b"GET": self.healthz},
            b"/readyz": {b"GET": self.readyz},
        }

    def render(self, request: Request) -> Any:
        request.started = self.clock.seconds()  # type: ignore[attr-defined]
        methods = self._routes.get(request.path)
        if methods is None:
            render_error(request, errors.not_found(request.path.decode("ascii", "replace")))
            return NOT_DONE_YET
        handler = methods.get(request.method)
        if handler is None:
            method = request.method.decode("ascii", "replace")
            render_error(request, errors.method_not_allowed(method, tuple(methods)))
            return NOT_DONE_YET
        self.counters.in_flight += 1
        d: Deferred[None] = Deferred.fromCoroutine(handler(request))  # type: ignore[arg-type]
        d.addErrback(self._failed, request)
        d.addBoth(self._done)
        return NOT_DONE_YET

    def _done(self, _: object) -> None:
        self.counters.in_flight -= 1
        self.counters.served += 1

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError):
            return
        if failure.check(ApiError):
            error: ApiError = failure.value  # type: ignore[assignment]
            if error.status in (502, 504):
                self.counters.upstream_errors += 1
            self.request_log.reply(request, error.status, error.body())
            render_error(request, error)
            return
        request.processingFailed(failure)

    async def _admit(self, request: Request) -> None:
        """Check the client's key and its rate; refuse with 401 or 429."""
        token = bearer_token(request.getHeader(b"authorization"))
        if self.keys.requires_client_key and not self.keys.accepts(token):
            raise errors.invalid_api_key()
        if self.limiter is None:
            return
        if self.config.rate_key == "key" and token is not None:
            client = self.keys.client_identity(token)
        else:
            client = self.clients.client_key(peer_host(request), request.requestHeaders)
        decision: Decision = await self.limiter.admit(client)
        for name, value in rate_limit_headers(decision):
            request.setHeader(name, value)
        if not decision.allowed:
            self.counters.refused += 1
            raise errors.rate_limited(decision.limit, decision.window, decision.reset)

    def _authorization(self, request: Request) -> bytes | None:
        if self.keys.upstream_authorization is not None:
            return self.keys.upstream_authorization
        return request.getHeader(b"authorization")

    async def _send(
        self, request: Request, method: bytes, path: bytes, body: bytes | None, deadline: float
    ) -> IResponse:
        if request._disconnected:
            raise CancelledError()
        d = self.upstream.send(method, path, body, self._authorization(request), deadline)
        _on_disconnect(request, d.cancel)
        return await d

    async def _relay_json(self, request: Request, response: IResponse) -> None:
        d = self.upstream.read_json(response)
        _on_disconnect(request, d.cancel)
        status, body, _ = await d
        self.request_log.reply(request, status, body)
        _respond_json(request, status, body)

    async def chat_completions(self, request: Request) -> None:
        # Validation runs while the limiter (perhaps in the parent process)
        # decides; its verdict still comes first, so a refused client gets
        # its 429 whatever its body.
        admission: Deferred[None] = Deferred.fromCoroutine(self._admit(request))
        try:
            if _media_type(request) != _JSON:
                raise errors.unsupported_media_type()
            chat = validate_chat(
                cast(BytesIO, request.content).getvalue(),
                default_model=self.config.default_model,
                allowed_fields=self.config.allowed_fields,
            )
        except ApiError:
            await admission
            raise
        await admission
        self.request_log.request(request, chat.body)
        response = await self._send(
            request, b"POST", b"/v1/chat/completions", chat.body, self.config.timeout
        )
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        if chat.stream and response.code == 200 and content_type.startswith(_EVENT_STREAM):
            await self._relay_stream(request, response)
        else:
            await self._relay_json(request, response)

    async def _relay_stream(self, request: Request, response: IResponse) -> None:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", _EVENT_STREAM)
        request.setHeader(b"X-Accel-Buffering", b"no")
        on_chunk = None
        if self.request_log.verbose:
            on_chunk = lambda chunk: self.request_log.reply(request, 200, chunk)  # noqa: E731
        relay = EventStreamRelay(request, self.clock, self.config.stream_idle_timeout, on_chunk)
        response.deliverBody(relay)
        _on_disconnect(request, relay.stop)
        await relay.done

    async def models(self, request: Request) -> None:
        await self._admit(request)
        response = await self._send(request, b"GET", b"/v1/models", None, self.config.timeout)
        await self._relay_json(request, response)

    async def healthz(self, request: Request) -> None:
        _respond_json(request, 200, _HEALTHY)

    async def readyz(self, request: Request) -> None:
        deadline = min(self.config.timeout, _READYZ_DEADLINE)
        try:
            response = await self._send(request, b"GET", b"/v1/models", None, deadline)
            status, _, _ = await self.upstream.read_json(response)
        except ApiError as e:
            raise errors.not_ready(e.message) from None
        if status != 200:
            raise errors.not_ready(f"the model server answered {status} to /v1/models.")
        _respond_json(request, 200, _READY)
