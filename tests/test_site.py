"""Tests for L{llmgw.site}: body caps, read deadlines and shaped errors at the connection level."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from llmgw.api import GatewayResource
from llmgw.clients import ClientAddressPolicy
from llmgw.errors import ApiError, body_too_large, request_timeout
from llmgw.headers import HARDENING_HEADERS
from llmgw.logs import RequestLog
from llmgw.record import RequestIds, RequestRecord
from llmgw.site import (
    IDLE_SECONDS,
    LINGER_SECONDS,
    GatewayChannel,
    GatewayRequest,
    GatewaySite,
    raw_response,
    render_error,
)
from llmgw.upstream import UpstreamClient
from tests.loopback import eventually, free_port, gateway_config, inline, port_of, reactor

#: Every status the gateway sends, with its reason phrase as RFC 9110 names it.
STANDARD_REASONS = {
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


@implementer(ILogObserver)
class EventList(list[LogEvent]):
    """An observer that keeps every event it sees."""

    def __call__(self, event: LogEvent) -> None:
        self.append(event)


class Echo(Resource):
    """Answers with the length of the body it got, so tests see what was read."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        self.bodies.append(body)
        return b"%d" % (len(body),)


class HalfCloseTransport(StringTransport):
    """A StringTransport that records a half-close, as a TCP transport allows."""

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class Connection:
    def __init__(
        self,
        max_body: int = 100,
        read_timeout: float = 30,
        resource: Resource | None = None,
        access_log: Any = None,
        clock: MemoryReactorClock | None = None,
    ) -> None:
        self.clock = MemoryReactorClock() if clock is None else clock
        self.resource: Any = Echo() if resource is None else resource
        self.site = GatewaySite(
            self.resource,
            self.clock,
            max_body=max_body,
            read_timeout=read_timeout,
            access_log=access_log,
        )
        self.site.request_ids = RequestIds("id")
        self.records: list[RequestRecord] = []
        self.site.record_observers.append(self.records.append)
        peer = IPv4Address("TCP", "127.0.0.1", 5000)
        self.channel: Any = self.site.buildProtocol(peer)
        assert isinstance(self.channel, GatewayChannel)
        self.transport = HalfCloseTransport(peerAddress=peer)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        raw = self.transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        return status, headers, body


def post(length: int, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n" % (length, extra)
    )


