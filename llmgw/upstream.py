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
    HTTP11ClientProtocol,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    _ensureValidURI,
)
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    _HTTP11ClientFactory,
    _RetryingHTTP11ClientProtocol,
)
from twisted.web.http import PotentialDataLoss, _DataLoss, _MalformedChunkedDataError
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


_SIZE, _BODY, _CRLF, _TRAILER, _DONE = range(5)

#: Twisted's limits: the longest chunk-size line, and the most trailer bytes.
_LONGEST_SIZE_LINE = 1024
_LONGEST_TRAILER = 64 * 1024
_HEX_DIGITS = b"0123456789abcdefABCDEF"
#: What a chunk extension may hold (RFC 9112's tokens, quoted strings, and obs-text).
_EXTENSION_BYTES = bytes([9, *range(32, 127), *range(128, 256)])


class _ChunkedBodyDecoder:
    """
    Decode a C{chunked} reply body, and hand the response everything one read
    brought as one piece.

    Twisted's decoder hands over each chunk apart, and looks each of its steps
    up by name, three per chunk.  A model server sends an event per chunk and
    several events often share a read, so the relay wrote several pieces to
    its client for one read, and the decoder's bookkeeping cost more than the
    relay.  This decoder walks a read once, slicing out the bodies, and is as
    strict as Twisted's: the same limits, the same malformed framing refused
    (L{_MalformedChunkedDataError}, which fails the reply) after the bytes
    before it were delivered, and L{_DataLoss} if the body ends early.

    A read that ends inside a chunk still delivers what it holds: nothing is
    held back waiting for the rest.  Only an unfinished size line, the CR LF
    after a chunk or a trailer line is kept (L{_pending}) until more comes.

    A read that is one whole chunk, as a model server sends each event, takes
    a shorter path.  And once the response has a protocol for its body, the
    pieces go straight to it: C{Response} would otherwise look its own state
    up by name for every piece, only to pass it on to the same protocol.

    It lives as long as a stream, so it has slots rather than a dictionary.
    """

    __slots__ = (
        "_deliver",
        "_finish",
        "_left",
        "_pending",
        "_response",
        "_state",
        "_trailer_bytes",
    )

    def __init__(
        self, dataCallback: Callable[[bytes], None], finishCallback: Callable[[bytes], None]
    ) -> None:
        """
        @param dataCallback: takes each read's body bytes (never empty):
            C{Response._bodyDataReceived}, from C{HTTPClientParser}.
        @param finishCallback: takes the bytes after the body, once it ended.
        """
        self._deliver = dataCallback
        self._response: Any = getattr(dataCallback, "__self__", None)
        self._finish = finishCallback
        self._state = _SIZE
        self._left = 0
        self._pending = b""
        self._trailer_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        response = self._response
        if response is not None and getattr(response, "_state", None) == "CONNECTED":
            # Its body protocol is set for good: Response raises if asked for another.
            self._deliver = response._bodyProtocol.dataReceived
            self._response = None
        if self._pending:
            data = self._pending + data
            self._pending = b""
        elif self._state == _SIZE:
            eol = data.find(b"\r\n", 0, _LONGEST_SIZE_LINE + 1)
            size = data[:eol]
            if eol > 0 and not size.translate(None, _HEX_DIGITS):
                start = eol + 2
                stop = start + int(size, 16)
                if stop + 2 == len(data) and stop > start and data.endswith(b"\r\n"):
                    self._deliver(data[start:stop])
                    return
        pieces: list[bytes] = []
        try:
            rest = self._decode(data, pieces)
        finally:
            if pieces:
                self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if rest is not None:
            self._finish(rest)

    def _decode(self, data: bytes, pieces: list[bytes]) -> bytes | None:
        """
        Add the body bytes of C{data} to C{pieces}.

        @return: the bytes after the body if it ended in C{data}, else L{None}.
        """
        at, end = 0, len(data)
        while at < end:
            state = self._state
            if state == _BODY:
                stop = at + self._left
                if stop > end:
                    pieces.append(data[at:])
                    self._left = stop - end
                    return None
                pieces.append(data[at:stop])
                at = stop
                self._state = _CRLF
            elif state == _CRLF:
                if data.startswith(b"\r\n", at):
                    at += 2
                    self._state = _SIZE
                elif data[at:] == b"\r":
                    self._pending = b"\r"
                    return None
                else:
                    raise _MalformedChunkedDataError("Chunk did not end with CRLF")
            elif state == _SIZE:
                eol = data.find(b"\r\n", at, at + _LONGEST_SIZE_LINE + 1)
                if eol == -1:
                    if end - at > _LONGEST_SIZE_LINE:
                        raise _MalformedChunkedDataError("Chunk size line is too long.")
                    self._pending = data[at:]
                    return None
                size = _chunk_size(data[at:eol])
                at = eol + 2
                stop = at + size
                if size and data.startswith(b"\r\n", stop):
                    # The common case, a whole chunk: its body and CR LF at once.
                    pieces.append(data[at:stop])
                    at = stop + 2
                else:
                    self._left = size
                    self._state = _BODY if size else _TRAILER
            elif state == _TRAILER:
                eol = data.find(b"\r\n", at)
                if eol == at:
                    self._state = _DONE
                    return data[at + 2 :]
                self._trailer_bytes += (end if eol == -1 else eol + 2) - at
                if self._trailer_bytes > _LONGEST_TRAILER:
                    raise _MalformedChunkedDataError("Trailer headers data is too long.")
                if eol == -1:
                    # Only whether the line is empty so far, and its last byte
                    # (a CR that the next read's LF may end it with), matter.
                    tail = data[at:]
                    self._pending = tail if len(tail) < 2 else b"-" + tail[-1:]
                    self._trailer_bytes -= len(self._pending)
                    return None
                at = eol + 2
            else:
                raise RuntimeError("Chunked body data received after its last chunk")
        return None

    def noMoreData(self) -> None:
        """The connection closed: the body must have ended before it did."""
        if self._state != _DONE:
            raise _DataLoss("The chunked body ended before its last chunk.")


