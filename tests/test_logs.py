"""
Tests for L{llmgw.logs}: when to colour, what the access line and the verbose
view record, and that a request's C{Authorization} header never reaches them.

Requests are real L{twisted.web.server.Request}s, parsed by a real channel
from bytes written to a L{StringTransport}, and the access line comes from the
Site's own log hook when the request finishes, as in the gateway.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.http import Request
from twisted.web.resource import Resource
from zope.interface import implementer

from llmgw.keys import KeyRing
from llmgw.logs import (
    ACCESS_LOG_BATCH_SECONDS,
    AccessLogFile,
    BatchedAccessLines,
    RequestLog,
    access_log_line,
    iso_utc,
    use_colour,
)
from llmgw.options import Config
from llmgw.record import Attempt, RequestIds, RequestRecord
from llmgw.service import build_site

SECRET = "sk-live-DoNotLog-7f3a9c"
ANSI = re.compile("\x1b\\[[0-9;]*m")


@implementer(ILogObserver)
class EventList(list[LogEvent]):
    """An observer that keeps every event it sees."""

    def __call__(self, event: LogEvent) -> None:
        self.append(event)


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class UseColourTests(SynchronousTestCase):
    def test_terminal(self) -> None:
        self.assertTrue(use_colour(FakeStream(True), {}))

    def test_not_a_terminal(self) -> None:
        self.assertFalse(use_colour(FakeStream(False), {}))

    def test_string_io(self) -> None:
        self.assertFalse(use_colour(io.StringIO(), {}))

    def test_stream_without_isatty(self) -> None:
        self.assertFalse(use_colour(object(), {}))  # type: ignore[arg-type]

    def test_no_color_on_terminal(self) -> None:
        self.assertFalse(use_colour(FakeStream(True), {"NO_COLOR": "1"}))

    def test_no_color_any_value(self) -> None:
        self.assertFalse(use_colour(FakeStream(True), {"NO_COLOR": "0"}))

    def test_empty_no_color_is_unset(self) -> None:
        """no-color.org: only a non-empty C{NO_COLOR} turns colour off."""
        self.assertTrue(use_colour(FakeStream(True), {"NO_COLOR": ""}))

    def test_other_variables_irrelevant(self) -> None:
        environ = {"TERM": "xterm-256color", "COLORTERM": "truecolor"}
        self.assertTrue(use_colour(FakeStream(True), environ))
        self.assertFalse(use_colour(FakeStream(False), environ))

    def test_defaults_are_stdout_and_environment(self) -> None:
        self.patch(sys, "stdout", FakeStream(True))
        self.patch(os, "environ", {"HOME": "/root"})
        self.assertTrue(use_colour())
        self.patch(os, "environ", {"NO_COLOR": "yes"})
        self.assertFalse(use_colour())
        self.patch(sys, "stdout", FakeStream(False))
        self.patch(os, "environ", {})
        self.assertFalse(use_colour())


class Pending(Resource):
    """Holds each request open, as the gateway does while the model answers."""

    isLeaf = True

    def __init__(self, clock: MemoryReactorClock, request_log: RequestLog) -> None:
        super().__init__()
        self.clock = clock
        self.request_log = request_log
        self.requests: list[tuple[Request, bytes]] = []

    def render(self, request: Any) -> Any:
        body = request.content.read()
        request.started = self.clock.seconds()
        self.request_log.request(request, body)
        self.requests.append((request, body))
        return server.NOT_DONE_YET


class AccessSite(server.Site):
    """A Site whose log hook is L{RequestLog.access}, like the gateway's."""

    def __init__(self, resource: Resource, request_log: RequestLog, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.request_log = request_log

    def log(self, request: Any) -> None:
        self.request_log.access(request)


def access_events(events: list[LogEvent]) -> list[LogEvent]:
    return [event for event in events if event.get("log_namespace") == "llmgw.access"]


class RequestLogTests(SynchronousTestCase):
    peer: IPv4Address | IPv6Address = IPv4Address("TCP", "203.0.113.9", 50123)

    def setUp(self) -> None:
        self.events = EventList()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)

    def serve(
        self,
        *,
        verbose: bool,
        colour: bool = False,
        method: bytes = b"POST",
        target: bytes = b"/v1/chat/completions?trace=1",
        body: bytes = b'{"messages":[{"role":"user","content":"Hi"}]}',
    ) -> tuple[RequestLog, Request, bytes]:
        """Send one request through a real channel and hold it open."""
        request_log = RequestLog(self.clock, verbose=verbose, colour=colour)
        resource = Pending(self.clock, request_log)
        site = AccessSite(resource, request_log, reactor=self.clock, timeout=None)
        channel = site.buildProtocol(self.peer)
        assert channel is not None
        transport = StringTransport(peerAddress=self.peer)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(
            method + b" " + target + b" HTTP/1.1\r\n"
            b"Host: gateway.example\r\n"
            b"Authorization: Bearer " + SECRET.encode() + b"\r\n"
            b"Proxy-Authorization: Basic " + SECRET.encode() + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"\r\n" + body
        )
        self.assertEqual(len(resource.requests), 1)
        request, received = resource.requests[0]
        self.assertEqual(received, body)
        return request_log, request, received

    def answer(self, request_log: RequestLog, request: Request, status: int, reply: bytes) -> None:
        request_log.reply(request, status, reply)
        request.setResponseCode(status)
        request.write(reply)
        request.finish()

    def assertNoSecret(self) -> None:
        self.assertTrue(self.events)
        for event in self.events:
            self.assertNotIn(SECRET, repr(event))
            self.assertNotIn(SECRET, formatEvent(event))

    def test_access_line(self) -> None:
        request_log, request, _ = self.serve(verbose=False)
        self.clock.advance(0.25)
        self.answer(request_log, request, 200, b'{"id":"chatcmpl-1"}\n')
        [event] = access_events(self.events)
        self.assertEqual(
            {key: event[key] for key in ("client", "method", "path", "status", "bytes", "ms")},
            {
                "client": "203.0.113.9",
                "method": "POST",
                "path": "/v1/chat/completions?trace=1",
                "status": 200,
                "bytes": 20,
                "ms": 250.0,
            },
        )
        self.assertEqual(
            formatEvent(event), "203.0.113.9 POST /v1/chat/completions?trace=1 200 20 250.0ms"
        )
        self.assertNoSecret()

    def test_access_line_error_status(self) -> None:
        request_log, request, _ = self.serve(verbose=False, method=b"GET", target=b"/nowhere")
        self.clock.advance(0.0015)
        self.answer(request_log, request, 404, b"{}")
        [event] = access_events(self.events)
        self.assertEqual(formatEvent(event), "203.0.113.9 GET /nowhere 404 2 1.5ms")

    def test_access_without_start_time(self) -> None:
        request_log, request, _ = self.serve(verbose=False)
        del request.started  # type: ignore[attr-defined]
        self.clock.advance(5)
        self.answer(request_log, request, 200, b"ok")
        [event] = access_events(self.events)
        self.assertEqual(event["ms"], 0.0)

    def test_access_ipv6_client(self) -> None:
        self.peer = IPv6Address("TCP", "2001:db8::7", 50123)
        request_log, request, _ = self.serve(verbose=False)
        self.answer(request_log, request, 200, b"ok")
        [event] = access_events(self.events)
        self.assertEqual(event["client"], "2001:db8::7")

    def test_not_verbose_logs_no_request_or_reply(self) -> None:
        request_log, request, _ = self.serve(verbose=False)
        request_log.reply(request, 200, b'{"reply": true}')
        self.assertEqual(access_events(self.events), [])
        request.finish()
        self.assertEqual(len(access_events(self.events)), 1)

    def test_verbose_can_be_switched_on(self) -> None:
        request_log, request, body = self.serve(verbose=False)
        request_log.verbose = True
        request_log.request(request, body)
        request_log.reply(request, 200, b"{}")
        self.assertEqual(len(access_events(self.events)), 2)

    def test_verbose_can_be_switched_off(self) -> None:
        request_log, request, body = self.serve(verbose=True)
        self.assertEqual(len(access_events(self.events)), 1)
        request_log.verbose = False
        request_log.request(request, body)
        request_log.reply(request, 200, b"{}")
        self.assertEqual(len(access_events(self.events)), 1)

    def test_verbose_request_and_reply_plain(self) -> None:
        body = b'{"messages":[{"role":"user","content":"Gr\xc3\xbc\xc3\x9fe {x}"}]}'
        request_log, request, _ = self.serve(verbose=True, body=body)
        self.answer(request_log, request, 200, b'  {"choices": []}\n')
        logged, replied, access = access_events(self.events)
        self.assertEqual(
            {key: logged[key] for key in ("client", "method", "path", "body")},
            {
                "client": "203.0.113.9",
                "method": "POST",
                "path": "/v1/chat/completions",
                "body": body.decode(),
            },
        )
        self.assertEqual(
            formatEvent(logged),
            "203.0.113.9 POST /v1/chat/completions " + body.decode(),
        )
        self.assertEqual(
            (replied["client"], replied["status"], replied["body"]),
            ("203.0.113.9", 200, '{"choices": []}'),
        )
        self.assertEqual(formatEvent(replied), '203.0.113.9 200 {"choices": []}')
        self.assertEqual(access["status"], 200)
        for event in (logged, replied, access):
            self.assertNotIn("\x1b", formatEvent(event))
        self.assertNoSecret()

    def test_verbose_error_plain(self) -> None:
        request_log, request, _ = self.serve(verbose=True)
        error = b'{"error": {"message": "Temperature must be between 0.1 and 1.0"}}'
        self.answer(request_log, request, 400, error)
        _, replied, _ = access_events(self.events)
        self.assertEqual(formatEvent(replied), "203.0.113.9 400 " + error.decode())

    def test_verbose_undecodable_body(self) -> None:
        self.serve(verbose=True, body=b"\xff\xfe{")
        [logged] = access_events(self.events)
        self.assertEqual(logged["body"], "\ufffd\ufffd{")

    def test_colour(self) -> None:
        request_log, request, body = self.serve(verbose=True, colour=True)
        request_log.reply(request, 200, b'{"ok": 1}')
        request_log.reply(request, 502, b'{"error": {}}')
        logged, ok, bad = access_events(self.events)
        for event in (logged, ok, bad):
            self.assertRegex(formatEvent(event), ANSI)
        self.assertEqual(
            ANSI.sub("", formatEvent(logged)),
            "203.0.113.9 POST /v1/chat/completions " + body.decode(),
        )
        self.assertEqual(ANSI.sub("", formatEvent(ok)), '203.0.113.9 200 {"ok": 1}')
        self.assertEqual(ANSI.sub("", formatEvent(bad)), '203.0.113.9 502 {"error": {}}')
        self.assertNotEqual(ok["colour"], bad["colour"])
        self.assertRegex(ok["colour"], "^\x1b\\[[0-9;]+m$")
        self.assertRegex(bad["colour"], "^\x1b\\[[0-9;]+m$")
        self.assertNoSecret()

    def test_no_colour_without_ansi(self) -> None:
        request_log, request, _ = self.serve(verbose=True, colour=False)
        request_log.reply(request, 200, b"{}")
        request_log.reply(request, 500, b"{}")
        events = access_events(self.events)
        self.assertEqual(len(events), 3)
        for event in events:
            self.assertNotIn("\x1b", formatEvent(event))
            self.assertNotIn("\x1b", repr(event))

    def test_access_line_has_no_colour(self) -> None:
        request_log, request, _ = self.serve(verbose=False, colour=True)
        self.answer(request_log, request, 200, b"{}")
        [event] = access_events(self.events)
        self.assertNotIn("\x1b", formatEvent(event))

    def test_authorization_never_logged(self) -> None:
        for verbose in (False, True):
            for colour in (False, True):
                request_log, request, _ = self.serve(verbose=verbose, colour=colour)
                self.assertEqual(request.getHeader(b"Authorization"), b"Bearer " + SECRET.encode())
                self.answer(request_log, request, 401, b'{"error": {}}')
        self.assertEqual(len(access_events(self.events)), 1 + 1 + 3 + 3)
        self.assertNoSecret()


