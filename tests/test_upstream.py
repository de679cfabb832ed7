"""Tests for L{llmgw.upstream}: streams relayed as they come, cancellation, deadlines."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http
from twisted.web._newclient import Request as ClientRequest
from twisted.web.client import URI
from twisted.web.http import _ChunkedTransferDecoder, _DataLoss, _MalformedChunkedDataError
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import Site

from llmgw.devtls import make_ca
from llmgw.mock import Behaviour
from llmgw.record import Attempt, RequestRecord
from llmgw.site import GatewayRequest
from llmgw.tlsclient import SESSION_MATURITY
from llmgw.upstream import (
    EventStreamRelay,
    UpstreamClient,
    _ChunkedBodyDecoder,
    _ModelServerEndpoints,
    _QuietFactory,
)
from tests.loopback import (
    CHAT,
    JSON_HEADERS,
    chat_body,
    client,
    eventually,
    gateway_config,
    http_post,
    inline,
    reactor,
    request,
    start_gateway,
    start_upstream,
)
from tests.test_tlsclient import PythonTLSServerFactory, ping, policy, serve, server_context
from tests.vllm_stand_in import (
    SERVED_MODEL,
    UNAVAILABLE,
    gateway_connection,
    read_reply,
    send_while_busy,
    start_vllm_stand_in,
)


class Events(Protocol):
    """Collects a streamed body, event by event, as the gateway sends it."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[bytes] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        self.events.extend(events)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)

    def payloads(self) -> list[Any]:
        return [
            event[len(b"data: ") :].decode()
            if event == b"data: [DONE]"
            else json.loads(event[len(b"data: ") :])
            for event in self.events
        ]


async def open_stream(test: TestCase, port: int, body: bytes) -> tuple[Any, Events]:
    http = client(test)
    response = await http.request(
        "POST",
        f"http://127.0.0.1:{port}".encode() + CHAT,
        data=body,
        headers=Headers(JSON_HEADERS),
        unbuffered=True,
    )
    events = Events()
    response.deliverBody(events)
    return response, events


def raw_request(test: TestCase, port: int, body: bytes, rcvbuf: int | None = None) -> socket.socket:
    """A chat request sent over a plain socket the test can stop reading or close."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    test.addCleanup(sock.close)
    sock.sendall(http_post(body))
    sock.setblocking(False)
    return sock


async def first_event(sock: socket.socket) -> bytes:
    """Read a L{raw_request}'s reply until its first SSE event is in; return what came."""
    received = bytearray()

    def has_first_event() -> bool:
        try:
            received.extend(sock.recv(65536))
        except BlockingIOError:
            pass
        return b"data: " in received

    await eventually(has_first_event)
    return bytes(received)