def _chunk_size(line: bytes) -> int:
    """The size a chunk-size line gives, checked as strictly as Twisted does."""
    if line and not line.translate(None, _HEX_DIGITS):
        return int(line, 16)
    size, _, extensions = line.partition(b";")
    if not size or size.translate(None, _HEX_DIGITS):
        raise _MalformedChunkedDataError("Chunk-size must be an integer.")
    if extensions.translate(None, _EXTENSION_BYTES):
        raise _MalformedChunkedDataError("Invalid characters in chunk extensions.")
    return int(size, 16)


class _UpstreamProtocol(HTTP11ClientProtocol):
    """A pooled connection whose replies' chunked bodies L{_ChunkedBodyDecoder} reads."""

    def request(self, request: Any) -> Deferred[IResponse]:
        d: Deferred[IResponse] = super().request(request)
        parser = self._parser
        if parser is not None:
            # HTTPClientParser picks its body decoder from this table once the
            # reply's headers are in.
            parser._transferDecoders = _TRANSFER_DECODERS  # type: ignore[assignment]
        return d


_TRANSFER_DECODERS = {b"chunked": _ChunkedBodyDecoder}


class _QuietFactory(_HTTP11ClientFactory):
    """
    Twisted logs every new pooled connection; at gateway rates that is noise.
    Its connections decode chunked bodies a read at a time (L{_UpstreamProtocol}).
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _UpstreamProtocol(self._quiescentCallback)  # type: ignore[no-untyped-call]


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
    """
    A body already in memory, written at once (treq's producer waits a cooperator turn).

    Twisted's client keeps the request, and so its producer, until the reply
    has been read to its end, which for a stream is its whole life; but once
    the reply's headers are in, the request can no longer be resent
    (L{_ResendOnStaleConnection}), so L{replied} lets the body go then.
    """

    __slots__ = ("body", "length")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def replied(self, response: T) -> T:
        """The reply's headers arrived: the body will not be written again."""
        self.body = b""
        return response

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


#: What L{Agent.request} works out from a URL before it sends anything: the
#: pool's key, the endpoint, the parsed URL and the path of the request line.
_Target = tuple[tuple[bytes, bytes, int], Any, URI, bytes]


class _ParsedOnceAgent(Agent):
    """
    An Agent that works out each URL it is given once, not on every request.

    L{Agent.request} checks and parses its URL each time (C{URI.fromBytes},
    through a deprecation proxy on C{twisted.web.http}, then C{originForm}),
    a twentieth of a worker's time under load.  The gateway sends to a few
    origins and fixed paths, so the few results are kept.  A URL that Agent
    refuses is not kept: Agent refuses it again, as before.
    """

    _targets: dict[bytes, _Target]

    #: More distinct URLs than a configuration can make; past it, no more are kept.
    MAX_TARGETS = 256

    def _init(self, reactor: Any, endpointFactory: Any, pool: Any) -> None:
        # Both of Agent's constructors (__init__ and usingEndpointFactory) end here.
        super()._init(reactor, endpointFactory, pool)  # type: ignore[no-untyped-call]
        self._targets = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        target = self._targets.get(uri)
        if target is None:
            try:
                target = self._target(uri)
            except Exception:
                # Agent says why, as it would have without the cache.
                return super().request(method, uri, headers, bodyProducer)
        key, endpoint, parsed, path = target
        return self._requestWithEndpoint(key, endpoint, method, parsed, headers, bodyProducer, path)

    def _target(self, uri: bytes) -> _Target:
        """What L{Agent.request} works out from C{uri}, kept for the next request."""
        parsed = URI.fromBytes(_ensureValidURI(uri.strip()))
        endpoint = self._getEndpoint(parsed)  # type: ignore[no-untyped-call]
        target = ((parsed.scheme, parsed.host, parsed.port), endpoint, parsed, parsed.originForm)
        if len(self._targets) < self.MAX_TARGETS:
            self._targets[uri] = target
        return target


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
        self.agent: _ParsedOnceAgent = _ParsedOnceAgent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            reactor, endpoints, pool=self.pool
        )

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
        if producer is not None:
            d.addCallback(producer.replied)
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

