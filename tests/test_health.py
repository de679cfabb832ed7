"""Tests for L{llmgw.health}: the parent's checks of the C{--upstream} replicas."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from llmgw import errors
from llmgw.devtls import issue_server_certificate, make_ca
from llmgw.health import (
    CHECK_DEADLINE,
    HealthChecker,
    Models,
    OnChange,
    decode_models,
    encode_models,
    parse_model_listing,
    state_name,
)
from llmgw.keys import KeyRing
from llmgw.options import Config
from llmgw.upstream import ReplicaUnreachable, UpstreamClient
from tests.loopback import (
    chat_body,
    eventually,
    free_port,
    inline,
    reactor,
    replicas_config,
    request,
    start_upstream,
)
from tests.test_cluster import GatewayProcess, serving

A = "https://a.test:8000"
B = "https://b.test:8000"
LLAMA = ({"id": "llama", "object": "model"},)
QWEN = ({"id": "qwen", "object": "model"},)


def listing(*models: dict[str, Any]) -> dict[str, Any]:
    return {"object": "list", "data": list(models)}


def start_checks(
    test: TestCase, config: Config, on_change: OnChange, interval: float = 0.1
) -> HealthChecker:
    """
    The parent's checks of C{config}'s replicas, over real connections on the
    real reactor every C{interval} seconds, without an upstream key; stopped
    with the test.
    """
    checker = HealthChecker(
        config.upstreams,
        UpstreamClient(reactor, config),
        KeyRing(None, None),
        reactor,
        interval,
        on_change,
    )
    checker.startService()
    test.addCleanup(checker.stopService)
    return checker


class FakeUpstream:
    """Stands in for L{UpstreamClient}: each check waits until the test answers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes, bytes | None, float, bytes | None]] = []
        self.pending: dict[bytes, Deferred[Any]] = {}
        self.pool = self

    def closeCachedConnections(self) -> Deferred[None]:
        return succeed(None)

    def send(
        self,
        method: bytes,
        path: bytes,
        body: bytes | None,
        authorization: bytes | None,
        deadline: float,
        origin: bytes | None = None,
    ) -> Deferred[Any]:
        assert origin is not None
        self.calls.append((method, path, authorization, deadline, origin))
        d: Deferred[Any] = Deferred()
        self.pending[origin] = d
        return d

    def read_json(self, response: Any, deadline: float | None = None) -> Deferred[Any]:
        status, document = response
        return succeed((status, b"", document))

    def answer(self, name: str, status: int = 200, document: Any = None) -> None:
        self.pending.pop(name.encode()).callback((status, document))

    def fail(self, name: str, error: Exception) -> None:
        self.pending.pop(name.encode()).errback(error)