class StreamTests(TestCase):
    @inline
    async def test_chunks_arrive_as_produced(self) -> None:
        """20 chunks 100 ms apart: the first is in the client's hands before the last exists."""
        clock = Clock()
        upstream = start_upstream(self, clock=clock, defaults=Behaviour(chunks=20, interval=0.1))
        gateway = start_gateway(self, gateway_config(upstream))
        body = chat_body("one two three four five six seven eight nine ten", stream=True)
        response, events = await open_stream(self, gateway.port, body)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertEqual(response.headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
        await eventually(lambda: len(events.events) == 1)
        clock.advance(0.1)
        await eventually(lambda: len(events.events) == 2)
        self.assertEqual(upstream.model.completed, 0, "the stream was collected before relaying")
        for _ in range(19):
            clock.advance(0.1)
        await events.done
        payloads = events.payloads()
        self.assertEqual(payloads[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual(payloads[-1], "[DONE]")
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[1:-1])
        self.assertEqual(text, "one two three four five six seven eight nine ten")

    @inline
    async def test_stream_options_pass_through(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(interval=0))
        gateway = start_gateway(self, gateway_config(upstream))
        body = chat_body("hi", stream=True, stream_options={"include_usage": True})
        _, events = await open_stream(self, gateway.port, body)
        await events.done
        usage = events.payloads()[-2]
        self.assertEqual(usage["choices"], [])
        self.assertIn("total_tokens", usage["usage"])

    @inline
    async def test_validation_error_before_stream_is_json(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, body=chat_body(stream=True, temperature=3))
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.header(b"Content-Type"), b"application/json")

    @inline
    async def test_upstream_breaks_mid_stream(self) -> None:
        """A reset mid-stream becomes a final error event, then a clean close."""
        upstream = start_upstream(self, defaults=Behaviour(fault="reset", chunks=4, interval=0))
        gateway = start_gateway(self, gateway_config(upstream))
        response, events = await open_stream(self, gateway.port, chat_body(stream=True))
        await events.done
        self.assertEqual(response.code, 200)
        last = events.payloads()[-1]
        self.assertEqual(last["error"]["type"], "api_error")
        self.assertEqual(last["error"]["code"], "upstream_bad_response")

    @inline
    async def test_stream_idle_timeout(self) -> None:
        clock = Clock()
        upstream = start_upstream(self, defaults=Behaviour(chunks=3, interval=50))
        gateway = start_gateway(self, gateway_config(upstream, stream_idle_timeout=10), clock=clock)
        _, events = await open_stream(self, gateway.port, chat_body(stream=True))
        await eventually(lambda: len(events.events) == 1)
        clock.advance(9.9)
        self.assertFalse(events.done.called)
        clock.advance(0.2)
        await events.done
        error = events.payloads()[-1]["error"]
        self.assertEqual((error["type"], error["code"]), ("api_error", "upstream_timeout"))
        self.assertIn("10 seconds", error["message"])
        await eventually(lambda: upstream.model.cancelled == 1)


class CancellationTests(TestCase):
    """A client that goes away stops the generation on the model server."""

    @inline
    async def test_disconnect_mid_stream(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(chunks=50, interval=0.2))
        gateway = start_gateway(self, gateway_config(upstream))
        sock = raw_request(self, gateway.port, chat_body(stream=True))
        self.assertIn(b"200 OK", await first_event(sock))
        sock.close()
        await eventually(lambda: upstream.model.cancelled == 1, timeout=1.0)
        self.assertEqual(upstream.model.completed, 0)

    @inline
    async def test_disconnect_while_waiting(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(delay=30))
        gateway = start_gateway(self, gateway_config(upstream))
        sock = raw_request(self, gateway.port, chat_body())
        await eventually(lambda: upstream.model.started == 1)
        sock.close()
        await eventually(lambda: upstream.model.cancelled == 1, timeout=1.0)

    @inline
    async def test_disconnect_before_upstream_headers_of_stream(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(delay=30))
        gateway = start_gateway(self, gateway_config(upstream))
        sock = raw_request(self, gateway.port, chat_body(stream=True))
        await eventually(lambda: upstream.model.started == 1)
        sock.close()
        await eventually(lambda: upstream.model.cancelled == 1, timeout=1.0)


class BackpressureTests(TestCase):
    @inline
    async def test_slow_reader_pauses_upstream(self) -> None:
        """A client that stops reading stops the gateway reading: its buffers stay small."""
        text = "x" * (3 * 1024 * 1024)
        upstream = start_upstream(self, defaults=Behaviour(chunks=1024, interval=0.0005))
        gateway = start_gateway(self, gateway_config(upstream, max_body=8 * 1024 * 1024))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        sock.setblocking(False)
        self.addCleanup(sock.close)
        body = chat_body(text, stream=True)
        await send_all(sock, http_post(body))
        await eventually(lambda: upstream.model.started == 1)
        (channel,) = gateway.site.channels
        transport: Any = channel.transport
        # The stand-in writes 3 MiB in half a second; the client reads nothing.
        await eventually(lambda: transport.producerPaused, timeout=10)
        await task.deferLater(reactor, 1.0, lambda: None)
        buffered = sum(map(len, transport.dataBuffer)) + transport._tempDataLen
        self.assertLess(buffered, 512 * 1024, "the gateway kept buffering for a slow client")


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Send without blocking the reactor that serves the other end."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await task.deferLater(reactor, 0.001, lambda: None)


class ConnectTimeoutTests(TestCase):
    @inline
    async def test_connect_timeout_is_504(self) -> None:
        """A model server that never completes the handshake gives a 504 in time."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue, so further SYNs go unanswered
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
            self.addCleanup(s.close)
        gateway = start_gateway(
            self, gateway_config(aihostport=port, aischeme="http", connect_timeout=0.5)
        )
        reply = await request(self, gateway.port, body=chat_body())
        self.assertEqual(reply.status, 504, reply.body)
        self.assertEqual(reply.json()["error"]["code"], "upstream_timeout")


class KeepAliveServer(Protocol):
    """
    A plain-HTTP model server that answers the first request of each connection
    and keeps it open, then treats the next one on that connection as the
    factory says: C{"close"} closes it without a byte (the server's own idle
    timer fired as the request arrived), C{"partial"} sends half a status line
    first.
    """

    factory: KeepAliveFactory
    transport: Any

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""
        self.answered = 0

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests += 1
            if self.answered and self.factory.on_reuse != "answer":
                if self.factory.on_reuse == "partial":
                    self.transport.write(b"HTTP/1.1 200")
                self.transport.loseConnection()
                return
            self.answered += 1
            body = b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": []}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


class KeepAliveFactory(Factory):
    protocol = KeepAliveServer  # type: ignore[assignment]

    def __init__(self, on_reuse: str) -> None:
        self.on_reuse = on_reuse
        self.connections = 0
        self.requests = 0


class StaleConnectionTests(TestCase):
    """A pooled connection the model server has just closed costs the client nothing."""

    def serve(self, on_reuse: str, **overrides: Any) -> tuple[KeepAliveFactory, int]:
        factory = KeepAliveFactory(on_reuse)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        config = gateway_config(aihostport=port.getHost().port, aischeme="http", **overrides)
        return factory, start_gateway(self, config).port

    @inline
    async def test_resent_on_a_new_connection(self) -> None:
        """Closed before any byte of a reply: sent once more, on a new connection."""
        server, port = self.serve("close")
        statuses = []
        for _ in range(3):
            statuses.append((await request(self, port, body=chat_body())).status)
        self.assertEqual(statuses, [200, 200, 200])
        self.assertEqual((server.requests, server.connections), (5, 3))

    @inline
    async def test_not_resent_after_a_reply_byte(self) -> None:
        """Once a byte of the reply has arrived, the request is never sent again."""
        server, port = self.serve("partial")
        first = await request(self, port, body=chat_body())
        second = await request(self, port, body=chat_body())
        self.assertEqual((first.status, second.status), (200, 502))
        self.assertEqual(second.json()["error"]["code"], "upstream_bad_response")
        self.assertEqual((server.requests, server.connections), (2, 1))

    @inline
    async def test_idle_connections_close(self) -> None:
        """The gateway closes idle pooled connections after --upstream-idle-timeout."""
        server, port = self.serve("answer", upstream_idle_timeout=0.05)
        await request(self, port, body=chat_body())
        await task.deferLater(reactor, 0.2, lambda: None)
        await request(self, port, body=chat_body())
        self.assertEqual((server.requests, server.connections), (2, 2))

    @inline
    async def test_kept_within_idle_timeout(self) -> None:
        server, port = self.serve("answer", upstream_idle_timeout=30)
        await request(self, port, body=chat_body())
        await request(self, port, body=chat_body())
        self.assertEqual((server.requests, server.connections), (2, 1))


class ParsedOnceTests(TestCase):
    """Each model server URL is parsed once, not for every request (it costs a twentieth)."""

    @inline
    async def test_parsed_once(self) -> None:
        server = KeepAliveFactory("answer")
        listening = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        upstream_port = listening.getHost().port
        config = gateway_config(aihostport=upstream_port, aischeme="http")
        gateway = start_gateway(self, config)
        parsed: list[bytes] = []
        from_bytes = URI.fromBytes.__func__  # type: ignore[attr-defined]

        def counting(cls: type[URI], uri: bytes, defaultPort: int | None = None) -> URI:
            parsed.append(uri)
            return from_bytes(cls, uri, defaultPort)  # type: ignore[no-any-return]

        self.patch(URI, "fromBytes", classmethod(counting))
        statuses = [(await request(self, gateway.port, body=chat_body())).status for _ in range(3)]
        self.assertEqual(statuses, [200, 200, 200])
        self.assertEqual(server.requests, 3)
        to_upstream = [uri for uri in parsed if b":%d/" % (upstream_port,) in uri]
        self.assertEqual(to_upstream, [b"http://localhost:%d/v1/chat/completions" % upstream_port])

    def test_refused_url_refused_again(self) -> None:
        """A URL Agent refuses is not kept: every request with it is refused the same way."""
        upstream = UpstreamClient(reactor, gateway_config(aischeme="http"))
        for _ in range(2):
            with self.assertRaises(ValueError):
                upstream.agent.request(b"GET", b"http://localhost:9/v1/\x00models")


class SessionResumptionTests(TestCase):
    """Each model server's TLS sessions are resumed, and offered to that origin alone."""

    @inline
    async def test_resumed_per_origin(self) -> None:
        """
        One server on two ports, with one set of ticket keys, would resume a session made on
        either port on the other: the gateway offers each origin its own sessions only.
        """
        ca = make_ca()
        server = PythonTLSServerFactory(server_context(self, ca))
        first, second = serve(self, server), serve(self, server)
        clock = Clock()
        endpoints = _ModelServerEndpoints(reactor, policy(ca), 5.0, clock)

        def endpoint(port: int) -> Any:
            return endpoints.endpointForURI(URI.fromBytes(b"https://localhost:%d/v1" % port))

        self.assertIs(endpoint(first), endpoint(first))
        self.assertIsNone(await ping(endpoint(first)))
        clock.advance(SESSION_MATURITY)
        self.assertIsNone(await ping(endpoint(first)))
        self.assertIsNone(await ping(endpoint(second)))
        clock.advance(SESSION_MATURITY)
        self.assertIsNone(await ping(endpoint(second)))
        self.assertEqual(server.resumed, [False, True, False, True])


class VLLMWebStackTests(TestCase):
    """
    The gateway in front of vLLM's own web stack: a real uvicorn process
    serving FastAPI, which closes a keep-alive connection after
    C{--timeout-keep-alive} idle seconds (1 here; vLLM keeps uvicorn's 5).

    Every request goes out right at that edge, when the gateway's pooled
    connection is idle for as long as uvicorn allows: the gateway sends it on
    a connection that uvicorn is closing.  Twisted never resends a POST, so
    without the gateway's own resend each such request was a 502.  uvicorn's
    timer is real, so this takes real time: about a second per request.
    """

    if UNAVAILABLE is not None:
        skip = UNAVAILABLE

    KEEP_ALIVE = 1.0
    """uvicorn's C{--timeout-keep-alive}."""

    EARLY = 0.02
    """Seconds before the edge at which the next request is sent."""

    BUSY = 0.04
    """
    Seconds the reactor is then held (L{send_while_busy}), so that uvicorn's
    close lands while the request waits: it fires 0.99 to 1.0 s after the
    previous reply reaches the client here, so [0.98, 1.02] covers it with a
    margin.  Spacing alone, without holding, met the close on 0 to 3 of 10
    requests at 0.99 s and on none at 0.97 or 1.01 s.
    """

    async def start(self) -> socket.socket:
        """The uvicorn server, the gateway in front of it, and a client connection."""
        server = await start_vllm_stand_in(self, self.KEEP_ALIVE)
        config = gateway_config(aihostport=server.port, aica=server.ca_file)
        gateway = start_gateway(self, config)
        return gateway_connection(self, gateway.port)

    async def at_the_edge(self, sock: socket.socket, body: bytes) -> None:
        """Send C{body} just as uvicorn closes the connection the last reply came on."""
        await task.deferLater(reactor, self.KEEP_ALIVE - self.EARLY, lambda: None)
        send_while_busy(sock, http_post(body), self.BUSY)

    @inline
    async def test_chats_at_the_keep_alive_edge(self) -> None:
        """50 chat completions, each at the edge: all answered, none a 502."""
        sock = await self.start()
        send_while_busy(sock, http_post(chat_body("first")), 0)
        first = await read_reply(sock)
        self.assertEqual(first.status, 200, first.body)
        failed = []
        for i in range(50):
            await self.at_the_edge(sock, chat_body(f"message {i}"))
            reply = await read_reply(sock)
            if reply.status != 200:
                failed.append((i, reply.status, reply.json()["error"]["message"]))
                continue
            self.assertEqual(reply.header(b"content-type"), b"application/json")
            self.assertEqual(reply.json()["choices"][0]["message"]["content"], f"message {i}")
        if failed:
            self.fail(f"{len(failed)} of 50 requests failed; the first: {failed[0]}")

    test_chats_at_the_keep_alive_edge.timeout = 120  # type: ignore[attr-defined]

    @inline
    async def test_stream_at_the_keep_alive_edge(self) -> None:
        """A streamed chat at the edge arrives whole, as uvicorn's events, ending in [DONE]."""
        sock = await self.start()
        send_while_busy(sock, http_post(chat_body("first")), 0)
        first = await read_reply(sock)
        self.assertEqual(first.status, 200, first.body)
        await self.at_the_edge(sock, chat_body("streamed over vLLM's stack", stream=True))
        reply = await read_reply(sock)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.header(b"content-type"), b"text/event-stream")
        self.assertEqual(reply.header(b"x-accel-buffering"), b"no")
        events = reply.body.split(b"\n\n")
        self.assertEqual(events[-2:], [b"data: [DONE]", b""])
        chunks = [json.loads(event[len(b"data: ") :]) for event in events[:-2]]
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        text = "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks)
        self.assertEqual(text, "streamed over vLLM's stack")
        self.assertEqual({chunk["model"] for chunk in chunks}, {SERVED_MODEL})

    test_stream_at_the_keep_alive_edge.timeout = 30  # type: ignore[attr-defined]


