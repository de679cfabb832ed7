"""Tests for L{llmgw.site}: body caps, read deadlines and shaped errors at the connection level."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmgw.errors import body_too_large
from llmgw.headers import HARDENING_HEADERS
from llmgw.site import LINGER_SECONDS, GatewayChannel, GatewaySite, raw_response


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
    def __init__(self, max_body: int = 100, read_timeout: float = 30) -> None:
        self.clock = Clock()
        self.resource = Echo()
        self.site = GatewaySite(
            self.resource, self.clock, max_body=max_body, read_timeout=read_timeout
        )
        self.channel: Any = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        assert isinstance(self.channel, GatewayChannel)
        self.transport = HalfCloseTransport()
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
