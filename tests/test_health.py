"""Tests for L{llmgw.health}: the parent's checks of the C{--upstream} replicas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from llmgw import errors
from llmgw.devtls import make_ca
from llmgw.health import (
    CHECK_DEADLINE,
    HealthChecker,
    Models,
    decode_models,
    encode_models,
    parse_model_listing,
    state_name,
)
from llmgw.keys import KeyRing
from llmgw.upstream import ReplicaUnreachable, UpstreamClient
from tests.loopback import eventually, inline, reactor, replicas_config, start_upstream

A = "https://a.test:8000"
B = "https://b.test:8000"
LLAMA = ({"id": "llama", "object": "model"},)
QWEN = ({"id": "qwen", "object": "model"},)


def listing(*models: dict[str, Any]) -> dict[str, Any]:
    return {"object": "list", "data": list(models)}


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
        checker = HealthChecker(
            config.upstreams,
            UpstreamClient(reactor, config),
            KeyRing(None, None),
            reactor,
            0.1,
            lambda name, up, models: changes.append((name, up, [m["id"] for m in models or ()])),
        )
        checker.startService()
        self.addCleanup(checker.stopService)
        await eventually(lambda: len(changes) == 2)
        first_name, second_name = config.upstreams
        self.assertEqual(
            sorted(changes), sorted([(first_name, True, ["llama"]), (second_name, True, ["qwen"])])
        )
        await second.service.stopService()
        await eventually(lambda: len(changes) == 3)
        self.assertEqual(changes[2], (second_name, False, ["qwen"]))