class StreamRecordTests(TestCase):
    """Why a stream ended early, as its record says, and how its attempt ended."""

    def assertAborted(self, record: RequestRecord, cause: str, outcome: str) -> None:
        self.assertEqual(record.stream_abort, cause)
        self.assertEqual([attempt.outcome for attempt in record.attempts], [outcome])

    @inline
    async def test_upstream_broke(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(fault="reset", chunks=4, interval=0))
        gateway = start_gateway(self, gateway_config(upstream))
        _, events = await open_stream(self, gateway.port, chat_body(stream=True))
        await events.done
        await eventually(lambda: len(gateway.records) == 1)
        [record] = gateway.records
        self.assertEqual(record.status, 200)
        self.assertAborted(record, "upstream_broke", "error")

    @inline
    async def test_idle_timeout(self) -> None:
        clock = Clock()
        upstream = start_upstream(self, defaults=Behaviour(chunks=3, interval=50))
        gateway = start_gateway(self, gateway_config(upstream, stream_idle_timeout=10), clock=clock)
        _, events = await open_stream(self, gateway.port, chat_body(stream=True))
        await eventually(lambda: len(events.events) == 1)
        clock.advance(10.1)
        await events.done
        await eventually(lambda: len(gateway.records) == 1)
        self.assertAborted(gateway.records[0], "idle_timeout", "timeout")

    @inline
    async def test_client_gone_mid_stream(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(chunks=50, interval=0.2))
        gateway = start_gateway(self, gateway_config(upstream))
        sock = raw_request(self, gateway.port, chat_body(stream=True))
        await first_event(sock)
        sock.close()
        await eventually(lambda: len(gateway.records) == 1)
        [record] = gateway.records
        self.assertEqual(record.status, 200)
        self.assertIsNotNone(record.ttft)
        self.assertAborted(record, "client_gone", "cancelled")

    @inline
    async def test_client_gone_before_any_reply(self) -> None:
        """Nothing was sent: the record says 499, as nginx does, and its attempt was cancelled."""
        upstream = start_upstream(self, defaults=Behaviour(delay=30))
        gateway = start_gateway(self, gateway_config(upstream))
        sock = raw_request(self, gateway.port, chat_body())
        await eventually(lambda: upstream.model.started == 1)
        sock.close()
        await eventually(lambda: len(gateway.records) == 1)
        [record] = gateway.records
        self.assertEqual((record.status, record.bytes_out, record.stream_abort), (499, 0, None))
        self.assertEqual([attempt.outcome for attempt in record.attempts], ["cancelled"])


