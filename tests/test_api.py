"""Tests for L{llmgw.api}: the request path, over real loopback sockets and real TLS."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from llmgw.devtls import make_ca
from llmgw.headers import HARDENING_HEADERS
from llmgw.keys import KeyRing
from llmgw.mock import DEFAULT_MODEL, Behaviour
from llmgw.ratelimit import SlidingWindowLimiter
from tests.loopback import (
    JSON_HEADERS,
    Gateway,
    Reply,
    Upstream,
    chat_body,
    eventually,
    free_port,
    gateway_config,
    http_post,
    inline,
    reactor,
    replicas_config,
    request,
    start_gateway,
    start_upstream,
    write_ca,
)
from tests.test_health import start_checks


class HeadersMixin:
    def assertHardened(self: TestCase, reply: Reply) -> None:  # type: ignore[misc]
        for name, value in HARDENING_HEADERS:
            self.assertEqual(reply.headers.getRawHeaders(name), [value], name)
        self.assertIsNone(reply.headers.getRawHeaders(b"Server"))
        self.assertIsNone(reply.headers.getRawHeaders(b"X-Powered-By"))

    def assertError(  # type: ignore[misc]
        self: TestCase,
        reply: Reply,
        status: int,
        type: str,
        param: str | None = None,
        code: str | None = None,
    ) -> dict[str, object]:
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.header(b"Content-Type"), b"application/json")
        error = reply.json()["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual((error["type"], error["param"], error["code"]), (type, param, code))
        self.assertIsInstance(error["message"], str)
        self.assertNotIn("Traceback", error["message"])
        return error  # type: ignore[no-any-return]


class RoundTripTests(HeadersMixin, TestCase):
    """A client, the gateway and the stand-in model, over HTTPS with a test-made CA."""

    @inline
    async def test_completion(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, body=chat_body("Hello there", temperature=0.7))
        self.assertEqual(reply.status, 200, reply.body)
        self.assertHardened(reply)
        document = reply.json()
        self.assertEqual(document["object"], "chat.completion")
        self.assertEqual(document["model"], "TheBloke/Mistral-7B-Instruct-v0.2-AWQ")
        self.assertEqual(document["choices"][0]["message"]["content"], "Hello there")
        self.assertEqual(document["choices"][0]["finish_reason"], "stop")
        self.assertEqual(set(document["usage"]) >= {"prompt_tokens", "completion_tokens"}, True)
        self.assertEqual(upstream.model.completed, 1)

    @inline
    async def test_named_model_passes_through(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, body=chat_body(model="my-model", seed=7))
        self.assertEqual(reply.json()["model"], "my-model")

    @inline
    async def test_upstream_error_passes_through(self) -> None:
        """A JSON 500 from the model server reaches the client unchanged."""
        upstream = start_upstream(self, defaults=Behaviour(fault="500"))
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, body=chat_body())
        self.assertEqual(reply.status, 500)
        self.assertIn("error", reply.json())
        self.assertHardened(reply)

    @inline
    async def test_models(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, "GET", b"/v1/models")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["data"][0]["id"], "TheBloke/Mistral-7B-Instruct-v0.2-AWQ")
        self.assertHardened(reply)

    @inline
    async def test_plain_http_upstream(self) -> None:
        upstream = start_upstream(self, tls=False)
        gateway = start_gateway(self, gateway_config(upstream, aischeme="http"))
        reply = await request(self, gateway.port, body=chat_body("plain"))
        self.assertEqual(reply.json()["choices"][0]["message"]["content"], "plain")


class ClientErrorTests(HeadersMixin, TestCase):
    """Each error a client can cause, with its status, shape and headers."""

    def setUp(self) -> None:
        self.upstream = start_upstream(self)
        self.gateway = start_gateway(self, gateway_config(self.upstream))

    def tearDown(self) -> None:
        self.assertEqual(self.upstream.model.started, 0, "an invalid request was forwarded")

    @inline
    async def test_temperature(self) -> None:
        reply = await request(self, self.gateway.port, body=chat_body(temperature=1.5))
        error = self.assertError(reply, 400, "invalid_request_error", "temperature")
        self.assertEqual(error["message"], "Temperature must be between 0.1 and 1.0")
        self.assertHardened(reply)

    @inline
    async def test_malformed_json(self) -> None:
        reply = await request(self, self.gateway.port, body=b'{"messages": [')
        self.assertError(reply, 400, "invalid_request_error")
        self.assertHardened(reply)

    @inline
    async def test_bad_role_names_the_field(self) -> None:
        body = json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}
        ).encode()
        reply = await request(self, self.gateway.port, body=body)
        self.assertError(reply, 400, "invalid_request_error", "messages[1].role")

    @inline
    async def test_get_is_405(self) -> None:
        reply = await request(self, self.gateway.port, "GET")
        self.assertError(reply, 405, "invalid_request_error", code="method_not_allowed")
        self.assertEqual(reply.header(b"Allow"), b"POST")
        self.assertHardened(reply)

    @inline
    async def test_post_models_is_405(self) -> None:
        reply = await request(self, self.gateway.port, "POST", b"/v1/models", body=b"{}")
        self.assertError(reply, 405, "invalid_request_error", code="method_not_allowed")
        self.assertEqual(reply.header(b"Allow"), b"GET")

    @inline
    async def test_unknown_path_is_404(self) -> None:
        reply = await request(self, self.gateway.port, "GET", b"/v1/engines")
        self.assertError(reply, 404, "invalid_request_error", code="not_found")
        self.assertHardened(reply)

    @inline
    async def test_wrong_content_type_is_415(self) -> None:
        reply = await request(
            self, self.gateway.port, body=chat_body(), headers={b"Content-Type": [b"text/plain"]}
        )
        self.assertError(reply, 415, "invalid_request_error", code="unsupported_media_type")
        self.assertHardened(reply)

    @inline
    async def test_content_type_parameters_allowed(self) -> None:
        headers = {b"Content-Type": [b"Application/JSON; charset=utf-8"]}
        reply = await request(self, self.gateway.port, body=b"[]", headers=headers)
        # Past the media type check: the body is what is wrong now.
        self.assertError(reply, 400, "invalid_request_error")

    @inline
    async def test_body_over_limit_is_413(self) -> None:
        gateway = start_gateway(self, gateway_config(self.upstream, max_body=100))
        reply = await request(self, gateway.port, body=chat_body("x" * 200))
        self.assertError(reply, 413, "invalid_request_error", code="request_too_large")
        self.assertHardened(reply)

    @inline
    async def test_healthz(self) -> None:
        reply = await request(self, self.gateway.port, "GET", b"/healthz")
        self.assertEqual((reply.status, reply.json()), (200, {"status": "ok"}))
        self.assertHardened(reply)


class UpstreamFailureTests(HeadersMixin, TestCase):
    """Every way the model server can fail is a 502 or a 504 in the error shape."""

    @inline
    async def test_untrusted_certificate(self) -> None:
        upstream = start_upstream(self)
        stranger = write_ca(self, make_ca("Some other CA"))
        gateway = start_gateway(self, gateway_config(upstream, aica=stranger))
        reply = await request(self, gateway.port, body=chat_body())
        error = self.assertError(reply, 502, "api_error", code="upstream_unreachable")
        self.assertIn("TLS", str(error["message"]))
        self.assertHardened(reply)
        self.assertEqual(upstream.model.started, 0)

    @inline
    async def test_wrong_hostname(self) -> None:
        upstream = start_upstream(self, hostnames=("wrong.example",), ips=())
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, body=chat_body())
        error = self.assertError(reply, 502, "api_error", code="upstream_unreachable")
        self.assertIn("TLS", str(error["message"]))
        self.assertEqual(upstream.model.started, 0)

    @inline
    async def test_upstream_down(self) -> None:
        gateway = start_gateway(self, gateway_config(aihostport=free_port(), aischeme="http"))
        reply = await request(self, gateway.port, body=chat_body())
        error = self.assertError(reply, 502, "api_error", code="upstream_unreachable")
        self.assertIn("refused", str(error["message"]))
        self.assertHardened(reply)

    @inline
    async def test_not_json(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(fault="garbage"))
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, body=chat_body())
        self.assertError(reply, 502, "api_error", code="upstream_bad_response")
        self.assertHardened(reply)

    @inline
    async def test_slower_than_timeout(self) -> None:
        """Past --timeout the client gets a 504 and the upstream connection is closed."""
        clock = Clock()
        upstream = start_upstream(self, defaults=Behaviour(fault="hang"))
        gateway = start_gateway(self, gateway_config(upstream, timeout=5), clock=clock)
        reply_d = Deferred.fromCoroutine(request(self, gateway.port, body=chat_body()))
        await eventually(lambda: upstream.model.started == 1)
        clock.advance(4.9)
        self.assertNoResult(reply_d)
        clock.advance(0.2)
        reply = await reply_d
        error = self.assertError(reply, 504, "api_error", code="upstream_timeout")
        self.assertIn("5 seconds", str(error["message"]))
        self.assertHardened(reply)
        await eventually(lambda: upstream.model.cancelled == 1)

    @inline
    async def test_readyz(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, "GET", b"/readyz")
        self.assertEqual((reply.status, reply.json()), (200, {"status": "ready"}))

    @inline
    async def test_readyz_down(self) -> None:
        gateway = start_gateway(self, gateway_config(aihostport=free_port(), aischeme="http"))
        reply = await request(self, gateway.port, "GET", b"/readyz")
        error = self.assertError(reply, 503, "api_error", code="upstream_unavailable")
        self.assertIn("refused", str(error["message"]))


class RateLimitTests(HeadersMixin, TestCase):
    """The limiter on the request path: headers on every /v1 reply, 429 past the limit."""

    @inline
    async def test_limit_and_retry_after(self) -> None:
        clock = Clock()
        upstream = start_upstream(self)
        config = gateway_config(upstream, rate_limit=2, rate_window=10)
        gateway = start_gateway(
            self, config, clock=clock, limiter=SlidingWindowLimiter(2, 10, clock)
        )
        first = await request(self, gateway.port, body=chat_body())
        self.assertEqual(first.header(b"RateLimit-Policy"), b'"default";q=2;w=10')
        self.assertEqual(first.header(b"RateLimit"), b'"default";r=1;t=10')
        clock.advance(3)
        second = await request(self, gateway.port, body=chat_body())
        self.assertEqual(second.status, 200)
        third = await request(self, gateway.port, body=chat_body())
        error = self.assertError(third, 429, "rate_limit_error", code="rate_limit_exceeded")
        self.assertIn("Retry after 7 seconds", str(error["message"]))
        self.assertEqual(third.header(b"Retry-After"), b"7")
        self.assertEqual(third.header(b"RateLimit"), b'"default";r=0;t=7')
        self.assertEqual(third.header(b"x-ratelimit-remaining-requests"), b"0")
        self.assertHardened(third)
        self.assertEqual(upstream.model.started, 2, "a refused request was forwarded")
        clock.advance(7)
        fourth = await request(self, gateway.port, body=chat_body())
        self.assertEqual(fourth.status, 200)

    @inline
    async def test_refusal_comes_before_validation(self) -> None:
        """Over the limit, even a broken body gets the 429, and it is not counted again."""
        clock = Clock()
        upstream = start_upstream(self)
        gateway = start_gateway(
            self, gateway_config(upstream), clock=clock, limiter=SlidingWindowLimiter(1, 10, clock)
        )
        invalid = await request(self, gateway.port, body=b"{not json")
        self.assertError(invalid, 400, "invalid_request_error")
        self.assertEqual(invalid.header(b"RateLimit"), b'"default";r=0;t=10')
        refused = await request(self, gateway.port, body=b"{not json")
        self.assertError(refused, 429, "rate_limit_error", code="rate_limit_exceeded")

    @inline
    async def test_healthz_not_limited(self) -> None:
        clock = Clock()
        gateway = start_gateway(
            self, gateway_config(), clock=clock, limiter=SlidingWindowLimiter(1, 10, clock)
        )
        for _ in range(3):
            reply = await request(self, gateway.port, "GET", b"/healthz")
            self.assertEqual(reply.status, 200)
            self.assertIsNone(reply.header(b"RateLimit"))


class KeyTests(HeadersMixin, TestCase):
    """Client keys (--api-keys-file) and the upstream key (--aikey-file)."""

    def keys(self, aikey: bytes | None, clients: bytes | None) -> KeyRing:
        paths: list[str | None] = []
        for content in (aikey, clients):
            if content is None:
                paths.append(None)
                continue
            path = self.mktemp()
            with open(path, "wb") as f:
                f.write(content)
            paths.append(path)
        return KeyRing(paths[0], paths[1])

    @inline
    async def test_missing_or_wrong_key_is_401(self) -> None:
        upstream = start_upstream(self)
        keys = self.keys(None, b"# clients\nsk-good\n")
        gateway = start_gateway(self, gateway_config(upstream), keys=keys)
        for headers in (
            dict(JSON_HEADERS),
            {**JSON_HEADERS, b"Authorization": [b"Bearer sk-bad"]},
            {**JSON_HEADERS, b"Authorization": [b"Basic sk-good"]},
        ):
            reply = await request(self, gateway.port, body=chat_body(), headers=headers)
            error = self.assertError(reply, 401, "invalid_request_error", code="invalid_api_key")
            self.assertNotIn("sk-", str(error["message"]))
            self.assertHardened(reply)
        self.assertEqual(upstream.model.started, 0)
        good = {**JSON_HEADERS, b"Authorization": [b"Bearer sk-good"]}
        reply = await request(self, gateway.port, body=chat_body(), headers=good)
        self.assertEqual(reply.status, 200)

    @inline
    async def test_upstream_key_replaces_clients(self) -> None:
        upstream = start_upstream(self)
        keys = self.keys(b"sk-upstream\n", None)
        gateway = start_gateway(self, gateway_config(upstream), keys=keys)
        headers = {**JSON_HEADERS, b"Authorization": [b"Bearer sk-client"]}
        reply = await request(self, gateway.port, body=chat_body(), headers=headers)
        self.assertEqual(reply.status, 200)
        self.assertEqual(upstream.model.last_authorization, b"Bearer sk-upstream")

    @inline
    async def test_client_key_passes_through_without_upstream_key(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        headers = {**JSON_HEADERS, b"Authorization": [b"Bearer sk-client"]}
        reply = await request(self, gateway.port, body=chat_body(), headers=headers)
        self.assertEqual(reply.status, 200)
        self.assertEqual(upstream.model.last_authorization, b"Bearer sk-client")


class ForwardedForTests(TestCase):
    """X-Forwarded-For is believed only from --trusted-proxy peers."""

    async def two_clients(self, trusted: bool) -> list[int]:
        clock = Clock()
        upstream = start_upstream(self)
        proxies = (ipaddress.ip_network("127.0.0.0/8"),) if trusted else ()
        config = gateway_config(upstream, rate_limit=1, trusted_proxies=proxies)
        gateway = start_gateway(
            self, config, clock=clock, limiter=SlidingWindowLimiter(1, 60, clock)
        )
        statuses = []
        for client in (b"198.51.100.7", b"198.51.100.8"):
            headers = {**JSON_HEADERS, b"X-Forwarded-For": [client]}
            reply = await request(self, gateway.port, body=chat_body(), headers=headers)
            statuses.append(reply.status)
        return statuses

    @inline
    async def test_untrusted_peer_cannot_spoof(self) -> None:
        self.assertEqual(await self.two_clients(trusted=False), [200, 429])

    @inline
    async def test_trusted_proxy_is_believed(self) -> None:
        self.assertEqual(await self.two_clients(trusted=True), [200, 200])


class WholeReplyDeadlineTests(HeadersMixin, TestCase):
    """--timeout bounds the whole reply that is not streamed, headers and body together."""

    @inline
    async def test_body_gets_what_is_left(self) -> None:
        clock = Clock()
        server = HeadersOnDemand()
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        config = gateway_config(aihostport=port.getHost().port, aischeme="http", timeout=5)
        gateway = start_gateway(self, config, clock=clock)
        reply_d = Deferred.fromCoroutine(request(self, gateway.port, body=chat_body()))
        await eventually(lambda: server.waiting is not None)
        clock.advance(3)
        server.send_headers()
        await eventually(lambda: server.sent)
        clock.advance(1.9)
        self.assertNoResult(reply_d)
        clock.advance(0.2)
        reply = await reply_d
        error = self.assertError(reply, 504, "api_error", code="upstream_timeout")
        self.assertIn("5 seconds", str(error["message"]))


class HeadersOnDemand(Factory):
    """A model server that sends a reply's headers when told, and then half a body, forever."""

    def __init__(self) -> None:
        self.waiting: Any = None
        self.sent = False

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = Protocol()
        protocol.dataReceived = lambda data: setattr(self, "waiting", protocol)  # type: ignore[method-assign]
        return protocol

    def send_headers(self) -> None:
        self.waiting.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"id": '
        )
        self.sent = True