class GatewayAccessLogTests(SynchronousTestCase):
    """
    The Site that L{build_site} makes writes an access line for every request,
    whatever C{--verbose} and the console's C{verbose on|off} say: the verbose
    view is added to the access line, never put in its place.
    """

    def setUp(self) -> None:
        self.events = EventList()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)

    def site(self, *, verbose: bool) -> Any:
        # Port 9 on loopback: never connected to, MemoryReactorClock connects nothing.
        config = Config(aihost="127.0.0.1", aihostport=9, aischeme="http", verbose=verbose)
        site = build_site(config, self.clock, None, KeyRing(None, None), colour=False)
        site.request_ids = RequestIds("id")
        self.addCleanup(site.resource.upstream.pool.closeCachedConnections)
        return site

    def get(self, site: Any, path: bytes) -> StringTransport:
        peer = IPv4Address("TCP", "127.0.0.1", 50123)
        channel = site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        return transport

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in access_events(self.events)]

    def test_verbose_off_keeps_access_lines(self) -> None:
        """Started with --verbose, then C{verbose off}: the access lines keep coming."""
        site = self.site(verbose=True)
        self.get(site, b"/healthz")
        site.resource.request_log.verbose = False
        self.get(site, b"/healthz")
        self.assertEqual(
            self.lines(),
            [
                "127.0.0.1 GET /healthz 200 16 0.0ms id00000001",
                "127.0.0.1 GET /healthz 200 16 0.0ms id00000002",
            ],
        )

    def test_verbose_on_adds_to_the_access_line(self) -> None:
        """C{verbose on}: the reply is shown in full, and the access line follows it."""
        site = self.site(verbose=False)
        site.resource.request_log.verbose = True
        self.get(site, b"/readyz")
        self.clock.advance(10)
        replied, access = access_events(self.events)
        self.assertEqual(replied["status"], 503)
        self.assertEqual(
            formatEvent(access),
            f"127.0.0.1 GET /readyz 503 {access['bytes']} 10000.0ms id00000001",
        )

    def test_health_checks_logged_when_verbose(self) -> None:
        """/healthz has no verbose view of its own; it keeps its access line all the same."""
        site = self.site(verbose=True)
        self.assertTrue(self.get(site, b"/healthz").value().startswith(b"HTTP/1.1 200 OK\r\n"))
        readyz = self.get(site, b"/readyz")
        self.clock.advance(10)
        self.assertTrue(readyz.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        healthz, replied, access = self.lines()
        self.assertEqual(healthz, "127.0.0.1 GET /healthz 200 16 0.0ms id00000001")
        self.assertRegex(replied, r'^127\.0\.0\.1 id00000002 503 \{"error": ')
        self.assertRegex(access, r"^127\.0\.0\.1 GET /readyz 503 \d+ 10000\.0ms id00000002$")


def finished_record(**fields: Any) -> RequestRecord:
    record = RequestRecord(
        request_id="0123456789ab00000007",
        started=1764648780.25,
        client="203.0.113.9",
        method="POST",
        route="/v1/chat/completions",
        user_agent="OpenAI/Python 1.40.0",
    )
    record.status = 200
    record.finished = 1764648781.5
    for name, value in fields.items():
        setattr(record, name, value)
    return record


class AccessLogLineTests(SynchronousTestCase):
    """C{--access-log}'s JSON lines: the same fields every time, no body, no key."""

    def test_stream(self) -> None:
        record = finished_record(
            model="llama",
            stream=True,
            ttft=0.125,
            prompt_tokens=12,
            completion_tokens=7,
            bytes_out=2048,
            attempts=[Attempt("https://a:443", "unreachable"), Attempt("https://b:443")],
            retry_reasons=["unreachable"],
        )
        line = access_log_line(record)
        self.assertTrue(line.endswith("}\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(
            json.loads(line),
            {
                "time": "2025-12-02T04:13:00.250Z",
                "request_id": "0123456789ab00000007",
                "client": "203.0.113.9",
                "method": "POST",
                "route": "/v1/chat/completions",
                "status": 200,
                "duration_ms": 1250.0,
                "ttft_ms": 125.0,
                "model": "llama",
                "prompt_tokens": 12,
                "completion_tokens": 7,
                "upstream": "https://b:443",
                "attempts": 2,
                "bytes_out": 2048,
                "user_agent": "OpenAI/Python 1.40.0",
            },
        )

    def test_refused(self) -> None:
        record = finished_record(status=413, rejected="too_large", user_agent=None)
        entry = json.loads(access_log_line(record))
        self.assertEqual(
            {k: entry[k] for k in ("status", "ttft_ms", "model", "upstream", "attempts")},
            {"status": 413, "ttft_ms": None, "model": None, "upstream": None, "attempts": 0},
        )
        self.assertIsNone(entry["user_agent"])

    def test_iso_utc(self) -> None:
        self.assertEqual(iso_utc(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(iso_utc(86400.9999), "1970-01-02T00:00:00.999Z")

    def test_iso_utc_second_by_second(self) -> None:
        """The second is formatted once and kept; each line still gets its own time."""
        times = [1_700_000_059.5, 1_700_000_059.999, 1_700_000_060.0, 1_700_000_059.25]
        self.assertEqual(
            [iso_utc(t) for t in times],
            [
                "2023-11-14T22:14:19.500Z",
                "2023-11-14T22:14:19.999Z",
                "2023-11-14T22:14:20.000Z",
                "2023-11-14T22:14:19.250Z",
            ],
        )


class AccessLogFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.file = AccessLogFile(self.path)
        self.file.open()
        self.addCleanup(self.file.close)

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def test_appends_and_flushes(self) -> None:
        with open(self.path, "w") as f:
            f.write("old\n")
        self.file.write("a\n")
        self.assertEqual(self.read(self.path), "old\na\n")

    def test_new_file_not_world_readable(self) -> None:
        self.file.write("a\n")
        self.assertEqual(os.stat(self.path).st_mode & 0o007, 0)

    def test_reopen_after_rotation(self) -> None:
        self.file.write("a\n")
        os.rename(self.path, self.path + ".1")
        self.file.write("b\n")
        self.file.reopen()
        self.file.write("c\n")
        self.assertEqual(self.read(self.path + ".1"), "a\nb\n")
        self.assertEqual(self.read(self.path), "c\n")

    def test_reopen_failure_keeps_the_old_file(self) -> None:
        events = EventList()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        self.file.path = os.path.join(self.mktemp(), "missing", "access.log")
        self.file.reopen()
        self.file.write("still\n")
        self.assertEqual(self.read(self.path), "still\n")
        [error] = [e for e in events if "reopen" in e.get("log_format", "")]
        self.assertEqual(error["why"], "No such file or directory")

    def test_failing_writes_are_logged_once_until_one_succeeds(self) -> None:
        """
        A full disk fails every batch, many a second under load: one error
        says so, and one line says when the lines are written again.
        """
        events = EventList()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        path = self.path
        self.file.path = "/dev/full"
        self.file.reopen()
        for _ in range(3):
            self.file.write("lost\n")
        self.file.path = path
        self.file.reopen()
        self.file.write("a\n")
        self.file.write("b\n")
        logged = [e for e in events if "access-log" in e["log_format"]]
        self.assertEqual(
            [(e["log_level"].name, e.get("why")) for e in logged],
            [("error", "No space left on device"), ("info", None)],
        )
        self.assertEqual(self.read(path), "a\nb\n")

    def test_open_failure_raises(self) -> None:
        missing = AccessLogFile(os.path.join(self.mktemp(), "access.log"))
        self.assertRaises(FileNotFoundError, missing.open)


class BatchedAccessLinesTests(SynchronousTestCase):
    def test_one_send_per_batch_interval(self) -> None:
        clock = MemoryReactorClock()
        sent: list[str] = []
        batch = BatchedAccessLines(clock, sent.append)
        first, second = finished_record(), finished_record(request_id="other")
        batch.add_record(first)
        clock.advance(ACCESS_LOG_BATCH_SECONDS / 2)
        batch.add_record(second)
        clock.advance(ACCESS_LOG_BATCH_SECONDS / 2 - 0.001)
        self.assertEqual(sent, [])
        clock.advance(0.001)
        self.assertEqual(sent, [access_log_line(first) + access_log_line(second)])
        clock.advance(ACCESS_LOG_BATCH_SECONDS)
        batch.flush()
        self.assertEqual(len(sent), 1)
        batch.add_record(first)
        clock.advance(ACCESS_LOG_BATCH_SECONDS)
        self.assertEqual(sent[1:], [access_log_line(first)])

    def test_flush_sends_at_once(self) -> None:
        """A drain or a shutdown does not wait for the batch's timer."""
        clock = MemoryReactorClock()
        sent: list[str] = []
        batch = BatchedAccessLines(clock, sent.append)
        batch.add_record(finished_record())
        batch.flush()
        self.assertEqual(sent, [access_log_line(finished_record())])
        self.assertEqual(clock.getDelayedCalls(), [])