class _Written:
    """What a relay writes to its client: just enough of a request for L{EventStreamRelay}."""

    startedWriting = chunked = 0
    _disconnected = False

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class StreamUsageTests(SynchronousTestCase):
    """The token counts of a stream's last chunk, however the chunks arrive."""

    def relay(self) -> tuple[EventStreamRelay, RequestRecord]:
        clock = Clock()
        clock.advance(100)
        record = RequestRecord("id", 99.5, "127.0.0.1", "POST", "/v1/chat/completions")
        record.attempts.append(Attempt("https://localhost:1"))
        relay = EventStreamRelay(_Written(), clock, 10, record=record)  # type: ignore[arg-type]
        return relay, record

    USAGE = (
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":12,"total_tokens":19,'
        b'"completion_tokens":7}}\n\n'
    )

    def test_whole_event(self) -> None:
        relay, record = self.relay()
        relay.dataReceived(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
        self.assertEqual(record.ttft, 0.5)
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (None, None))
        relay.dataReceived(self.USAGE + b"data: [DONE]\n\n")
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (12, 7))

    def test_event_cut_anywhere(self) -> None:
        """Cut at every byte after the word: the counts are found all the same."""
        start = self.USAGE.index(b'"usage"') + len(b'"usage"')
        for cut in range(start, len(self.USAGE)):
            relay, record = self.relay()
            relay.dataReceived(self.USAGE[:cut])
            relay.dataReceived(self.USAGE[cut:] + b"data: [DONE]\n\n")
            self.assertEqual((record.prompt_tokens, record.completion_tokens), (12, 7), cut)

    def test_null_usage_in_every_chunk(self) -> None:
        """OpenAI names C{usage} in every chunk, as C{null}, until the last."""
        relay, record = self.relay()
        relay.dataReceived(b'data: {"choices":[{"delta":{}}],"usage":null}\n\n' * 3)
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (None, None))
        relay.dataReceived(
            b'data: {"choices":[],"usage": {"prompt_tokens": 3, "completion_tokens": 2}}\r\n\r\n'
        )
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (3, 2))

    def test_not_json(self) -> None:
        relay, record = self.relay()
        relay.dataReceived(b'data: {"usage":{"prompt_tokens": oops}\n\n')
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (None, None))

    def test_usage_event_cut_anywhere(self) -> None:
        """
        Cut anywhere in the stream's last events, the word C{usage} itself
        too: the counts are found all the same, once the event is whole.
        """
        stream = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n' + self.USAGE
        stream += b"data: [DONE]\n\n"
        for cut in range(1, len(stream)):
            relay, record = self.relay()
            relay.dataReceived(stream[:cut])
            relay.dataReceived(stream[cut:])
            self.assertEqual((record.prompt_tokens, record.completion_tokens), (12, 7), cut)

    def test_usage_event_in_many_reads(self) -> None:
        """An event that comes a few bytes at a time, its lines ended with CR LF."""
        event = self.USAGE.replace(b"\n", b"\r\n")
        for size in (1, 2, 3, 7):
            relay, record = self.relay()
            for at in range(0, len(event), size):
                relay.dataReceived(event[at : at + size])
            self.assertEqual((record.prompt_tokens, record.completion_tokens), (12, 7), size)

    def test_usage_line_too_long(self) -> None:
        """A line cut short is kept up to a limit: memory stays bounded."""
        relay, record = self.relay()
        relay.dataReceived(b'data: {"pad":"' + b"x" * 70_000)
        relay.dataReceived(b'","usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n')
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (None, None))
        relay.dataReceived(self.USAGE)
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (12, 7))