class CheckerTests(SynchronousTestCase):
    """Verdicts from a fake clock and a fake upstream."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = FakeUpstream()
        self.changes: list[tuple[str, bool, Models | None]] = []
        self.checker = HealthChecker(
            [A, B],
            self.upstream,  # type: ignore[arg-type]
            KeyRing(None, None),
            self.clock,
            5.0,
            lambda *change: self.changes.append(change),
        )
        self.events: list[dict[str, Any]] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "llmgw.health":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.checker.startService()
        self.addCleanup(self.checker.stopService)

    def unreachable(self) -> ReplicaUnreachable:
        return ReplicaUnreachable(errors.upstream_unreachable("connection refused"))

    def test_first_check_at_start(self) -> None:
        """Both replicas are asked for their models at once, with a short deadline."""
        self.assertEqual(
            self.upstream.calls,
            [
                (b"GET", b"/v1/models", None, CHECK_DEADLINE, A.encode()),
                (b"GET", b"/v1/models", None, CHECK_DEADLINE, B.encode()),
            ],
        )

    def test_up_with_models(self) -> None:
        """A success makes a replica up and reports the models it lists, once."""
        self.upstream.answer(A, 200, listing(*LLAMA))
        self.assertEqual(self.changes, [(A, True, LLAMA)])
        self.assertEqual(self.checker.states(), [(A, True, LLAMA)])
        self.clock.advance(5)
        self.upstream.answer(A, 200, listing(*LLAMA))
        self.assertEqual(self.changes, [(A, True, LLAMA)])
        self.assertEqual(
            [e["log_format"] for e in self.events].count(self.events[0]["log_format"]), 1
        )

    def test_same_models_at_another_time(self) -> None:
        """vLLM stamps each listing with the time: the same ids are no change."""
        self.upstream.answer(A, 200, listing({"id": "llama", "created": 1}))
        self.clock.advance(5)
        self.upstream.answer(A, 200, listing({"id": "llama", "created": 6}))
        self.assertEqual(self.changes, [(A, True, ({"id": "llama", "created": 1},))])

    def test_models_change(self) -> None:
        """A replica that starts serving another model is reported again."""
        self.upstream.answer(A, 200, listing(*LLAMA))
        self.clock.advance(5)
        self.upstream.answer(A, 200, listing(*QWEN))
        self.assertEqual(self.changes, [(A, True, LLAMA), (A, True, QWEN)])

    def test_down_after_two_failures_in_a_row(self) -> None:
        """One failure is not enough; the second in a row makes it down, reported once."""
        self.upstream.answer(A, 200, listing(*LLAMA))
        self.clock.advance(5)
        self.upstream.fail(A, self.unreachable())
        self.assertEqual(self.changes, [(A, True, LLAMA)])
        self.clock.advance(5)
        self.upstream.fail(A, self.unreachable())
        self.assertEqual(self.changes, [(A, True, LLAMA), (A, False, LLAMA)])
        self.clock.advance(5)
        self.upstream.fail(A, self.unreachable())
        self.assertEqual(len(self.changes), 2)
        warnings = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(
            warnings[0]["why"], "The model server could not be reached: connection refused"
        )

    def test_failure_between_successes_is_forgiven(self) -> None:
        """Failures must be in a row: a success in between resets the count."""
        self.upstream.answer(A, 200, listing(*LLAMA))
        for answer in ("fail", "ok", "fail", "ok"):
            self.clock.advance(5)
            if answer == "fail":
                self.upstream.fail(A, self.unreachable())
            else:
                self.upstream.answer(A, 200, listing(*LLAMA))
        self.assertEqual(self.changes, [(A, True, LLAMA)])

    def test_up_again_after_one_success(self) -> None:
        for _ in range(2):
            self.upstream.fail(A, self.unreachable())
            self.clock.advance(5)
        self.assertEqual(self.changes, [(A, False, None)])
        self.upstream.answer(A, 200, listing(*QWEN))
        self.assertEqual(self.changes, [(A, False, None), (A, True, QWEN)])

    def test_bad_answers_count_as_failures(self) -> None:
        """A 500, or a 200 that is not a model list, fails the check."""
        self.upstream.answer(A, 500, {"error": "x"})
        self.clock.advance(5)
        self.upstream.answer(A, 200, {"data": "nope"})
        self.assertEqual(self.changes, [(A, False, None)])

    def test_slow_check_is_not_doubled(self) -> None:
        """A replica whose check is still waiting is not asked again."""
        self.upstream.answer(B, 200, listing(*LLAMA))
        self.clock.advance(5)
        self.assertEqual(
            [call[4] for call in self.upstream.calls], [A.encode(), B.encode(), B.encode()]
        )

    def test_stop_stops_checking(self) -> None:
        self.upstream.answer(A, 200, listing(*LLAMA))
        self.upstream.answer(B, 200, listing(*LLAMA))
        self.checker.stopService()
        self.clock.advance(50)
        self.assertEqual(len(self.upstream.calls), 2)

    def test_state_names(self) -> None:
        self.upstream.answer(A, 200, listing(*LLAMA))
        self.assertEqual(state_name(self.checker, A), "up")
        self.assertEqual(state_name(self.checker, B), "unchecked")
        self.assertEqual(state_name(None, A), "-")
        for _ in range(2):
            self.clock.advance(5)
            self.upstream.fail(A, self.unreachable())
        self.assertEqual(state_name(self.checker, A), "down")


class KeyTests(SynchronousTestCase):
    def test_checks_send_the_upstream_key(self) -> None:
        path = Path(self.mktemp())
        path.write_text("sk-upstream\n")
        upstream = FakeUpstream()
        checker = HealthChecker(
            [A],
            upstream,  # type: ignore[arg-type]
            KeyRing(str(path), None),
            Clock(),
            1.0,
            lambda *_: None,
        )
        checker.startService()
        self.assertEqual(
            upstream.calls, [(b"GET", b"/v1/models", b"Bearer sk-upstream", 1.0, A.encode())]
        )


class ListingTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_model_listing(200, listing(*LLAMA)), LLAMA)
        self.assertEqual(parse_model_listing(200, listing()), ())

    def test_refused(self) -> None:
        for status, document in (
            (503, listing(*LLAMA)),
            (200, []),
            (200, {"data": None}),
            (200, {"data": [{"name": "x"}]}),
            (200, {"data": [{"id": 7}]}),
            (200, {"data": ["llama"]}),
        ):
            self.assertRaises(ValueError, parse_model_listing, status, document)

    def test_amp_round_trip(self) -> None:
        self.assertEqual(decode_models(encode_models(LLAMA)), LLAMA)
        self.assertIsNone(decode_models(encode_models(None)))


class LoopbackTests(TestCase):
    """Real checks over verified TLS against stand-in models on 127.0.0.1."""

    @inline
    async def test_real_replicas(self) -> None:
        """Each replica's models are learned, and one that stops is found down."""
        ca = make_ca()
        first = start_upstream(self, ca=ca, served_model="llama")
        second = start_upstream(self, ca=ca, served_model="qwen")
        config = replicas_config(first.ca_file, [first.port, second.port])
        changes: list[tuple[str, bool, list[str]]] = []
        start_checks(
            self,
            config,
            lambda name, up, models: changes.append((name, up, [m["id"] for m in models or ()])),
        )
        await eventually(lambda: len(changes) == 2)
        first_name, second_name = config.upstreams
        self.assertEqual(
            sorted(changes), sorted([(first_name, True, ["llama"]), (second_name, True, ["qwen"])])
        )
        await second.service.stopService()
        await eventually(lambda: len(changes) == 3)
        self.assertEqual(changes[2], (second_name, False, ["qwen"]))


