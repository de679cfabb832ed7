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
from typing import Any, TypeVar, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
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
from llmgw.record import Attempt, RequestRecord, attempt_request_id
from llmgw.routing import Lease, Replica, Router
from llmgw.site import render_error
from llmgw.upstream import EventStreamRelay, ReplicaUnreachable, UpstreamClient
from llmgw.validation import validate_chat

log = Logger()

Handler = Callable[[Request], Awaitable[None]]
T = TypeVar("T")

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


def _record(request: Request) -> RequestRecord | None:
    """The request's record: every request a L{GatewaySite} makes has one."""
    return getattr(request, "record", None)


def _outcome(failure: BaseException) -> str:
    """How an attempt that failed with C{failure} ended."""
    if isinstance(failure, CancelledError):
        return "cancelled"
    if isinstance(failure, ApiError) and failure.status == 504:
        return "timeout"
    return "error"


def _media_type(request: Request) -> bytes:
    value = request.getHeader(b"content-type") or b""
    return value.split(b";", 1)[0].strip().lower()


def _on_disconnect(request: Request, action: Callable[[], object]) -> Deferred[None]:
    """
    Run C{action} if the client goes away before its response is finished.

    @return: the request's notification, for L{_forget_disconnect}.
    """
    gone: Deferred[None] = request.notifyFinish()
    gone.addErrback(lambda _: action())
    return gone


def _forget_disconnect(result: T, request: Request, gone: Deferred[None]) -> T:
    """
    Drop a notification of L{_on_disconnect} whose action has no more to do.

    A stream's request lives as long as the stream: what it is to notify
    (and all the notification holds) would otherwise live as long too.
    """
    if gone in request.notifications:
        request.notifications.remove(gone)
    return result