class ReplicaTests(HeadersMixin, TestCase):
    """Several stand-in models as --upstream replicas, over TLS on loopback."""

    def replicas(self, *behaviours: Behaviour, models: tuple[str, ...] = ()) -> list[Upstream]:
        ca = make_ca()
        names = models or (DEFAULT_MODEL,) * len(behaviours)
        return [
            start_upstream(self, ca=ca, defaults=behaviour, served_model=name)
            for behaviour, name in zip(behaviours, names, strict=True)
        ]

    def gateway(self, replicas: list[Upstream], dead: int = 0, **overrides: Any) -> Gateway:
        ports = [replica.port for replica in replicas] + [free_port() for _ in range(dead)]
        ca_file = replicas[0].ca_file if replicas else write_ca(self, make_ca())
        return start_gateway(self, replicas_config(ca_file, ports, **overrides))

    def check_health(self, gateway: Gateway) -> list[tuple[str, bool]]:
        """Run the parent's checks in process, every 0.1 s, into the gateway's router."""
        changes: list[tuple[str, bool]] = []

        def changed(name: str, up: bool, models: Any) -> None:
            changes.append((name, up))
            gateway.resource.router.set_health(name, up, models)

        start_checks(self, gateway.resource.config, changed)
        return changes

    def assertNoDrift(self, gateway: Gateway) -> None:
        self.assertEqual(
            [r.in_flight for r in gateway.resource.router.replicas],
            [0] * len(gateway.resource.router.replicas),
        )

    @inline
    async def test_load_is_shared(self) -> None:
        replicas = self.replicas(Behaviour(), Behaviour())
        gateway = self.gateway(replicas)
        statuses = [(await request(self, gateway.port, body=chat_body())).status for _ in range(20)]
        self.assertEqual(statuses, [200] * 20)
        started = [replica.model.started for replica in replicas]
        self.assertEqual(sum(started), 20)
        self.assertNotIn(0, started)
        self.assertNoDrift(gateway)

    @inline
    async def test_model_goes_where_it_is_served(self) -> None:
        """A model goes only to the replicas that list it; an unknown one to any."""
        replicas = self.replicas(Behaviour(), Behaviour(), models=("llama", "qwen"))
        gateway = self.gateway(replicas)
        changes = self.check_health(gateway)
        await eventually(lambda: len(changes) == 2)
        for _ in range(6):
            reply = await request(self, gateway.port, body=chat_body(model="qwen"))
            self.assertEqual(reply.status, 200)
        self.assertEqual([r.model.started for r in replicas], [0, 6])
        for _ in range(20):
            await request(self, gateway.port, body=chat_body(model="mistral"))
        self.assertEqual(sum(r.model.started for r in replicas), 26)
        self.assertGreater(replicas[0].model.started, 0)

    @inline
    async def test_models_are_the_union(self) -> None:
        replicas = self.replicas(
            Behaviour(), Behaviour(), Behaviour(), models=("llama", "qwen", "llama")
        )
        gateway = self.gateway(replicas)
        changes = self.check_health(gateway)
        await eventually(lambda: len(changes) == 3)
        reply = await request(self, gateway.port, "GET", b"/v1/models")
        self.assertEqual(reply.status, 200)
        listing = reply.json()
        self.assertEqual(listing["object"], "list")
        self.assertEqual([entry["id"] for entry in listing["data"]], ["llama", "qwen"])
        self.assertHardened(reply)

    @inline
    async def test_refused_replica_is_skipped(self) -> None:
        """A replica that refuses connections fails no request, and is avoided after."""
        (live,) = self.replicas(Behaviour())
        gateway = self.gateway([live], dead=1)
        statuses = [(await request(self, gateway.port, body=chat_body())).status for _ in range(10)]
        self.assertEqual(statuses, [200] * 10)
        dead = gateway.resource.router.replicas[1]
        self.assertLessEqual(dead.failures, 1)
        self.assertEqual(live.model.started, 10)
        self.assertNoDrift(gateway)

    @inline
    async def test_503_goes_elsewhere(self) -> None:
        busy, calm = self.replicas(Behaviour(fault="503"), Behaviour())
        gateway = self.gateway([busy, calm])
        statuses = [(await request(self, gateway.port, body=chat_body())).status for _ in range(10)]
        self.assertEqual(statuses, [200] * 10)
        self.assertEqual(calm.model.started, 10)
        self.assertNoDrift(gateway)

    @inline
    async def test_lone_503_passes_through(self) -> None:
        (busy,) = self.replicas(Behaviour(fault="503"))
        gateway = self.gateway([busy])
        reply = await request(self, gateway.port, body=chat_body())
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.json()["error"]["message"], "mock fault: service unavailable")

    @inline
    async def test_retries_are_bounded(self) -> None:
        """With --retries 1, the second replica's 503 is the answer."""
        replicas = self.replicas(
            Behaviour(fault="503"), Behaviour(fault="503"), Behaviour(fault="503")
        )
        gateway = self.gateway(replicas, retries=1)
        reply = await request(self, gateway.port, body=chat_body())
        self.assertEqual(reply.status, 503)
        self.assertEqual(sum(r.model.started for r in replicas), 2)

    @inline
    async def test_500_and_429_are_not_retried(self) -> None:
        for fault in ("500", "429"):
            failing, calm = self.replicas(Behaviour(fault=fault), Behaviour())
            gateway = self.gateway([failing, calm])
            statuses = [
                (await request(self, gateway.port, body=chat_body())).status for _ in range(12)
            ]
            self.assertEqual(failing.model.started + calm.model.started, 12)
            self.assertEqual(statuses.count(int(fault)), failing.model.started)
            self.assertGreater(failing.model.started, 0)

    @inline
    async def test_all_down(self) -> None:
        gateway = self.gateway([], dead=2)
        changes = self.check_health(gateway)
        reply = await request(self, gateway.port, body=chat_body())
        error = self.assertError(reply, 502, "api_error", code="upstream_unreachable")
        self.assertIn("refused", str(error["message"]))
        self.assertHardened(reply)
        await eventually(lambda: len(changes) == 2)
        ready = await request(self, gateway.port, "GET", b"/readyz")
        error = self.assertError(ready, 503, "api_error", code="upstream_unavailable")
        for replica in gateway.resource.config.upstreams:
            self.assertIn(f"{replica} down", str(error["message"]))
        self.assertNoDrift(gateway)

    @inline
    async def test_readyz_lists_replicas(self) -> None:
        (live,) = self.replicas(Behaviour())
        gateway = self.gateway([live], dead=1)
        changes = self.check_health(gateway)
        await eventually(lambda: len(changes) == 2)
        reply = await request(self, gateway.port, "GET", b"/readyz")
        up, down = gateway.resource.config.upstreams
        self.assertEqual(
            (reply.status, reply.json()),
            (
                200,
                {
                    "status": "ready",
                    "upstreams": [
                        {"upstream": up, "state": "up"},
                        {"upstream": down, "state": "down"},
                    ],
                },
            ),
        )

    @inline
    async def test_cancelled_stream_releases_its_replica(self) -> None:
        """A client that leaves mid-stream ends the lease, so nothing drifts."""
        (slow,) = self.replicas(Behaviour(chunks=50, interval=0.05))
        gateway = self.gateway([slow])
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        self.addCleanup(sock.close)
        sock.sendall(http_post(chat_body(stream=True)))
        await eventually(lambda: slow.model.started == 1)
        self.assertEqual(gateway.resource.router.replicas[0].in_flight, 1)
        sock.close()
        await eventually(lambda: slow.model.cancelled == 1)
        await eventually(lambda: gateway.resource.router.replicas[0].in_flight == 0)