class BodyLimitTests(SynchronousTestCase):
    def test_refused_from_content_length_before_reading(self) -> None:
        """A declared length over the cap gets a 413 before a byte of body is sent."""
        c = Connection(max_body=100)
        c.send(post(101))
        status, headers, body = c.response()
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        self.assertEqual(headers[b"connection"], b"close")
        for name, value in HARDENING_HEADERS:
            self.assertEqual(headers[name.lower()], value)
        self.assertEqual(c.resource.bodies, [])
        self.assertTrue(c.transport.writeClosed)

    def test_one_connection_close(self) -> None:
        """The 413's head, byte for byte: one C{Connection: close}, the standard reason."""
        c = Connection(max_body=100)
        c.send(post(101))
        head, _, body = c.transport.value().partition(b"\r\n\r\n")
        self.assertEqual(body, body_too_large(100).body())
        expected = [
            b"HTTP/1.1 413 Content Too Large",
            b"Content-Type: application/json",
            b"Content-Length: %d" % (len(body_too_large(100).body()),),
            b"Connection: close",
        ] + [name + b": " + value for name, value in HARDENING_HEADERS]
        expected.append(b"X-Request-Id: id00000001")
        self.assertEqual(head, b"\r\n".join(expected))
        self.assertEqual(head.lower().count(b"\r\nconnection:"), 1)

    def test_expect_continue_not_sent_when_refused(self) -> None:
        c = Connection(max_body=100)
        c.send(post(5000, b"Expect: 100-continue\r\n"))
        self.assertNotIn(b"100 Continue", c.transport.value())
        self.assertEqual(c.response()[0], 413)

    def test_at_the_limit_is_read(self) -> None:
        c = Connection(max_body=100)
        c.send(post(100) + b"x" * 100)
        status, _, body = c.response()
        self.assertEqual((status, body), (200, b"100"))

    def test_chunked_body_cut_off_past_the_cap(self) -> None:
        c = Connection(max_body=100)
        c.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n"
        )
        self.assertEqual(c.transport.value(), b"")
        c.send(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertEqual(c.response()[0], 413)
        # Whatever else the client sends is discarded, never processed.
        c.send(b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n")
        self.assertEqual(c.resource.bodies, [])

    def test_linger_ends_in_abort(self) -> None:
        c = Connection(max_body=10)
        c.send(post(11))
        self.assertFalse(c.transport.disconnected)
        c.clock.advance(LINGER_SECONDS)
        self.assertTrue(c.transport.disconnected)


class ReadDeadlineTests(SynchronousTestCase):
    def test_trickling_client_cut_off(self) -> None:
        """One byte a second does not keep a request alive past --read-timeout."""
        c = Connection(read_timeout=30)
        request = post(10) + b"x" * 10
        for byte in request[:29]:
            c.send(bytes([byte]))
            c.clock.advance(1)
        self.assertEqual(c.transport.value(), b"")
        c.clock.advance(1)
        status, _, body = c.response()
        self.assertEqual(status, 408)
        self.assertEqual(json.loads(body)["error"]["code"], "request_timeout")
        self.assertEqual(c.resource.bodies, [])

    def test_deadline_cleared_once_request_arrives(self) -> None:
        c = Connection(read_timeout=30)
        c.send(post(2) + b"{}")
        self.assertEqual(c.response()[0], 200)
        c.clock.advance(45)
        self.assertFalse(c.transport.disconnecting)

    def test_idle_keep_alive_closed_after_60s(self) -> None:
        c = Connection(read_timeout=30)
        c.send(post(2) + b"{}")
        c.clock.advance(59)
        self.assertFalse(c.transport.disconnecting)
        c.clock.advance(2)
        self.assertTrue(c.transport.disconnecting)

    def test_silent_connection_closed_at_read_timeout(self) -> None:
        """A client that sends nothing is closed at --read-timeout, without a word."""
        c = Connection(read_timeout=2)
        c.clock.advance(1.9)
        self.assertFalse(c.transport.disconnecting)
        c.clock.advance(0.1)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.transport.value(), b"")

    def test_deadline_counts_from_connection_open(self) -> None:
        """A head begun late in the deadline does not earn a fresh one."""
        c = Connection(read_timeout=2)
        c.clock.advance(1.5)
        c.send(post(2))
        c.clock.advance(0.5)
        self.assertEqual(c.response()[0], 408)
        self.assertEqual(c.resource.bodies, [])

    def test_keep_alive_idle_limit_between_requests(self) -> None:
        """After a request is answered, the idle limit governs, not --read-timeout."""
        c = Connection(read_timeout=2)
        c.send(post(2) + b"{}")
        self.assertEqual(c.response()[0], 200)
        c.clock.advance(IDLE_SECONDS - 1)
        self.assertFalse(c.transport.disconnecting)
        c.clock.advance(1)
        self.assertTrue(c.transport.disconnecting)

    def test_second_request_gets_its_own_deadline(self) -> None:
        c = Connection(read_timeout=30)
        c.send(post(2) + b"{}")
        c.clock.advance(50)
        c.transport.clear()
        c.send(post(2))
        c.clock.advance(29)
        self.assertEqual(c.transport.value(), b"")
        c.clock.advance(1)
        self.assertEqual(c.response()[0], 408)


class RefusedAccessLineTests(SynchronousTestCase):
    """Requests answered by the channel itself get the same access line as the rest."""

    def setUp(self) -> None:
        self.events = EventList()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def connect(self, **kwargs: Any) -> Connection:
        clock = MemoryReactorClock()
        clock.advance(1000)
        access_log = RequestLog(clock, verbose=False, colour=False).access
        return Connection(clock=clock, access_log=access_log, **kwargs)

    def access_lines(self) -> list[str]:
        return [
            formatEvent(event)
            for event in self.events
            if event.get("log_namespace") == "llmgw.access"
        ]

    def test_413(self) -> None:
        c = self.connect(max_body=100)
        c.send(post(101))
        size = len(body_too_large(100).body())
        self.assertEqual(
            self.access_lines(),
            [f"127.0.0.1 POST /v1/chat/completions 413 {size} 0.0ms id00000001"],
        )

    def test_413_chunked(self) -> None:
        c = self.connect(max_body=100)
        c.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"80\r\n" + b"x" * 128 + b"\r\n"
        )
        size = len(body_too_large(100).body())
        self.assertEqual(
            self.access_lines(),
            [f"127.0.0.1 POST /v1/chat/completions 413 {size} 0.0ms id00000001"],
        )

    def test_408_counts_from_the_connection(self) -> None:
        c = self.connect(read_timeout=30)
        c.clock.advance(10)
        c.send(post(10))
        c.clock.advance(20)
        self.assertEqual(c.response()[0], 408)
        size = len(request_timeout(30).body())
        self.assertEqual(
            self.access_lines(),
            [f"127.0.0.1 POST /v1/chat/completions 408 {size} 30000.0ms id00000001"],
        )

    def test_408_before_the_request_line(self) -> None:
        c = self.connect(read_timeout=30)
        c.send(b"POS")
        c.clock.advance(30)
        self.assertEqual(c.response()[0], 408)
        size = len(request_timeout(30).body())
        self.assertEqual(self.access_lines(), [f"127.0.0.1 - - 408 {size} 30000.0ms id00000001"])

    def test_400_garbage_request_line(self) -> None:
        c = self.connect()
        c.send(b"\x00\x01\x02 nonsense\r\n\r\n")
        self.assertEqual(c.response()[0], 400)
        [line] = self.access_lines()
        self.assertRegex(line, r"^127\.0\.0\.1 - - 400 \d+ 0\.0ms id00000001$")

    def test_second_request_refused_is_itself(self) -> None:
        """On a keep-alive connection, a refused request is not logged as the one before."""
        c = self.connect(max_body=10)
        c.send(post(2) + b"{}")
        c.send(b"POST /v1/other HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
        size = len(body_too_large(10).body())
        self.assertEqual(
            self.access_lines(),
            [
                "127.0.0.1 POST /v1/chat/completions 200 1 0.0ms id00000001",
                f"127.0.0.1 POST /v1/other 413 {size} 0.0ms id00000002",
            ],
        )

    def test_pipelined_request_refused_is_timed_alone(self) -> None:
        """A request read from the buffer after the one before is not charged its time."""
        c = self.connect(max_body=10)
        c.clock.advance(5)
        c.send(
            post(2) + b"{}" + b"POST /v1/other HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n"
        )
        size = len(body_too_large(10).body())
        self.assertEqual(
            self.access_lines()[1], f"127.0.0.1 POST /v1/other 413 {size} 0.0ms id00000002"
        )

    def test_silent_connection_has_no_access_line(self) -> None:
        """No request, no access line: the close is logged once, as a connection event."""
        c = self.connect(read_timeout=2)
        c.clock.advance(2)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(self.access_lines(), [])
        [closed] = [e for e in self.events if e.get("log_namespace") == "llmgw.site"]
        self.assertEqual(closed["log_format"], "Closing {peer}: nothing received within {seconds}s")
        self.assertEqual(
            (closed["peer"], closed["seconds"]), (IPv4Address("TCP", "127.0.0.1", 5000), 2)
        )


class Refuses(Resource):
    """Answers C{/NNN} with an L{ApiError} of status NNN, through L{render_error}."""

    isLeaf = True

    def render(self, request: Request) -> int:
        render_error(request, ApiError(int(request.path[1:]), "refused"))
        return NOT_DONE_YET


class ReasonPhraseTests(SynchronousTestCase):
    """Both ways a status goes out carry the standard phrase, whatever Twisted's table says."""

    def test_render_error(self) -> None:
        for status, reason in STANDARD_REASONS.items():
            c = Connection(resource=Refuses())
            c.send(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % (status,))
            self.assertTrue(
                c.transport.value().startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason)),
                c.transport.value()[:40],
            )

    def test_raw_response(self) -> None:
        for status, reason in STANDARD_REASONS.items():
            raw = raw_response(ApiError(status, "refused"))
            self.assertTrue(raw.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason)), raw[:40])

    def test_relayed_status(self) -> None:
        """A model server's status that Twisted has no name for still gets its own."""
        c = Connection(resource=Refuses())
        c.send(b"GET /422 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(c.transport.value().startswith(b"HTTP/1.1 422 "))
        self.assertNotIn(b"Unknown Status", c.transport.value())

    def test_explicit_phrase_kept(self) -> None:
        c = Connection(resource=Refuses())
        request = GatewayRequest(c.channel)
        request.setResponseCode(429, b"Slow Down")
        self.assertEqual(request.code_message, b"Slow Down")


class MalformedHeadTests(SynchronousTestCase):
    def test_oversized_headers_get_shaped_400(self) -> None:
        c = Connection()
        c.send(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n")
        status, headers, body = c.response()
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")
        self.assertEqual(headers[b"x-frame-options"], b"DENY")

    def test_garbage_request_line(self) -> None:
        c = Connection()
        c.send(b"\x00\x01\x02 nonsense\r\n\r\n")
        self.assertEqual(c.response()[0], 400)


class RawResponseTests(SynchronousTestCase):
    def test_framing(self) -> None:
        error = body_too_large(10)
        raw = raw_response(error)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "))
        self.assertIn(b"Content-Length: %d" % (len(body),), head)
        self.assertEqual(body, error.body())


class Slow(Resource):
    """Answers only when the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Request] = []

    def render_POST(self, request: Request) -> int:
        self.pending.append(request)
        return NOT_DONE_YET


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Slow()
        self.site = GatewaySite(self.resource, self.clock, max_body=100, read_timeout=30)

    def connect(self) -> tuple[Any, HalfCloseTransport]:
        channel: Any = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = HalfCloseTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_idle_closes_busy_finishes(self) -> None:
        idle, idle_transport = self.connect()
        busy, busy_transport = self.connect()
        busy.dataReceived(post(2) + b"{}")
        drained = self.site.drain(30)
        self.assertTrue(idle_transport.disconnecting)
        idle.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(drained)
        self.assertFalse(busy_transport.disconnecting)
        (request,) = self.resource.pending
        request.write(b"done")
        request.finish()
        self.assertIn(b"done", busy_transport.value())
        self.assertTrue(busy_transport.disconnecting)
        busy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(drained)

    def test_grace_runs_out(self) -> None:
        busy, busy_transport = self.connect()
        busy.dataReceived(post(2) + b"{}")
        drained = self.site.drain(30)
        self.clock.advance(29)
        self.assertNoResult(drained)
        self.assertFalse(busy_transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(busy_transport.disconnected)
        busy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(drained)

    def test_nothing_open(self) -> None:
        self.successResultOf(self.site.drain(30))

    def test_connection_during_drain_is_closed(self) -> None:
        """A connection accepted as the drain begins is closed at once, not served."""
        busy, _ = self.connect()
        busy.dataReceived(post(2) + b"{}")
        drained = self.site.drain(30)
        late, late_transport = self.connect()
        self.assertTrue(late_transport.disconnecting)
        late.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(drained)


def serve_on_loopback(
    test: TestCase, clock: MemoryReactorClock, read_timeout: float
) -> tuple[GatewaySite, int]:
    """
    The gateway's Site and resource on a real 127.0.0.1 socket, whose deadlines
    run on C{clock}: the connection is real, and time is the test's.
    """
    config = gateway_config(aihostport=free_port(), aischeme="http", read_timeout=read_timeout)
    upstream = UpstreamClient(reactor, config, clock)
    test.addCleanup(upstream.pool.closeCachedConnections)
    request_log = RequestLog(clock, verbose=False, colour=False)
    resource = GatewayResource(config, upstream, clock, request_log)
    site = GatewaySite(resource, clock, max_body=config.max_body, read_timeout=read_timeout)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return site, port_of(port)


def raw_connection(test: TestCase, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    test.addCleanup(sock.close)
    sock.setblocking(False)
    return sock


def read_available(sock: socket.socket, into: list[bytes]) -> bool:
    """Append what has arrived to C{into}; C{True} once the server has closed."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True
        into.append(data)


class SilentConnectionTests(TestCase):
    """A raw socket that connects and says nothing, against the real Site on loopback."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.site, self.port = serve_on_loopback(self, self.clock, read_timeout=2)

    @inline
    async def test_closed_at_read_timeout(self) -> None:
        sock = raw_connection(self, self.port)
        await eventually(lambda: len(self.site.channels) == 1)
        received: list[bytes] = []
        self.clock.advance(1.9)
        (channel,) = self.site.channels
        transport: Any = channel.transport
        self.assertFalse(transport.disconnecting)
        self.assertFalse(read_available(sock, received))
        self.clock.advance(0.1)
        await eventually(lambda: read_available(sock, received))
        self.assertEqual(received, [], "nothing was asked, so nothing is answered")
        await eventually(lambda: not self.site.channels)

    @inline
    async def test_keep_alive_waits_for_the_idle_limit(self) -> None:
        """Once a request is answered, --read-timeout no longer applies; IDLE_SECONDS does."""
        sock = raw_connection(self, self.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received: list[bytes] = []
        await eventually(lambda: read_available(sock, received) or b'"ok"}' in b"".join(received))
        self.assertTrue(b"".join(received).startswith(b"HTTP/1.1 200 OK\r\n"))
        self.clock.advance(IDLE_SECONDS - 1)
        (channel,) = self.site.channels
        transport: Any = channel.transport
        self.assertFalse(transport.disconnecting)
        self.assertFalse(read_available(sock, received))
        self.clock.advance(1)
        await eventually(lambda: read_available(sock, received))
        await eventually(lambda: not self.site.channels)


class ConnectionRecordTests(SynchronousTestCase):
    """Requests the channel answers itself have a record and an id, like the rest."""

    def test_413(self) -> None:
        c = Connection(max_body=100)
        c.clock.advance(5)
        c.send(post(101, b"User-Agent: curl/8\r\n"))
        status, headers, _ = c.response()
        self.assertEqual((status, headers[b"x-request-id"]), (413, b"id00000001"))
        [record] = c.records
        self.assertEqual(
            (record.request_id, record.status, record.rejected, record.route, record.method),
            ("id00000001", 413, "too_large", "/v1/chat/completions", "POST"),
        )
        self.assertEqual((record.client, record.user_agent), ("127.0.0.1", "curl/8"))
        self.assertEqual((record.started, record.finished), (0.0, 5.0))
        self.assertEqual(record.bytes_out, len(body_too_large(100).body()))

    def test_408(self) -> None:
        c = Connection(read_timeout=30)
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        c.clock.advance(30)
        status, headers, _ = c.response()
        self.assertEqual((status, headers[b"x-request-id"]), (408, b"id00000001"))
        [record] = c.records
        self.assertEqual((record.status, record.rejected), (408, "read_timeout"))
        self.assertEqual(record.duration, 30.0)

    def test_400(self) -> None:
        c = Connection()
        c.send(b"\x00\x01\x02 nonsense\r\n\r\n")
        status, headers, _ = c.response()
        self.assertEqual((status, headers[b"x-request-id"]), (400, b"id00000001"))
        [record] = c.records
        self.assertEqual(
            (record.status, record.rejected, record.route), (400, "validation", "other")
        )

    def test_served(self) -> None:
        c = Connection()
        c.send(post(2) + b"{}")
        status, headers, _ = c.response()
        self.assertEqual((status, headers[b"x-request-id"]), (200, b"id00000001"))
        [record] = c.records
        self.assertEqual((record.status, record.rejected, record.bytes_out), (200, None, 1))

    def test_trusted_proxy_id_at_the_connection_level(self) -> None:
        c = Connection(max_body=100)
        c.site.clients = ClientAddressPolicy((ipaddress.ip_network("127.0.0.1/32"),))
        c.send(post(101, b"X-Request-Id: edge-42\r\nX-Forwarded-For: 198.51.100.7\r\n"))
        self.assertEqual(c.response()[1][b"x-request-id"], b"edge-42")
        self.assertEqual(c.records[0].client, "198.51.100.7")

    def test_untrusted_peer_id_replaced(self) -> None:
        c = Connection(max_body=100)
        c.send(post(101, b"X-Request-Id: edge-42\r\n"))
        self.assertEqual(c.response()[1][b"x-request-id"], b"id00000001")

    def test_client_gone_before_a_reply(self) -> None:
        """Twisted logs nothing for it; its record still ends, with nginx's 499."""
        c = Connection(resource=Slow())
        c.send(post(2) + b"{}")
        c.clock.advance(3)
        c.channel.connectionLost(Failure(ConnectionDone()))
        [record] = c.records
        self.assertEqual((record.status, record.bytes_out, record.duration), (499, 0, 3.0))

    def test_observers_see_each_record_once(self) -> None:
        c = Connection(max_body=100)
        c.send(post(101))
        c.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(c.records), 1)


class CountingTransport(HalfCloseTransport):
    """A transport that counts how often it is asked for its addresses."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=peer)
        self.asked = {"peer": 0, "host": 0}

    def getPeer(self) -> Any:
        self.asked["peer"] += 1
        return super().getPeer()

    def getHost(self) -> Any:
        self.asked["host"] += 1
        return super().getHost()


class PerRequestWorkTests(SynchronousTestCase):
    """What Twisted redoes for every request is done once a connection, or once a second."""

    def test_addresses_asked_once_a_connection(self) -> None:
        clock = MemoryReactorClock()
        site = GatewaySite(Echo(), clock, max_body=100, read_timeout=30)
        peer = IPv4Address("TCP", "192.0.2.7", 5000)
        channel: Any = site.buildProtocol(peer)
        transport = CountingTransport(peer)
        channel.makeConnection(transport)
        records: list[RequestRecord] = []
        site.record_observers.append(records.append)
        for _ in range(3):
            channel.dataReceived(post(2) + b"{}")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK\r\n"), 3)
        self.assertEqual(transport.asked, {"peer": 1, "host": 1})
        self.assertEqual([record.client for record in records], ["192.0.2.7"] * 3)

    def test_date_from_the_clock_once_a_second(self) -> None:
        """The C{Date} header says the site's clock's second, and no C{Server} banner is set."""
        clock = MemoryReactorClock()
        clock.advance(1_700_000_000.25)
        c = Connection(clock=clock)
        c.send(post(2) + b"{}")
        self.assertEqual(c.response()[1][b"date"], b"Tue, 14 Nov 2023 22:13:20 GMT")
        c.clock.advance(0.5)
        self.assertEqual(c.site.http_date(), b"Tue, 14 Nov 2023 22:13:20 GMT")
        c.clock.advance(0.5)
        self.assertEqual(c.site.http_date(), b"Tue, 14 Nov 2023 22:13:21 GMT")
        self.assertNotIn(b"server", c.response()[1])

    def test_process_as_twisted(self) -> None:
        """The resource sees Twisted's site and paths; C{*} is answered as Twisted does."""
        seen: list[tuple[Any, Any, Any]] = []

        class Paths(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                seen.append((request.site, request.prepath, request.postpath))
                return b"ok"

        c = Connection(resource=Paths())
        c.send(b"GET /v1/a%20b/c HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(seen, [(c.site, [], [b"v1", b"a b", b"c"])])
        self.assertEqual(c.response()[0], 200)
        for method, status in ((b"OPTIONS", 200), (b"GET", 405)):
            c = Connection(resource=Paths())
            c.send(method + b" * HTTP/1.1\r\nHost: x\r\n\r\n")
            status_got, headers, body = c.response()
            self.assertEqual((status_got, headers[b"content-length"], body), (status, b"0", b""))
            self.assertEqual(headers[b"x-content-type-options"], b"nosniff")