#: A chunked body: a chunk extension, an event cut across chunks, a trailer,
#: and the start of the next reply on the same connection after it.
CHUNKED = (
    b'1b;name=value\r\ndata: {"choices":["one"]}\n\n\r\n'
    b"7\r\ndata: {\r\n"
    b'A\r\n"two":2}\n\n\r\n'
    b"0\r\nTrailer: x\r\n\r\n"
    b"HTTP/1.1"
)
CHUNKED_BODY = b'data: {"choices":["one"]}\n\ndata: {"two":2}\n\n'


class _Decoded:
    """What a chunked decoder hands on, read by read."""

    def __init__(self, decoder_type: Any) -> None:
        self.pieces: list[bytes] = []
        self.finished: list[bytes] = []
        self.decoder = decoder_type(self.pieces.append, self.finished.append)

    def feed(self, *reads: bytes) -> list[bytes]:
        """
        Feed C{reads} as Twisted's parser does (once the body ended, what
        follows is the next reply's); the body bytes each one delivered.
        """
        delivered = []
        for data in reads:
            before = len(self.pieces)
            if self.finished:
                self.finished.append(data)
            else:
                self.decoder.dataReceived(data)
            delivered.append(b"".join(self.pieces[before:]))
        return delivered

    def rest(self) -> bytes | None:
        """The bytes after the body, or L{None} while it has not ended."""
        return b"".join(self.finished) if self.finished else None