class ReplicaProcess(ProcessProtocol):
    """A stand-in model in its own process, so that a test can SIGKILL it."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        assert self.transport is not None
        self.transport.signalProcess(name)


class ReplicaProcessTests(TestCase):
    """
    A real gateway (C{llmgw --workers 2}, health checks in its parent, verdicts
    told to its workers over AMP) in front of two stand-in models in their own
    processes.
    """

    timeout = 90

    def setUp(self) -> None:
        ca = make_ca()
        cert, key = issue_server_certificate(ca, ("localhost",), ("127.0.0.1",))
        self.cert, self.key, self.ca_file = Path(self.mktemp()), Path(self.mktemp()), self.mktemp()
        self.cert.write_bytes(cert)
        self.key.write_bytes(key)
        Path(self.ca_file).write_bytes(ca.cert_pem)
        self.processes: list[ReplicaProcess] = []

    async def start_replica(self, port: int) -> ReplicaProcess:
        process = ReplicaProcess()
        portfile = Path(self.mktemp())
        args = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "llmgw-mock",
            "--port", str(port), "--cert", str(self.cert), "--key", str(self.key),
            "--delay", "0.05", "--portfile", str(portfile),
        ]  # fmt: skip
        transport = reactor.spawnProcess(process, sys.executable, args, env=os.environ.copy())

        def stop() -> Deferred[None]:
            if not process.ended.called:
                transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(stop)
        self.processes.append(process)
        await eventually(lambda: portfile.exists() or process.ended.called, timeout=20)
        if not portfile.exists():
            raise AssertionError("the stand-in did not start:\n" + process.output.decode())
        return process

    async def started_on(self, port: int) -> int:
        """How many chat completions the stand-in on C{port} has accepted."""
        client = UpstreamClient(reactor, Config(aica=self.ca_file))
        self.addCleanup(client.pool.closeCachedConnections)
        origin = f"https://localhost:{port}".encode()
        response = await client.send(b"GET", b"/mock/stats", None, None, 5.0, origin)
        _, _, stats = await client.read_json(response)
        return int(stats["started"])

    def start_gateway(self, ports: list[int]) -> tuple[GatewayProcess, int]:
        upstreams = [arg for port in ports for arg in ("--upstream", f"https://localhost:{port}")]
        gateway_port = free_port()
        gateway = GatewayProcess()
        args = [
            sys.executable, "-m", "llmgw.cli", "--bindport", str(gateway_port), "--workers", "2",
            *upstreams, "--aica", self.ca_file, "--health-interval", "0.2", "--rate-limit", "0",
        ]  # fmt: skip
        transport = reactor.spawnProcess(
            gateway, sys.executable, args, env={**os.environ, "NO_COLOR": "1"},
            childFDs={0: "w", 1: "r", 2: "r"},
        )  # fmt: skip

        def stop() -> Deferred[Any]:
            if gateway.ended.called:
                return defer.succeed(None)
            transport.signalProcess("TERM")
            return gateway.ended

        self.addCleanup(stop)
        return gateway, gateway_port

    @inline
    async def test_kill_and_return(self) -> None:
        ports = [free_port(), free_port()]
        replicas = [await self.start_replica(port) for port in ports]
        gateway, gateway_port = self.start_gateway(ports)
        await serving(self, gateway, gateway_port)
        await eventually(lambda: gateway.text().count("is up, serving") == 2, timeout=10)

        # Under load, SIGKILL one replica: only requests already in flight may fail.
        results: list[tuple[float, float, int]] = []
        killed_at: list[float] = []

        async def lane() -> None:
            while not killed_at or time.monotonic() < killed_at[0] + 2.0:
                began = time.monotonic()
                reply = await request(self, gateway_port, body=chat_body())
                results.append((began, time.monotonic(), reply.status))

        lanes = [Deferred.fromCoroutine(lane()) for _ in range(4)]
        await task.deferLater(reactor, 1.0, lambda: None)
        replicas[0].signal("KILL")
        killed_at.append(time.monotonic())
        await replicas[0].ended
        await defer.gatherResults(lanes)
        after = [status for began, _, status in results if began > killed_at[0]]
        before = [result for result in results if result[0] <= killed_at[0]]
        self.assertGreater(len(after), 10)
        self.assertEqual(after, [200] * len(after), gateway.text())
        in_flight = [result for result in before if result[1] > killed_at[0]]
        failed = [result for result in before if result[2] != 200]
        self.assertLessEqual(len(failed), len(in_flight))
        await eventually(lambda: "is down" in gateway.text(), timeout=5)

        # It returns on the same port: traffic reaches it within a few health intervals.
        await self.start_replica(ports[0])
        deadline = time.monotonic() + 2.0
        while await self.started_on(ports[0]) == 0:
            self.assertLess(time.monotonic(), deadline, "the returned replica got no traffic")
            reply = await request(self, gateway_port, body=chat_body())
            self.assertEqual(reply.status, 200)

        # Every replica down: a 502 in the error shape, and /readyz says 503.
        for process in self.processes:
            if not process.ended.called:
                process.signal("KILL")
        reply = await request(self, gateway_port, body=chat_body())
        self.assertEqual(reply.status, 502)
        self.assertEqual(reply.json()["error"]["code"], "upstream_unreachable")
        deadline = time.monotonic() + 5.0
        while (await request(self, gateway_port, "GET", b"/readyz")).status != 503:
            self.assertLess(time.monotonic(), deadline, "/readyz stayed ready")
            await task.deferLater(reactor, 0.1, lambda: None)