#: The longest SSE line kept to be read for its C{usage} when it arrives in pieces.
_LONGEST_USAGE_EVENT = 64 * 1024
_LINE_ENDS = (b"\n", b"\r")


class EventStreamRelay(Protocol):
    """
    Relay a C{text/event-stream} body to the client as it arrives.

    Each read from the model server is written to the client at once, as it
    came: events are never held back for more to arrive.  The upstream
    connection is registered as the client's producer, so a slow reader
    pauses the upstream read and memory stays flat however long the stream
    runs.  Silence longer than C{idle_timeout}, or a broken upstream, ends
    the stream with a final C{data: {"error": ...}} event.

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
        self._unfinished_line: bytes | None = None
        self._write_chunk: Callable[[bytes], None] | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self._idle = self.clock.callLater(self.idle_timeout, self._went_quiet)

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.reset(self.idle_timeout)
        if self.on_chunk is not None:
            self.on_chunk(data)
        request = self.request
        write_chunk = self._write_chunk
        if write_chunk is not None and data and not request._disconnected and not request.finished:
            request.sentLength += len(data)
            write_chunk(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)
        record = self.record
        if record is not None:
            if record.ttft is None:
                record.ttft = self.clock.seconds() - record.started
            if (
                self._unfinished_line is not None
                or b'"usage"' in data
                or not data.endswith(_LINE_ENDS)
            ):
                self._scan(record, data)

    def _write(self, data: bytes) -> None:
        """
        Write through the request, which sends the headers the first time;
        then, on a chunked response, write the chunks straight to the
        client's connection.

        C{Request.write} checks the request's state, the method and the
        status for every piece, and hands four pieces to the transport, which
        checks each: a tenth of the gateway's work per event.  Once the
        headers are out, none of that can change until the stream ends, so
        the relay frames each read as one chunk itself, exactly as
        C{Request.write} would, and counts its bytes as it would.
        """
        request = self.request
        request.write(data)
        if (
            request.startedWriting
            and request.chunked
            and not request._disconnected
            and getattr(request, "_encoder", None) is None
            and request.channel.transport is not None
        ):
            self._write_chunk = request.channel.transport.write

    def _scan(self, record: RequestRecord, data: bytes) -> None:
        """
        Look for the token counts in a read, and keep a line that it cut
        short for the next read.

        The usage is read from the one line that names C{usage} as an object
        (OpenAI names it in every chunk, as C{null}, until the last), so the
        scan is a search for the word in each read; only a line that a read
        cut off, rare for a model server that writes whole events, is kept
        and joined to the next read, so that the word and its event are found
        however the event is cut.
        """
        unfinished = self._unfinished_line
        if unfinished is not None:
            self._unfinished_line = None
            data = unfinished + data
        if b'"usage"' in data:
            self._read_usage(record, data)
        if data and not data.endswith(_LINE_ENDS):
            start = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
            if len(data) - start <= _LONGEST_USAGE_EVENT:
                self._unfinished_line = data[start:]

    def _read_usage(self, record: RequestRecord, data: bytes) -> None:
        """
        Take the token counts from the last whole line whose C{usage} is an
        object; the parse is of that line alone.
        """
        at = len(data)
        while True:
            at = data.rfind(b'"usage"', 0, at)
            if at == -1:
                return
            if data[at + 7 : at + 16].lstrip(b": \t")[:1] != b"{":
                continue
            start = data.rfind(b"data:", 0, at)
            end = data.find(b"\n", at)
            cr = data.find(b"\r", at, None if end == -1 else end)
            if cr != -1:
                end = cr
            if start == -1 or end == -1:
                continue  # a line cut short: it is read again once it is whole
            try:
                event = json.loads(data[start + 5 : end])
            except ValueError:
                return
            if isinstance(event, dict):
                record.take_usage(event.get("usage"))
            return

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