class ChunkedBodyDecoderTests(SynchronousTestCase):
    """
    L{_ChunkedBodyDecoder} delivers what Twisted's decoder delivers, read for
    read, but as one piece per read, and refuses what it refuses.
    """

    def test_one_piece_per_read(self) -> None:
        decoded = _Decoded(_ChunkedBodyDecoder)
        decoded.feed(CHUNKED)
        self.assertEqual(decoded.pieces, [CHUNKED_BODY])
        self.assertEqual(decoded.finished, [b"HTTP/1.1"])

    def test_cut_anywhere(self) -> None:
        """Cut in two or three at every place: each read delivers at once what it holds."""
        for first in range(1, len(CHUNKED)):
            for second in (first + 1, first + 2, len(CHUNKED)):
                reads = (CHUNKED[:first], CHUNKED[first:second], CHUNKED[second:])
                ours, twisted = _Decoded(_ChunkedBodyDecoder), _Decoded(_ChunkedTransferDecoder)
                self.assertEqual(ours.feed(*reads), twisted.feed(*reads), reads)
                self.assertEqual(b"".join(ours.pieces), CHUNKED_BODY)
                self.assertEqual(ours.rest(), b"HTTP/1.1", reads)
                self.assertLessEqual(len(ours.pieces), 3)

    def test_whole_chunk_reads(self) -> None:
        """A read that is one whole chunk, as a model server sends each event."""
        decoded = _Decoded(_ChunkedBodyDecoder)
        self.assertEqual(
            decoded.feed(b"3\r\nabc\r\n", b"A\r\n0123456789\r\n"), [b"abc", b"0123456789"]
        )
        self.assertRaises(_MalformedChunkedDataError, decoded.feed, b"3\r\nabcXY")
        self.assertEqual(decoded.pieces, [b"abc", b"0123456789", b"abc"])

    def test_byte_by_byte(self) -> None:
        decoded = _Decoded(_ChunkedBodyDecoder)
        for at in range(len(CHUNKED)):
            decoded.feed(CHUNKED[at : at + 1])
        self.assertEqual(b"".join(decoded.pieces), CHUNKED_BODY)
        self.assertEqual(decoded.rest(), b"HTTP/1.1")

    def test_malformed(self) -> None:
        """What Twisted refuses is refused, once the bytes before it are delivered."""
        malformed = [
            b"zz\r\n",
            b"0x3\r\nabc\r\n",
            b" 3\r\nabc\r\n",
            b"+3\r\nabc\r\n",
            b"\r\n",
            b"3;\x01\r\nabc\r\n",
            b"3\r\nabcX\r\n",
            b"3\r\nabc\rX",
            b"3" * 1025,
            b"0" * 1024 + b"3\r\nabc\r\n",
            b"0\r\n" + b"Trailer: x\r\n" * 6000,
        ]
        for body in malformed:
            delivered = []
            for decoder_type in (_ChunkedBodyDecoder, _ChunkedTransferDecoder):
                decoded = _Decoded(decoder_type)
                self.assertRaises(_MalformedChunkedDataError, decoded.feed, b"2\r\nok\r\n" + body)
                delivered.append(b"".join(decoded.pieces))
            self.assertEqual(delivered[0], delivered[1], body)
            self.assertTrue(delivered[0].startswith(b"ok"), body)

    def test_trailer_too_long_in_small_reads(self) -> None:
        decoded = _Decoded(_ChunkedBodyDecoder)
        decoded.feed(b"0\r\n")
        line = b"Trailer: " + b"x" * 1000 + b"\r\n"
        with self.assertRaises(_MalformedChunkedDataError):
            for _ in range(100):
                for at in range(0, len(line), 100):
                    decoded.feed(line[at : at + 100])
        self.assertEqual(decoded.finished, [])

    def test_ended_early(self) -> None:
        """The connection closing before the last chunk is data loss."""
        decoded = _Decoded(_ChunkedBodyDecoder)
        decoded.feed(CHUNKED[:40])
        self.assertRaises(_DataLoss, decoded.decoder.noMoreData)
        decoded.feed(CHUNKED[40:])
        decoded.decoder.noMoreData()

    def test_nothing_after_the_end(self) -> None:
        decoded = _Decoded(_ChunkedBodyDecoder)
        decoded.feed(b"0\r\n\r\n")
        self.assertRaises(RuntimeError, decoded.decoder.dataReceived, b"1\r\nx\r\n")