#: What a request id the gateway makes looks like: 12 hex digits, then a counter.
MADE_ID = rb"\A[0-9a-f]{20}\Z"


class RequestIdTests(HeadersMixin, TestCase):
    """
    Every response carries C{x-request-id}, and the model server gets the
    same id as C{X-Request-Id}; an incoming one is kept only from a trusted
    proxy, and only if it looks like an id.
    """

    def gateway(self, upstream: Upstream, trusted: bool = False, **overrides: Any) -> Gateway:
        proxies = (ipaddress.ip_network("127.0.0.1/32"),) if trusted else ()
        return start_gateway(self, gateway_config(upstream, trusted_proxies=proxies, **overrides))

    async def chat(self, gateway: Gateway, incoming: bytes | None = None) -> Reply:
        headers = dict(JSON_HEADERS)
        if incoming is not None:
            headers[b"X-Request-Id"] = [incoming]
        return await request(self, gateway.port, body=chat_body(), headers=headers)

    @inline
    async def test_made_and_sent_upstream(self) -> None:
        upstream = start_upstream(self)
        gateway = self.gateway(upstream)
        first = await self.chat(gateway)
        second = await self.chat(gateway)
        self.assertEqual((first.status, second.status), (200, 200))
        ids = [first.header(b"x-request-id"), second.header(b"x-request-id")]
        for made in ids:
            assert made is not None
            self.assertRegex(made, MADE_ID)
        self.assertNotEqual(ids[0], ids[1])
        self.assertEqual(upstream.model.request_ids, ids)
        self.assertEqual([record.request_id.encode() for record in gateway.records], ids)

    @inline
    async def test_untrusted_peer_id_replaced(self) -> None:
        upstream = start_upstream(self)
        gateway = self.gateway(upstream)
        reply = await self.chat(gateway, b"client-chosen-1")
        made = reply.header(b"x-request-id")
        assert made is not None
        self.assertRegex(made, MADE_ID)
        self.assertEqual(upstream.model.request_ids, [made])

    @inline
    async def test_trusted_proxy_id_kept(self) -> None:
        upstream = start_upstream(self)
        gateway = self.gateway(upstream, trusted=True)
        incoming = b"edge:1701.A_b-" + b"9" * 114
        self.assertEqual(len(incoming), 128)
        reply = await self.chat(gateway, incoming)
        self.assertEqual(reply.header(b"x-request-id"), incoming)
        self.assertEqual(upstream.model.request_ids, [incoming])
        self.assertEqual(gateway.records[0].request_id, incoming.decode())

    @inline
    async def test_trusted_proxy_malformed_id_replaced(self) -> None:
        upstream = start_upstream(self)
        gateway = self.gateway(upstream, trusted=True)
        for incoming in (b"has space", b"semi;colon", b"x" * 129, b"caf\xc3\xa9", b""):
            reply = await self.chat(gateway, incoming)
            made = reply.header(b"x-request-id")
            assert made is not None
            self.assertRegex(made, MADE_ID)
            self.assertEqual(upstream.model.last_request_id, made)

    @inline
    async def test_on_every_error(self) -> None:
        """400, 401, 404, 413, 429 and 502, each with the id of its own record."""
        upstream = start_upstream(self)
        clock = Clock()
        keyfile = self.mktemp()
        with open(keyfile, "w") as f:
            f.write("sk-client\n")
        keys = KeyRing(None, keyfile)
        gateway = start_gateway(
            self,
            gateway_config(upstream, max_body=300, rate_limit=2),
            clock=clock,
            limiter=SlidingWindowLimiter(2, 60, clock),
            keys=keys,
        )
        auth = {**JSON_HEADERS, b"Authorization": [b"Bearer sk-client"]}
        replies = [
            await request(self, gateway.port, body=chat_body(temperature=3), headers=auth),
            await request(self, gateway.port, body=chat_body()),
            await request(self, gateway.port, "GET", b"/v1/nowhere"),
            await request(self, gateway.port, body=chat_body("x" * 400), headers=auth),
            await request(self, gateway.port, body=chat_body(), headers=auth),
            await request(self, gateway.port, body=chat_body(), headers=auth),
        ]
        self.assertEqual([reply.status for reply in replies], [400, 401, 404, 413, 200, 429])
        ids = [reply.header(b"x-request-id") for reply in replies]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual([record.request_id.encode() for record in gateway.records], ids)
        self.assertEqual(
            [record.rejected for record in gateway.records],
            ["validation", "auth", None, "too_large", None, "rate_limit"],
        )
        self.assertEqual(
            [record.status for record in gateway.records], [400, 401, 404, 413, 200, 429]
        )
        down = start_gateway(self, gateway_config(aihostport=free_port(), aischeme="http"))
        reply = await request(self, down.port, body=chat_body())
        self.assertError(reply, 502, "api_error", code="upstream_unreachable")
        [record] = down.records
        self.assertEqual(reply.header(b"x-request-id"), record.request_id.encode())
        self.assertEqual([a.outcome for a in record.attempts], ["unreachable"])

    @inline
    async def test_refusal_reason_is_the_status_sent(self) -> None:
        """An invalid body from a client without a key, or over its limit: auth, rate_limit."""
        upstream = start_upstream(self)
        clock = Clock()
        keyfile = self.mktemp()
        with open(keyfile, "w") as f:
            f.write("sk-client\n")
        gateway = start_gateway(
            self,
            gateway_config(upstream, rate_limit=1),
            clock=clock,
            limiter=SlidingWindowLimiter(1, 60, clock),
            keys=KeyRing(None, keyfile),
        )
        auth = {**JSON_HEADERS, b"Authorization": [b"Bearer sk-client"]}
        invalid = chat_body(temperature=3)
        replies = [
            await request(self, gateway.port, body=invalid),
            await request(self, gateway.port, body=invalid, headers=auth),
            await request(self, gateway.port, body=invalid, headers=auth),
        ]
        self.assertEqual([reply.status for reply in replies], [401, 400, 429])
        self.assertEqual(
            [record.rejected for record in gateway.records], ["auth", "validation", "rate_limit"]
        )

    @inline
    async def test_unique_per_attempt(self) -> None:
        """A refused replica and one that answers 503: three tries, three ids."""
        ca = make_ca()
        busy = start_upstream(self, ca=ca, defaults=Behaviour(fault="503"))
        calm = start_upstream(self, ca=ca)
        # The dead replica first, then the busy one, then the calm one.
        ports = [free_port(), busy.port, calm.port]
        config = replicas_config(busy.ca_file, ports, retries=2)
        gateway = start_gateway(self, config)
        router = gateway.resource.router
        self.patch(router, "choose", lambda model, tried: router.replicas[len(tried)])
        reply = await request(self, gateway.port, body=chat_body())
        self.assertEqual(reply.status, 200)
        made = reply.header(b"x-request-id")
        assert made is not None
        self.assertEqual(busy.model.request_ids, [made + b"-2"])
        self.assertEqual(calm.model.request_ids, [made + b"-3"])
        [record] = gateway.records
        self.assertEqual(
            [(a.upstream, a.outcome) for a in record.attempts],
            [
                (f"https://localhost:{ports[0]}", "unreachable"),
                (f"https://localhost:{busy.port}", "unavailable"),
                (f"https://localhost:{calm.port}", "ok"),
            ],
        )
        self.assertEqual(record.retry_reasons, ["unreachable", "unavailable"])
        self.assertEqual(record.upstream, f"https://localhost:{calm.port}")


