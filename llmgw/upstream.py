"""Forward requests to the model server, and bring its replies back.

One persistent connection pool per process, verified TLS (the platform's trust
store or C{--aica}, with hostname checks by service-identity, and no fallback
to unverified), and deadlines on every stage.  Every way the model server can
fail ends here as an L{ApiError}: 502 when it cannot be reached or answers
nonsense, 504 when it is too slow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import treq
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    _HTTP11ClientFactory,
    _RetryingHTTP11ClientProtocol,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from llmgw import errors
from llmgw.errors import ApiError
from llmgw.files import load_trust_root
from llmgw.options import Config
from llmgw.record import RequestRecord
from llmgw.tlsclient import SessionResumingCreator

log = Logger()

T = TypeVar("T")


def _describe(failure: Failure, origin: str | None) -> str:
    """
    Say why a connection failed, in words an operator can act on.

    @param origin: the C{--upstream} replica it was, or L{None} for C{--aihost}.
    """
    where = "--aihost/--aihostport" if origin is None else origin
    host = "--aihost" if origin is None else f"the host name in --upstream {origin}"
    reasons = getattr(failure.value, "reasons", None) or [failure]
    for reason in reasons:
        if reason.check(SSL.Error, VerificationError):
            return (
                "TLS verification failed (the certificate is not trusted or does not "
                f"match the host; check --aica and {host})"
            )
    if failure.check(neterror.ConnectionRefusedError):
        return f"connection refused (is the model server running on {where}?)"
    if failure.check(neterror.DNSLookupError):
        return f"the host name does not resolve (check {host})"
    if failure.check(neterror.ConnectError):
        return f"cannot connect ({failure.getErrorMessage()})"
    return "the connection failed before a reply arrived"


class _QuietFactory(_HTTP11ClientFactory):
    """Twisted logs every new pooled connection; at gateway rates that is noise."""

    noisy = False


class ReplicaUnreachable(Exception):
    """
    The request could not be delivered to the model server at all: it refused
    or timed out the connection, or failed the TLS handshake.  Nothing reached
    the model, so the request may be sent to another replica.

    @ivar error: what to tell the client if no other replica can take it.
    """

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class _ResendOnStaleConnection(_RetryingHTTP11ClientProtocol):
    """
    A pooled connection that resends its request once, on a new connection,
    if it turns out to be stale.

    A model server closes idle keep-alive connections on its own timer
    (uvicorn, and so vLLM, after 5 s); a request written just as it does so
    fails before any byte of a reply arrives.  Twisted resends only idempotent
    requests without a body, but the gateway's bodies are bytes in memory and
    nothing of the request was processed, so it is safe to send any of them
    again; nginx does the same for its cached upstream connections.  A failure
    after the first byte of a reply is never resent.
    """

    def _shouldRetry(self, method: bytes, exception: Exception, bodyProducer: Any) -> bool:
        if not isinstance(
            exception, (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
        ):
            return False
        reasons = getattr(exception, "reasons", ())
        if any(reason.check(CancelledError) for reason in reasons):
            return False
        if bodyProducer is not None and not isinstance(bodyProducer, _BytesProducer):
            return False
        log.debug("Resending a request on a new connection: the pooled one was closed")
        return True


class _UpstreamPool(HTTPConnectionPool):
    """Quiet, and resends a request whose pooled connection was stale."""

    _factory = _QuietFactory

    def getConnection(self, key: Any, endpoint: Any) -> Deferred[Any]:
        # HTTPConnectionPool.getConnection, with our resending wrapper.
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts[connection].cancel()
            del self._timeouts[connection]
            if connection.state == "QUIESCENT":
                return succeed(
                    _ResendOnStaleConnection(  # type: ignore[no-untyped-call]
                        connection, lambda: self._newConnection(key, endpoint)
                    )
                )
        return self._newConnection(key, endpoint)


@implementer(IBodyProducer)
class _BytesProducer:
    """A body already in memory, written at once (treq's producer waits a cooperator turn)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgentEndpointFactory)
class _ModelServerEndpoints:
    """
    The model servers' endpoints, with TLS options built once for each.

    Agent's default asks the policy for new TLS options on every request
    (cipher selection, IDNA, a new context), which was a tenth of a worker's
    time under load.  The gateway talks to a few fixed origins, and each
    origin's creator resumes the TLS sessions of that origin alone
    (L{SessionResumingCreator}).
    """

    def __init__(
        self,
        reactor: Any,
        policy: BrowserLikePolicyForHTTPS,
        timeout: float,
        clock: IReactorTime,
    ) -> None:
        """@param clock: tells how old a connection is, for L{SessionResumingCreator}."""
        self.reactor = reactor
        self.clock = clock
        self.policy = policy
        self.timeout = timeout
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(
                self.reactor, uri.host.decode("ascii"), uri.port, timeout=self.timeout
            )
            if uri.scheme == b"https":
                creator = SessionResumingCreator(
                    self.policy.creatorForNetloc(uri.host, uri.port),
                    uri.host.decode("ascii"),
                    self.clock,
                )
                endpoint = wrapClientTLS(creator, endpoint)
            self._endpoints[key] = endpoint
        return endpoint


class UpstreamClient:
    """
    The model server, as seen by one worker process.

    Requests go out through Twisted's Agent over one persistent pool, and
    replies are read with treq.  treq's C{HTTPClient} is not used for sending:
    it keeps one cookie jar for every client of the worker (a C{Set-Cookie}
    from the model server would be replayed for strangers), asks for gzip, and
    parses the URL and builds four wrapper agents per request, which was a
    third of a worker's time.

    @ivar base: origin every path is appended to, e.g. C{b"https://10.0.0.1:443"}.
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        clock: IReactorTime | None = None,
        log_failures: bool = True,
    ) -> None:
        """
        @param reactor: connects to the model server.
        @param clock: runs the deadlines; the reactor unless a test drives time.
        @param log_failures: log each failed request (the health checks log
            only changes of state instead).
        """
        self.log_failures = log_failures
        self.clock = reactor if clock is None else clock
        self.config = config
        self.base = config.origins[0].encode()
        self.pool = _UpstreamPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.pool.maxPersistentPerHost = 256
        # Below the model server's own keep-alive timeout (uvicorn's is 5 s),
        # so that the gateway, not the server, closes idle connections.
        self.pool.cachedConnectionTimeout = config.upstream_idle_timeout  # type: ignore[assignment]
        trust = load_trust_root(config.aica) if config.aica else platformTrust()
        endpoints = _ModelServerEndpoints(
            reactor, BrowserLikePolicyForHTTPS(trustRoot=trust), config.connect_timeout, self.clock
        )
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)

    def send(
        self,
        method: bytes,
        path: bytes,
        body: bytes | None,
        authorization: bytes | None,
        deadline: float,
        origin: bytes | None = None,
        request_id: str | None = None,
    ) -> Deferred[IResponse]:
        """
        Start a request to C{origin} (by default the first model server); its
        Deferred fires with the response once its headers arrive, or fails
        with an L{ApiError}, or with L{ReplicaUnreachable} if the request could
        not be delivered at all.  Cancelling it (the client went away) closes
        the upstream connection, so the model stops generating.

        @param request_id: sent as C{X-Request-Id}, which vLLM takes as its
            own request id.  A request resent because its pooled connection
            was stale (L{_ResendOnStaleConnection}) keeps it: that try never
            reached the model.
        """
        headers = Headers({b"Accept": [b"application/json"]})
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
        if authorization is not None:
            headers.setRawHeaders(b"Authorization", [authorization])
        if request_id is not None:
            headers.setRawHeaders(b"X-Request-Id", [request_id.encode("ascii")])
        producer = None if body is None else _BytesProducer(body)
        url = (self.base if origin is None else origin) + path
        d: Deferred[Any] = self.agent.request(method, url, headers, producer)
        replica = origin.decode() if origin is not None and self.config.upstreams else None
        return _with_deadline(
            self.clock,
            d,
            deadline,
            lambda: errors.upstream_timeout(deadline),
            lambda failure: self._translate(failure, replica),
        )

    def _translate(self, failure: Failure, replica: str | None) -> Failure:
        if failure.check(ApiError, CancelledError):
            return failure
        if any(r.check(CancelledError) for r in getattr(failure.value, "reasons", ())):
            raise CancelledError()  # the client went away and cancelled it
        if failure.check(neterror.TimeoutError):
            raise ReplicaUnreachable(
                errors.upstream_timeout(self.config.connect_timeout, "accept the connection")
            ) from None
        if self.log_failures:
            log.info("Upstream request failed: {why}", why=failure.getErrorMessage())
        began = failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived)
        if began and not _never_delivered(failure):
            raise errors.upstream_bad_reply("the connection broke in the middle of the reply")
        error = errors.upstream_unreachable(_describe(failure, replica))
        if _never_delivered(failure):
            raise ReplicaUnreachable(error)
        raise error

    def read_json(
        self, response: IResponse, deadline: float | None = None
    ) -> Deferred[tuple[int, bytes, Any]]:
        """
        Collect a whole reply and check that it is JSON.

        @param deadline: seconds left of the request's C{--timeout}, which
            bounds the whole reply: the wait for its headers used the rest.
        @return: status, the reply's bytes as they came, and the parsed document.
        """
        seconds = self.config.timeout if deadline is None else max(deadline, 0.0)
        d: Deferred[bytes] = treq.content(response)
        d = _with_deadline(
            self.clock,
            d,
            seconds,
            lambda: errors.upstream_timeout(self.config.timeout),
            _translate_body,
        )

        def check(body: bytes) -> tuple[int, bytes, Any]:
            try:
                return response.code, body, json.loads(body)
            except ValueError:
                raise errors.upstream_bad_reply(
                    f"a {response.code} reply that is not JSON"
                ) from None

        return d.addCallback(check)


def _never_delivered(failure: Failure) -> bool:
    """
    Whether the request cannot have reached the model: the connection was
    refused or never set up, or its TLS handshake failed.
    """
    if failure.check(neterror.ConnectError, RequestNotSent):
        return True
    reasons = getattr(failure.value, "reasons", None) or []
    return any(reason.check(SSL.Error, VerificationError) for reason in reasons)


def _translate_body(failure: Failure) -> Failure:
    if failure.check(ApiError, CancelledError):
        return failure
    raise errors.upstream_bad_reply("the connection broke in the middle of the reply")


def _with_deadline(
    clock: IReactorTime,
    d: Deferred[T],
    seconds: float,
    on_timeout: Callable[[], ApiError],
    translate: Callable[[Failure], Failure],
) -> Deferred[T]:
    """Cancel C{d} after C{seconds}, and report that as C{on_timeout()}."""
    timer = clock.callLater(seconds, d.cancel)

    def settle(result: T | Failure) -> T | Failure:
        if timer.active():
            timer.cancel()
            if isinstance(result, Failure):
                return translate(result)
            return result
        if isinstance(result, Failure):
            raise on_timeout()
        return result

    return d.addBoth(settle)


#: How a stream that ended early ended its attempt at the model server.
_STREAM_OUTCOMES = {
    "client_gone": "cancelled",
    "upstream_broke": "error",
    "idle_timeout": "timeout",
}

#: The longest SSE event kept to be read for its C{usage} when it arrives in pieces.
_LONGEST_USAGE_EVENT = 64 * 1024


class EventStreamRelay(Protocol):
    """
    Relay a C{text/event-stream} body to the client as it arrives.

    The upstream connection is registered as the client's producer, so a slow
    reader pauses the upstream read and memory stays flat however long the
    stream runs.  Silence longer than C{idle_timeout}, or a broken upstream,
    ends the stream with a final C{data: {"error": ...}} event.

    With a C{record}, it notes the time to the first event, the token counts
    of a final chunk that carries C{usage} (C{stream_options.include_usage}),
    and why the stream ended early, if it did (L{abort_cause}).

    @ivar abort_cause: C{client_gone}, C{upstream_broke} or C{idle_timeout},
        or L{None} while the stream runs or once it ended whole.
    """

    transport: Any
    abort_cause: str | None = None

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        idle_timeout: float,
        on_chunk: Callable[[bytes], None] | None = None,
        record: RequestRecord | None = None,
    ) -> None:
        self.request = request
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_chunk = on_chunk
        self.record = record
        self.done: Deferred[None] = Deferred()
        self._idle: IDelayedCall | None = None
        self._error: ApiError | None = None
        self._partial_usage: bytes | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self._idle = self.clock.callLater(self.idle_timeout, self._went_quiet)

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.reset(self.idle_timeout)
        if self.on_chunk is not None:
            self.on_chunk(data)
        self.request.write(data)
        record = self.record
        if record is not None:
            if record.ttft is None:
                record.ttft = self.clock.seconds() - record.started
            if self._partial_usage is not None or b'"usage"' in data:
                self._read_usage(record, data)

    def _read_usage(self, record: RequestRecord, data: bytes) -> None:
        """
        Take the token counts from an event whose C{usage} is an object.

        Only chunks that name C{usage} are looked at (OpenAI names it in
        every chunk, as C{null}), and only the event that holds it is parsed.
        An event cut between two reads is kept until its end arrives.
        """
        if self._partial_usage is not None:
            data = self._partial_usage + data
            self._partial_usage = None
        at = data.rfind(b'"usage"')
        while at != -1:
            value = data[at + 7 : at + 16].lstrip(b": \t")
            if value[:1] == b"{" or (not value and len(data) - at < 16):
                break
            at = data.rfind(b'"usage"', 0, at)
        if at == -1:
            return
        start = data.rfind(b"data:", 0, at)
        end = data.find(b"\n", at)
        if start == -1:
            return
        if end == -1:
            if len(data) - start <= _LONGEST_USAGE_EVENT:
                self._partial_usage = data[start:]
            return
        try:
            event = json.loads(data[start + 5 : end])
        except ValueError:
            return
        if isinstance(event, dict):
            record.take_usage(event.get("usage"))

    def _went_quiet(self) -> None:
        self._idle = None
        self._error = errors.upstream_timeout(self.idle_timeout, "send the next chunk")
        self._aborted("idle_timeout")
        self.transport.stopProducing()

    def stop(self) -> None:
        """The client went away: close the upstream connection."""
        if not self.done.called and self.abort_cause is None:
            self._aborted("client_gone")
        self.transport.stopProducing()

    def _aborted(self, cause: str) -> None:
        """
        Note why the stream ends early, in the record too, at once: a client
        that went away ends its request (and the record is read) before the
        upstream connection has closed.
        """
        self.abort_cause = cause
        record = self.record
        if record is not None:
            record.stream_abort = cause
            if record.attempts:
                record.attempts[-1].outcome = _STREAM_OUTCOMES[cause]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        request = self.request
        if not request._disconnected and not request.finished:
            request.unregisterProducer()
            if self._error is None and not reason.check(ResponseDone, PotentialDataLoss):
                self._error = errors.upstream_bad_reply("the stream broke off")
                self._aborted("upstream_broke")
                if reason.check(ResponseFailed):
                    log.info("Upstream stream broke: {why}", why=reason.getErrorMessage())
            if self._error is not None:
                request.write(self._error.sse_event())
            request.finish()
        self.done.callback(None)