EVENT = b'data: {"choices":[{"delta":{"content":"one"}}]}\n\n'
EVENT2 = b'data: {"choices":[{"delta":{"content":"two"}}]}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RelayInMemoryTests(SynchronousTestCase):
    """
    A stream relayed between Twisted's real HTTP client and server objects,
    over memory: the client's bytes, exactly, read by read.
    """

    def setUp(self) -> None:
        factory = _QuietFactory(lambda _: None, "upstream")
        self.upstream = factory.buildProtocol(None)
        self.upstream.makeConnection(StringTransport())
        responses: list[IResponse] = []
        sent = ClientRequest(b"POST", b"/", Headers({b"host": [b"x"]}), None)
        self.upstream.request(sent).addCallback(responses.append)
        self.upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        channel = http.HTTPChannel()
        channel.site = Site(Resource())  # type: ignore[attr-defined]
        channel.timeOut = None
        self.client = StringTransport()
        channel.makeConnection(self.client)
        self.request = GatewayRequest(channel, False)
        self.request.clientproto = b"HTTP/1.1"
        self.request.method = b"POST"
        channel.requests.append(self.request)
        self.record = RequestRecord("id", 0.0, "127.0.0.1", "POST", "/v1/chat/completions")
        self.relay = EventStreamRelay(self.request, Clock(), 10, record=self.record)
        [response] = responses
        response.deliverBody(self.relay)
        self.relay.done.addCallback(lambda _: setattr(self, "ended", True))
        self.ended = False

    def body(self) -> bytes:
        """The response body so far, as the client got it: chunk framing and all."""
        written: bytes = self.client.value()
        return written.partition(b"\r\n\r\n")[2]

    def test_each_read_one_chunk(self) -> None:
        """
        Two events in one upstream read reach the client as one chunk; an
        event cut across reads is written at once, and its end with the next
        read.
        """
        self.upstream.dataReceived(chunk(EVENT) + chunk(EVENT2))
        self.assertEqual(self.body(), chunk(EVENT + EVENT2))
        self.upstream.dataReceived(b"%x\r\n%s" % (len(EVENT), EVENT[:10]))
        self.assertEqual(self.body(), chunk(EVENT + EVENT2) + chunk(EVENT[:10]))
        self.upstream.dataReceived(EVENT[10:] + b"\r\n" + chunk(EVENT2)[:5])
        self.assertEqual(
            self.body(),
            chunk(EVENT + EVENT2) + chunk(EVENT[:10]) + chunk(EVENT[10:] + EVENT2[:1]),
        )
        self.upstream.dataReceived(chunk(EVENT2)[5:] + b"0\r\n\r\n")
        self.assertEqual(
            self.body(),
            chunk(EVENT + EVENT2)
            + chunk(EVENT[:10])
            + chunk(EVENT[10:] + EVENT2[:1])
            + chunk(EVENT2[1:])
            + b"0\r\n\r\n",
        )
        self.assertTrue(self.ended)
        self.assertTrue(self.request.finished)
        self.assertEqual(self.request.sentLength, len(EVENT + EVENT2) * 2)
        self.assertEqual(self.record.ttft, 0.0)

    def test_headers_once(self) -> None:
        """The first read sends the headers, hardened; the rest only chunks."""
        self.upstream.dataReceived(chunk(EVENT))
        self.upstream.dataReceived(chunk(EVENT2))
        head, _, body = self.client.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertIn(b"\r\nTransfer-Encoding: chunked", head)
        self.assertIn(b"\r\nX-Frame-Options: DENY", head)
        self.assertEqual(body, chunk(EVENT) + chunk(EVENT2))

    def test_client_gone(self) -> None:
        """Once the client went away, nothing more is written for it."""
        self.upstream.dataReceived(chunk(EVENT))
        written = self.client.value()
        self.request.connectionLost(Failure(ConnectionError("gone")))
        self.upstream.dataReceived(chunk(EVENT2))
        self.assertEqual(self.client.value(), written)

    def test_broken_framing(self) -> None:
        """Malformed framing ends the stream with an error event, after what came before it."""
        self.upstream.dataReceived(chunk(EVENT) + b"zz\r\n")
        self.assertTrue(self.ended)
        body = self.body()
        self.assertTrue(body.startswith(chunk(EVENT)), body)
        self.assertIn(b"upstream_bad_response", body)
        self.assertTrue(body.endswith(b"\r\n0\r\n\r\n"), body)
        self.assertEqual(self.record.stream_abort, "upstream_broke")


