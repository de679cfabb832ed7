"""The HTTP layer: a twisted.web Site whose requests are bounded and always hardened.

Twisted's own request handling reads any body into memory or a temporary file
and lets a client take as long as it likes to send it.  A gateway in front of a
model server cannot afford either, so this module adds three things at the
connection level, before any resource runs:

 - a body over C{--max-body} is refused from its Content-Length before it is
   read, and a chunked body is cut off as soon as it passes the cap;
 - a request (head and body) must arrive within C{--read-timeout}, counted
   from the moment the connection opens (or, on a keep-alive connection, from
   the next request's first byte), so neither a client trickling a byte a
   second nor one that sends nothing at all can hold a connection;
 - every response, including the ones written here without a resource, carries
   the hardening headers, the OpenAI error shape, the standard reason phrase
   and an access line.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from io import BytesIO
from typing import Any, cast
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http import datetimeToString
from twisted.web.resource import IResource

from llmgw import errors
from llmgw.clients import ClientAddressPolicy
from llmgw.errors import ApiError, body_too_large, invalid
from llmgw.headers import HARDENING_HEADERS, secure
from llmgw.record import RequestIds, RequestRecord, route_label

log = Logger()

#: Seconds to keep reading (and discarding) a refused request's body after the
#: error response went out, so the client sees the response instead of a reset.
LINGER_SECONDS = 2.0

#: Seconds a keep-alive connection may sit idle between requests.
IDLE_SECONDS = 60

#: The reason phrase of every status the gateway sends itself, as RFC 9110
#: names them.  Twisted's table has no 429 (neither 22.4 nor 26 has) and keeps
#: RFC 2068's C{Request Time-out}; Python's names 413 differently from one
#: version to the next.
REASONS: dict[int, bytes] = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

#: Why a request the channel answered itself was refused, by the status it got.
_REFUSALS = {413: "too_large", 408: "read_timeout", 400: "validation"}

#: The most of a C{User-Agent} a record keeps.
_USER_AGENT_CHARS = 256


def reason_phrase(status: int) -> bytes:
    """
    The reason phrase for C{status}: the gateway's own, else Python's, else Twisted's.

    Python's table covers what a model server may answer and the gateway
    relays (a 422, a 429 of its own), which Twisted would call C{Unknown Status}.
    """
    reason = REASONS.get(status)
    if reason is not None:
        return reason
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return http.RESPONSES.get(status, b"Unknown Status")


def raw_response(error: ApiError, request_id: str | None = None) -> bytes:
    """
    A complete HTTP/1.1 response for an error found before any resource ran.

    Used where Twisted's request machinery is bypassed (an oversized body, a
    missed read deadline, a malformed head), so the framing is written here;
    the body and headers still come from L{ApiError} and L{HARDENING_HEADERS}.
    """
    body = error.body()
    lines = [
        b"HTTP/1.1 %d %s" % (error.status, reason_phrase(error.status)),
        b"Content-Type: application/json",
        b"Content-Length: %d" % (len(body),),
        b"Connection: close",
    ]
    lines += [name + b": " + value for name, value in HARDENING_HEADERS + error.headers]
    if request_id is not None:
        lines.append(b"X-Request-Id: " + request_id.encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def render_error(request: server.Request, error: ApiError) -> None:
    """Finish C{request} with C{error} in OpenAI's shape."""
    if request.finished or request._disconnected:
        return
    body = error.body()
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    for name, value in error.headers:
        request.setHeader(name, value)
    request.write(body)
    request.finish()