class RecordTests(TestCase):
    """What the record of a request holds once it is finished."""

    @inline
    async def test_json_reply(self) -> None:
        upstream = start_upstream(self)
        gateway = start_gateway(self, gateway_config(upstream))
        headers = {**JSON_HEADERS, b"User-Agent": [b"tester/1.0"]}
        reply = await request(self, gateway.port, body=chat_body("one two three"), headers=headers)
        self.assertEqual(reply.status, 200)
        usage = reply.json()["usage"]
        [record] = gateway.records
        self.assertEqual(
            (record.prompt_tokens, record.completion_tokens),
            (usage["prompt_tokens"], usage["completion_tokens"]),
        )
        self.assertEqual(
            (record.method, record.route, record.client, record.user_agent, record.model),
            ("POST", "/v1/chat/completions", "127.0.0.1", "tester/1.0", DEFAULT_MODEL),
        )
        self.assertEqual((record.status, record.bytes_out), (200, len(reply.body)))
        self.assertEqual((record.stream, record.ttft, record.stream_abort), (False, None, None))
        self.assertEqual([a.outcome for a in record.attempts], ["ok"])
        assert record.duration is not None
        self.assertGreaterEqual(record.duration, 0)

    @inline
    async def test_stream_with_usage(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(interval=0.01, chunks=3))
        gateway = start_gateway(self, gateway_config(upstream))
        body = chat_body("four words in it", stream=True, stream_options={"include_usage": True})
        reply = await request(self, gateway.port, body=body)
        self.assertEqual(reply.status, 200)
        events = [json.loads(e[6:]) for e in reply.body.split(b"\n\n") if e[6:7] == b"{"]
        usage = events[-1]["usage"]
        [record] = gateway.records
        self.assertEqual(
            (record.prompt_tokens, record.completion_tokens),
            (usage["prompt_tokens"], usage["completion_tokens"]),
        )
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (4, 4))
        self.assertTrue(record.stream)
        assert record.ttft is not None and record.duration is not None
        self.assertLess(record.ttft, record.duration)
        self.assertEqual(record.stream_abort, None)
        self.assertEqual(record.bytes_out, len(reply.body))

    @inline
    async def test_stream_without_usage(self) -> None:
        upstream = start_upstream(self, defaults=Behaviour(interval=0))
        gateway = start_gateway(self, gateway_config(upstream))
        reply = await request(self, gateway.port, body=chat_body(stream=True))
        self.assertEqual(reply.status, 200)
        [record] = gateway.records
        self.assertEqual((record.prompt_tokens, record.completion_tokens), (None, None))
        self.assertIsNotNone(record.ttft)