class ScriptedStream(Protocol):
    """A plain-HTTP model server whose stream the test writes, piece by piece."""

    factory: ScriptedStreamFactory
    transport: Any

    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, found, body = self.buffer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        if found and len(body) == length:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            self.factory.streams.append(self)


class ScriptedStreamFactory(Factory):
    protocol = ScriptedStream  # type: ignore[assignment]

    def __init__(self) -> None:
        self.streams: list[ScriptedStream] = []


class StreamFramingTests(TestCase):
    """Over real sockets: what one upstream read brings, the client gets at once, exactly."""

    @inline
    async def test_reads_relayed_exactly_and_at_once(self) -> None:
        """
        An event cut across reads is relayed before its end exists; a read
        holding the end of one event and the start of the next (cut inside
        the word C{usage}) reaches the client as one chunk; the token counts
        are read all the same.
        """
        factory = ScriptedStreamFactory()
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        config = gateway_config(aihostport=listening.getHost().port, aischeme="http")
        gateway = start_gateway(self, config)
        sock = raw_request(self, gateway.port, chat_body(stream=True))
        await eventually(lambda: len(factory.streams) == 1)
        [upstream] = factory.streams
        received = bytearray()

        def body_is(expected: bytes) -> Callable[[], bool]:
            def check() -> bool:
                try:
                    received.extend(sock.recv(65536))
                except BlockingIOError:
                    pass
                return bytes(received).partition(b"\r\n\r\n")[2] == expected

            return check

        usage = StreamUsageTests.USAGE
        cut = usage.index(b'"usage"') + 3
        upstream.transport.write(b"%x\r\n%s" % (len(EVENT), EVENT[:10]))
        expected = chunk(EVENT[:10])
        await eventually(body_is(expected))
        upstream.transport.write(EVENT[10:] + b"\r\n" + chunk(usage[:cut]))
        expected += chunk(EVENT[10:] + usage[:cut])
        await eventually(body_is(expected))
        upstream.transport.write(chunk(usage[cut:] + b"data: [DONE]\n\n") + b"0\r\n\r\n")
        expected += chunk(usage[cut:] + b"data: [DONE]\n\n") + b"0\r\n\r\n"
        await eventually(body_is(expected))
        await eventually(lambda: len(gateway.records) == 1)
        [record] = gateway.records
        self.assertEqual((record.status, record.stream_abort), (200, None))
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (12, 7))
        self.assertEqual(record.bytes_out, len(EVENT + usage) + len(b"data: [DONE]\n\n"))


class _HeldAgent:
    """An agent that keeps each request's body producer, and answers when told."""

    def __init__(self) -> None:
        self.producers: list[Any] = []
        self.replies: list[Deferred[Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any, producer: Any) -> Deferred[Any]:
        self.producers.append(producer)
        self.replies.append(Deferred())
        return self.replies[-1]


class BodyKeptTests(SynchronousTestCase):
    """A request's body is kept for a resend until the reply's headers arrive, and no longer."""

    def setUp(self) -> None:
        self.client = UpstreamClient(task.Clock(), gateway_config(aischeme="http"))
        self.agent = _HeldAgent()
        self.client.agent = self.agent  # type: ignore[assignment]

    def test_kept_until_the_reply(self) -> None:
        """Until the headers arrive the body may be written again (a stale connection)."""
        self.client.send(b"POST", CHAT, b'{"x":1}', None, 10.0)
        [producer] = self.agent.producers
        self.assertEqual((producer.body, producer.length), (b'{"x":1}', 7))

    def test_let_go_once_replied(self) -> None:
        """A stream lives long after its headers: its request body is not kept with it."""
        sent = self.client.send(b"POST", CHAT, b'{"x":1}', None, 10.0)
        response = object()
        self.agent.replies[0].callback(response)
        self.assertIs(self.successResultOf(sent), response)
        [producer] = self.agent.producers
        self.assertEqual((producer.body, producer.length), (b"", 7))