class _Discard(Protocol):
    """Reads a reply that will not be relayed, so its connection can be reused."""

    def dataReceived(self, data: bytes) -> None:
        pass


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
        router: Router | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.upstream = upstream
        self.clock = clock
        self.request_log = request_log
        self.limiter = limiter
        self.keys = keys if keys is not None else KeyRing(None, None)
        self.clients = ClientAddressPolicy(config.trusted_proxies, config.ipv6_prefix)
        self.router = (
            router if router is not None else Router(config.origins, clock, config.fail_timeout)
        )
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

    def _admit(self, request: Request) -> Deferred[None]:
        """
        Check the client's key and its rate; refuse with 401 or 429.

        A Deferred with a callback rather than a coroutine: every request
        passes here, and a coroutine would add a layer (its own Deferred and
        a resumption) between the limiter's answer and the request.
        """
        record = _record(request)
        token = bearer_token(request.getHeader(b"authorization"))
        if self.keys.requires_client_key and not self.keys.accepts(token):
            if record is not None:
                record.rejected = "auth"
            return fail(errors.invalid_api_key())
        if self.limiter is None:
            return succeed(None)
        if self.config.rate_key == "key" and token is not None:
            client = self.keys.client_identity(token)
        elif record is not None:
            client = record.client  # the site's answer, from the same peer and headers
        else:
            client = self.clients.client_key(peer_host(request), request.requestHeaders)
        decided: Deferred[Decision] = maybeDeferred(self.limiter.admit, client)
        return decided.addCallback(self._decided, request, record)

    def _decided(self, decision: Decision, request: Request, record: RequestRecord | None) -> None:
        """The limiter's answer: its headers on the response, and a 429 if it refused."""
        for name, value in rate_limit_headers(decision):
            request.setHeader(name, value)
        if not decision.allowed:
            self.counters.refused += 1
            if record is not None:
                record.rejected = "rate_limit"
            raise errors.rate_limited(decision.limit, decision.window, decision.reset)

    def _authorization(self, request: Request) -> bytes | None:
        if self.keys.upstream_authorization is not None:
            return self.keys.upstream_authorization
        return request.getHeader(b"authorization")

    def _send(
        self,
        request: Request,
        method: bytes,
        path: bytes,
        body: bytes | None,
        deadline: float,
        origin: bytes | None = None,
        request_id: str | None = None,
    ) -> Deferred[IResponse]:
        """
        Start the request upstream, to be cancelled if the client goes away.

        The Deferred itself, for the caller to await, rather than a coroutine
        that awaits it: one layer less for every request.

        @raise CancelledError: the client has gone already.
        """
        if request._disconnected:
            raise CancelledError()
        d = self.upstream.send(
            method, path, body, self._authorization(request), deadline, origin, request_id
        )
        # Once the reply's headers are in, there is nothing left to cancel here.
        return d.addBoth(_forget_disconnect, request, _on_disconnect(request, d.cancel))

    async def _forward(
        self,
        request: Request,
        method: bytes,
        path: bytes,
        body: bytes | None,
        model: str | None,
        started: float,
    ) -> tuple[IResponse, Lease]:
        """
        Send the request to a replica chosen for C{model}, and to another (at
        most C{--retries} more) if that one cannot be reached or answers 503:
        in both cases the model did no work, and nothing has been relayed yet.
        Any other answer, error or not, is the reply.  Every attempt shares
        the request's C{--timeout}, counted from C{started}.

        Each try is an L{Attempt} in the request's record, and goes out with
        an C{X-Request-Id} of its own (L{attempt_request_id}).

        @return: the reply whose headers arrived, and the lease that counts it
            in flight on its replica until the caller releases it.
        """
        record = _record(request)
        attempts = [] if record is None else record.attempts
        tried: list[Replica] = []
        while True:
            replica = self.router.choose(model, tried)
            assert replica is not None  # tried never holds every replica here
            tried.append(replica)
            lease = self.router.lease(replica)
            last_try = len(tried) > self.config.retries or len(tried) == len(self.router.replicas)
            deadline = self._time_left(started)
            attempt = Attempt(replica.name)
            attempts.append(attempt)
            request_id = (
                None if record is None else attempt_request_id(record.request_id, len(tried))
            )
            try:
                response = await self._send(
                    request, method, path, body, deadline, replica.origin, request_id
                )
            except ReplicaUnreachable as e:
                attempt.outcome = "unreachable"
                lease.release(failed=True)
                self.router.eject(replica, e.error.message)
                if last_try:
                    raise e.error from None
                if record is not None:
                    record.retry_reasons.append("unreachable")
                continue
            except ApiError as e:
                attempt.outcome = _outcome(e)
                lease.release(failed=True)
                raise
            except BaseException as e:
                attempt.outcome = _outcome(e)
                lease.release()  # cancelled: the client went away
                raise
            if response.code == 503 and not last_try:
                log.info("{replica} answered 503; trying another", replica=replica.name)
                attempt.outcome = "unavailable"
                if record is not None:
                    record.retry_reasons.append("unavailable")
                response.deliverBody(_Discard())
                lease.release(failed=True)
                continue
            return response, lease

    async def _relay_json(self, request: Request, response: IResponse, deadline: float) -> None:
        d = self.upstream.read_json(response, deadline)
        _on_disconnect(request, d.cancel)
        status, body, document = await d
        record = _record(request)
        if record is not None and isinstance(document, dict):
            record.take_usage(document.get("usage"))
        self.request_log.reply(request, status, body)
        _respond_json(request, status, body)

    def _time_left(self, started: float) -> float:
        """What is left of C{--timeout}, which bounds a whole reply that is not streamed."""
        return self.config.timeout - (self.clock.seconds() - started)

    async def chat_completions(self, request: Request) -> None:
        # Validation runs while the limiter (perhaps in the parent process)
        # decides; its verdict still comes first, so a refused client gets
        # its 429 whatever its body.
        admission = self._admit(request)
        try:
            if _media_type(request) != _JSON:
                raise errors.unsupported_media_type()
            chat = validate_chat(
                cast(BytesIO, request.content).getvalue(),
                default_model=self.config.default_model,
                allowed_fields=self.config.allowed_fields,
            )
            # Only chat.body is sent: a stream need not keep the client's buffer.
            request.content = None
        except ApiError:
            record = _record(request)
            if record is not None and record.rejected is None:
                # Unless the admission refused it already: its verdict comes first.
                record.rejected = "validation"
            await admission
            raise
        await admission
        record = _record(request)
        if record is not None:
            record.model = chat.model
            record.stream = chat.stream
        self.request_log.request(request, chat.body)
        started = self.clock.seconds()
        response, lease = await self._forward(
            request, b"POST", b"/v1/chat/completions", chat.body, chat.model, started
        )
        # Nothing is resent once a reply is in: a stream keeps neither the body nor its verdict.
        stream = chat.stream
        del chat, admission
        try:
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            if stream and response.code == 200 and content_type.startswith(_EVENT_STREAM):
                await self._relay_stream(request, response)
            else:
                await self._relay_json(request, response, self._time_left(started))
        except ApiError as e:
            if record is not None:
                record.attempts[-1].outcome = _outcome(e)
            lease.release(failed=True)
            raise
        except CancelledError:
            if record is not None:
                record.attempts[-1].outcome = "cancelled"
            raise
        finally:
            lease.release()

    async def _relay_stream(self, request: Request, response: IResponse) -> None:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", _EVENT_STREAM)
        request.setHeader(b"X-Accel-Buffering", b"no")
        on_chunk = None
        if self.request_log.verbose:
            on_chunk = lambda chunk: self.request_log.reply(request, 200, chunk)  # noqa: E731
        record = _record(request)
        relay = EventStreamRelay(
            request, self.clock, self.config.stream_idle_timeout, on_chunk, record
        )
        response.deliverBody(relay)
        _on_disconnect(request, relay.stop)
        await relay.done

    async def models(self, request: Request) -> None:
        await self._admit(request)
        if self.config.upstreams:
            listing = self.router.model_listing()
            if listing is not None:
                body = json.dumps({"object": "list", "data": listing}).encode()
                self.request_log.reply(request, 200, body)
                _respond_json(request, 200, body)
                return
        started = self.clock.seconds()
        response, lease = await self._forward(request, b"GET", b"/v1/models", None, None, started)
        try:
            await self._relay_json(request, response, self._time_left(started))
        finally:
            lease.release()

    async def healthz(self, request: Request) -> None:
        _respond_json(request, 200, _HEALTHY)

    async def readyz(self, request: Request) -> None:
        if self.config.upstreams:
            self._replicas_ready(request)
            return
        deadline = min(self.config.timeout, _READYZ_DEADLINE)
        record = _record(request)
        request_id = None if record is None else record.request_id
        try:
            response = await self._send(
                request, b"GET", b"/v1/models", None, deadline, None, request_id
            )
            status, _, _ = await self.upstream.read_json(response, deadline)
        except ReplicaUnreachable as e:
            raise errors.not_ready(e.error.message) from None
        except ApiError as e:
            raise errors.not_ready(e.message) from None
        if status != 200:
            raise errors.not_ready(f"the model server answered {status} to /v1/models.")
        _respond_json(request, 200, _READY)

    def _replicas_ready(self, request: Request) -> None:
        """Ready while the parent's checks find at least one replica up."""
        states = [
            {"upstream": replica.name, "state": _state(replica)} for replica in self.router.replicas
        ]
        if not any(replica.checked and replica.up for replica in self.router.replicas):
            summary = ", ".join(f"{state['upstream']} {state['state']}" for state in states)
            raise errors.not_ready(f"no model server is up ({summary}).")
        _respond_json(request, 200, json.dumps({"status": "ready", "upstreams": states}).encode())


def _state(replica: Replica) -> str:
    if not replica.checked:
        return "unchecked"
    return "up" if replica.up else "down"