class _HeldUpstream:
    """An upstream client whose replies the test gives."""

    def __init__(self) -> None:
        self.replies: list[Deferred[Any]] = []

    def send(self, *args: Any) -> Deferred[Any]:
        self.replies.append(Deferred())
        return self.replies[-1]


class DisconnectHookTests(TestCase):
    """What a request keeps to cancel its upstream request if the client goes away."""

    def setUp(self) -> None:
        from twisted.web.test.requesthelper import DummyChannel

        from llmgw.api import GatewayResource
        from llmgw.logs import RequestLog
        from llmgw.site import GatewayRequest

        clock = Clock()
        self.upstream = _HeldUpstream()
        self.resource = GatewayResource(
            gateway_config(),
            self.upstream,  # type: ignore[arg-type]
            clock,
            RequestLog(clock, verbose=False, colour=False),
        )
        self.request = GatewayRequest(DummyChannel())

    def test_cancels_while_waiting(self) -> None:
        """Before the reply's headers: a client that leaves cancels the upstream request."""
        sent = self.resource._send(self.request, b"POST", b"/", b"{}", 10.0)
        self.assertEqual(len(self.request.notifications), 1)
        self.request.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(sent, CancelledError)

    def test_let_go_once_replied(self) -> None:
        """After: nothing is left to cancel, and a stream does not keep the hook."""
        sent = self.resource._send(self.request, b"POST", b"/", b"{}", 10.0)
        response = object()
        self.upstream.replies[0].callback(response)
        self.assertIs(self.successResultOf(sent), response)
        self.assertEqual(self.request.notifications, [])