class GatewayRequest(server.Request):
    """
    A request whose body is bounded and whose responses are always hardened.

    @ivar record: what happened to it, from the moment its headers were read
        (or it was refused) until it ends, when the site hands it on.
    """

    _received = 0
    record: RequestRecord | None = None

    #: What the access line shows for a request refused before its request
    #: line could be read (Twisted would show C{(no method yet)}).
    method = b"-"
    uri = b"-"

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        """The standard reason phrase, where Twisted's table has none (429) or an old one."""
        super().setResponseCode(code, reason_phrase(code) if message is None else message)

    def process(self) -> None:
        """
        Twisted's C{server.Request.process}, less two headers' work.

        Twisted formats C{Date} anew for every request (a fortieth of a
        worker's time under load), though it changes once a second, and sets
        C{Server}, which L{secure} removes again before the response goes
        out.  Here the site formats the date once a second, and the banner is
        never set; the rest is Twisted's (22.4 and 26 alike).
        """
        site = cast(GatewayChannel, self.channel).site
        self.site = site
        self.responseHeaders.setRawHeaders(b"Date", [site.http_date()])
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handleStar()  # type: ignore[no-untyped-call]
            return
        try:
            target = site.getResourceFor(self)  # type: ignore[no-untyped-call]
            if resource._IEncodingResource.providedBy(target):
                encoder = target.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(target)  # type: ignore[no-untyped-call]
        except BaseException:
            self.processingFailed(Failure())

    def gotLength(self, length: int | None) -> None:
        # Bodies are capped by --max-body, so memory is the right place for
        # them; Twisted would otherwise spill anything over 100 KB to disk.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        channel = cast(GatewayChannel, self.channel)
        if self._received > channel.site.max_body:
            channel.refuse(body_too_large(channel.site.max_body))
            return
        cast(BytesIO, self.content).write(data)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            secure(self.responseHeaders)
        super().write(data)  # type: ignore[no-untyped-call]

    def processingFailed(self, reason: Failure) -> None:
        """A bug, not bad input: log the traceback, never send it."""
        log.failure("Unhandled error serving {path}", reason, path=self.path)
        render_error(self, errors.internal())

    def connectionLost(self, reason: Failure) -> None:
        """
        The client went away before its response was finished: Twisted logs
        nothing then, but the request still ends here, and its record with it.
        A client that got nothing at all is recorded with nginx's 499.
        """
        channel = cast(GatewayChannel, self.channel)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        record = self.record
        if record is not None and record.finished is None:
            if not self.startedWriting:
                self.code = 499
            channel.site.finish_record(self, record)


class GatewayChannel(http.HTTPChannel):
    """An HTTP channel that enforces the body cap and the read deadline."""

    site: GatewaySite
    _refused = False
    _nothing_received = True
    _read_deadline: IDelayedCall | None = None
    _request_began: float | None = None
    _linger: IDelayedCall | None = None
    _peer: Any = None
    _host: Any = None
    _peer_host_text: str | None = None

    def getPeer(self) -> Any:
        """
        The client's address, asked of the transport once per connection.

        Twisted asks for it (and for L{getHost}) for every request, which
        builds an address object each time, and for the host a system call.
        """
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()  # type: ignore[no-untyped-call]
        return peer

    def getHost(self) -> Any:
        """The local address, asked of the transport once per connection (see L{getPeer})."""
        host = self._host
        if host is None:
            host = self._host = super().getHost()  # type: ignore[no-untyped-call]
        return host

    def connectionMade(self) -> None:
        """The first request's deadline runs from here, not from its first byte."""
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._start_read_deadline()
        if self.site._drained is not None:
            self.drain()  # accepted as the drain began: close it, it is idle

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        self._nothing_received = False
        if self._read_deadline is None and not self._handlingRequest:
            self._start_read_deadline()
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _start_read_deadline(self) -> None:
        self._request_began = self.site.clock.seconds()
        self._read_deadline = self.callLater(  # type: ignore[no-untyped-call]
            self.site.read_timeout, self._read_timed_out
        )

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        pending = len(self.requests)
        super().lineReceived(line)  # type: ignore[no-untyped-call]
        if len(self.requests) > pending and not self._refused:
            # The request line was just read.  Twisted gives it to the request
            # only once the body is in; a request refused before then (413,
            # 408) is logged with it all the same.
            request = self.requests[-1]
            request.method, request.uri = self._command, self._path

    def allHeadersReceived(self) -> None:
        self.site.open_record(self.requests[-1], self._peer_host(), self._request_began)
        if self.length is not None and self.length > self.site.max_body:
            self.refuse(body_too_large(self.site.max_body))
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def allContentReceived(self) -> None:
        self._cancel_read_deadline()
        self._request_began = None
        if not self._refused:
            super().allContentReceived()  # type: ignore[no-untyped-call]

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            if self._read_deadline.active():
                self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self._nothing_received:
            # Nothing was asked, so nothing is answered: like nginx, close
            # without a response (a 408 nobody asked for would be read by a
            # client pool as the answer to its next request).
            log.info(
                "Closing {peer}: nothing received within {seconds}s",
                peer=self._transport.getPeer(),
                seconds=self.site.read_timeout,
            )
            self._transport.loseConnection()
            return
        log.info(
            "Closing {peer}: request not received within {seconds}s",
            peer=self._transport.getPeer(),
            seconds=self.site.read_timeout,
        )
        self.refuse(errors.request_timeout(self.site.read_timeout))

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's reply to a malformed or oversized head, in our shape."""
        self.refuse(
            invalid(
                "The request line or headers are malformed, or larger than 16 KiB.",
                code="bad_request",
            )
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        """One header line over 16 KiB: the same shaped 400, not a silent close."""
        self._respondToBadRequestAndDisconnect()

    def refuse(self, error: ApiError) -> None:
        """
        Answer with C{error} and close, without reading the rest of the request.

        The write side is closed at once; the read side keeps draining (and
        discarding) for L{LINGER_SECONDS}, because closing a socket with unread
        data makes the kernel send a reset that can destroy the response.
        The Site's access log gets the request all the same.
        """
        if self._refused:
            return
        self._refused = True
        self._cancel_read_deadline()
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        transport = self._transport
        request = cast(
            GatewayRequest, self.requests[-1] if self.requests else self.requestFactory(self)
        )
        record = request.record
        if record is None:
            record = self.site.open_record(request, self._peer_host(), self._request_began)
        record.rejected = _REFUSALS.get(error.status)
        transport.write(raw_response(error, record.request_id))
        self._log_refused(request, error)
        loseWrite = getattr(transport, "loseWriteConnection", None)
        if loseWrite is None:
            transport.loseConnection()
            return
        loseWrite()
        self._linger = self.callLater(  # type: ignore[no-untyped-call]
            LINGER_SECONDS, transport.abortConnection
        )

    def _log_refused(self, request: GatewayRequest, error: ApiError) -> None:
        """
        Give the request that L{refuse} answered its access line.

        It is the request being read, if its first line arrived (Twisted makes
        the request object there), or else a blank one for the connection.
        """
        request.setResponseCode(error.status)
        request.sentLength = len(error.body())
        if getattr(request, "started", None) is None:
            request.started = self._request_began  # type: ignore[attr-defined]
        self.site.log(request)

    def _peer_host(self) -> str:
        text = self._peer_host_text
        if text is None:
            address = self.getPeer()
            text = self._peer_host_text = str(getattr(address, "host", address))
        return text

    @property
    def _transport(self) -> Any:
        """The TCP transport: connected whenever a channel method runs."""
        assert self.transport is not None
        return self.transport

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_read_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        self.site.connection_closed(self)

    def drain(self) -> None:
        """Close now if idle; otherwise close once the request in hand is answered."""
        if self.requests or self._handlingRequest:
            self.persistent = False
        else:
            self._transport.loseConnection()


class GatewaySite(server.Site):
    """
    The gateway's Site: bounded requests, idle keep-alives closed, access log.

    @ivar max_body: largest request body, in bytes.
    @ivar read_timeout: seconds a client has to deliver a whole request.
    @ivar clients: who a client is, and which peers are trusted proxies
        (whose C{X-Request-Id} is kept).
    @ivar record_observers: called with each request's L{RequestRecord} once
        it has ended (the metrics, the JSON access log).  They run on the hot
        path: they must be quick and must not raise.
    """

    requestFactory = GatewayRequest
    protocol = GatewayChannel  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        resource: IResource,
        clock: IReactorTime,
        *,
        max_body: int,
        read_timeout: float,
        access_log: Any = None,
        clients: ClientAddressPolicy | None = None,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            resource, timeout=IDLE_SECONDS, reactor=clock
        )
        # Twisted 23+ parses every POST's Content-Type with the email package
        # to find HTML form submissions, a tenth of a worker's time; the API
        # takes JSON only.  (Ignored by older Twisted, which has no such step.)
        self._parsePOSTFormSubmission = False
        self.clock = clock
        self.max_body = max_body
        self.read_timeout = read_timeout
        self._access_log = access_log
        self.clients = ClientAddressPolicy() if clients is None else clients
        self.request_ids = RequestIds()
        self.record_observers: list[Callable[[RequestRecord], None]] = []
        self.channels: set[GatewayChannel] = set()
        self._drained: Deferred[None] | None = None
        self._drain_deadline: IDelayedCall | None = None
        self._date_second: int | None = None
        self._date = b""

    def http_date(self) -> bytes:
        """Now, as a C{Date} header gives it: formatted once a second, not per request."""
        second = int(self.clock.seconds())
        if second != self._date_second:
            self._date = datetimeToString(second)
            self._date_second = second
        return self._date

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        self.channels.add(channel)
        return channel

    def connection_closed(self, channel: GatewayChannel) -> None:
        self.channels.discard(channel)
        if self._drained is not None and not self.channels:
            drained, self._drained = self._drained, None
            if self._drain_deadline is not None and self._drain_deadline.active():
                self._drain_deadline.cancel()
            drained.callback(None)

    def drain(self, grace: float) -> Deferred[None]:
        """
        Let the requests in hand finish, for up to C{grace} seconds, then abort.

        The caller stops listening first.  Idle keep-alive connections close at
        once and busy ones as soon as their response is sent, so a graceful
        stop fails no request that was already accepted.
        """
        if not self.channels:
            return succeed(None)
        self._drained = Deferred()
        drained = self._drained
        self._drain_deadline = self.clock.callLater(grace, self._abort_all)
        for channel in list(self.channels):
            channel.drain()
        return drained

    def _abort_all(self) -> None:
        log.warn("Grace period over: aborting {count} connections", count=len(self.channels))
        for channel in list(self.channels):
            channel._transport.abortConnection()

    def open_record(
        self, request: GatewayRequest, peer_host: str, began: float | None
    ) -> RequestRecord:
        """
        Start the record of C{request}, whose headers are in (or as many of
        them as arrived before it was refused), and give its response the id.
        """
        headers = request.requestHeaders
        incoming = headers.getRawHeaders(b"x-request-id")
        if incoming is None:
            request_id = self.request_ids.new()
        else:
            request_id = self.request_ids.choose(incoming[-1], self.clients.trusts_peer(peer_host))
        agent = headers.getRawHeaders(b"user-agent")
        record = RequestRecord(
            request_id=request_id,
            started=self.clock.seconds() if began is None else began,
            client=self.clients.client_key(peer_host, headers),
            method=request.method.decode("ascii", "replace"),
            route=route_label(request.uri.split(b"?", 1)[0]),
            user_agent=None if agent is None else agent[-1][:_USER_AGENT_CHARS].decode("latin-1"),
        )
        request.record = record
        request.responseHeaders.setRawHeaders(b"X-Request-Id", [request_id.encode("ascii")])
        return record

    def finish_record(self, request: http.Request, record: RequestRecord) -> None:
        """The request has ended: complete its record and hand it to every observer."""
        record.status = request.code
        record.bytes_out = request.sentLength
        record.finished = self.clock.seconds()
        for observer in self.record_observers:
            observer(record)

    def log(self, request: http.Request) -> None:
        record: RequestRecord | None = getattr(request, "record", None)
        if record is not None and record.finished is None:
            self.finish_record(request, record)
        if self._access_log is not None:
            self._access_log(request)
