"""
Tests for L{llmgw.admission}: the limiter's questions and answers between a
worker and the parent, as frames on their own pipe.

The parent's decisions are tested on L{AdmissionDesk} directly; the frames
by wiring a worker's L{AdmissionQuestions} to a desk through string
transports, so that each test sees exactly what crossed the pipe.  What a
worker does with the answers (its fallback, stalls) is in
L{tests.test_worker}.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmgw.admission import (
    RECORD,
    RELEASE,
    AdmissionDesk,
    AdmissionQuestions,
    AdmitExpired,
    ParentError,
)
from llmgw.ratelimit import Decision, SlidingWindowLimiter
from llmgw.redisstore import RateStoreUnavailable


class Wire:
    """Two protocols back to back in memory; nothing crosses until pumped."""

    def __init__(self, server: Protocol, client: Protocol) -> None:
        self.server, self.client = server, client
        self.server_transport, self.client_transport = StringTransport(), StringTransport()
        server.makeConnection(self.server_transport)
        client.makeConnection(self.client_transport)

    def pump(self) -> None:
        while self.server_transport.value() or self.client_transport.value():
            self.to_server()
            self.to_client()

    def to_server(self) -> None:
        """Deliver what the client has sent so far, and nothing back."""
        data = self.client_transport.value()
        self.client_transport.clear()
        self.server.dataReceived(data)

    def to_client(self) -> None:
        """Deliver what the server has sent so far, and nothing back."""
        data = self.server_transport.value()
        self.server_transport.clear()
        self.client.dataReceived(data)


def frames(data: bytes) -> list[bytes]:
    """Split what one side wrote into its frames (a 16-bit length, then the frame)."""
    found = []
    while data:
        (length,) = struct.unpack("!H", data[:2])
        found.append(data[2 : 2 + length])
        data = data[2 + length :]
    return found


def results(d: Any) -> list[Any]:
    found: list[Any] = []
    d.addBoth(found.append)
    return found


class DeskDecisionTests(SynchronousTestCase):
    """The parent's answers to a worker's questions about the limit."""

    def test_question_read_after_its_deadline_is_not_recorded(self) -> None:
        clock = Clock()
        shared = SlidingWindowLimiter(4, 60, clock)
        desk = AdmissionDesk(shared)
        clock.advance(10)
        self.assertRaises(AdmitExpired, desk.admit, "c", 10.0)
        self.assertEqual(len(shared), 0)
        self.assertEqual(
            desk.admit("c", 10.5),
            (Decision(allowed=True, limit=4, window=60, remaining=3, reset=60), 10.0),
        )

    def test_recorded_admissions_count_past_the_limit(self) -> None:
        """
        Served while the parent stalled, they all count, and Retry-After is
        when enough of them have expired to bring the count under the limit.
        """
        clock = Clock()
        desk = AdmissionDesk(SlidingWindowLimiter(2, 60, clock))
        for at in (0.0, 1.0, 2.0):
            desk.record_admission("c", at)
        clock.advance(10)
        self.assertEqual(desk.admit("c"), (Decision(False, 2, 60, 0, 51), None))
        clock.advance(50)
        self.assertEqual(desk.admit("c"), (Decision(False, 2, 60, 0, 1), None))
        clock.advance(1)
        self.assertEqual(desk.admit("c"), (Decision(True, 2, 60, 0, 1), 61.0))

    def test_released_admission_no_longer_counts(self) -> None:
        clock = Clock()
        desk = AdmissionDesk(SlidingWindowLimiter(1, 60, clock))
        answer = desk.admit("c")
        assert isinstance(answer, tuple) and answer[1] is not None
        at = answer[1]
        self.assertEqual(desk.admit("c"), (Decision(False, 1, 60, 0, 60), None))
        desk.release_admission("c", at)
        self.assertEqual(desk.admit("c"), (Decision(True, 1, 60, 0, 60), 0.0))

    def test_no_limiter_is_an_error(self) -> None:
        self.assertRaises(ParentError, AdmissionDesk(None).admit, "c")


class PipeTests(SynchronousTestCase):
    """What crosses the pipe, and what the worker makes of it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.shared = SlidingWindowLimiter(2, 60, self.clock)
        self.desk = AdmissionDesk(self.shared)
        self.questions = AdmissionQuestions()
        self.wire = Wire(self.desk, self.questions)

    def test_questions_of_one_turn_leave_together_and_are_answered_in_order(self) -> None:
        """
        Three questions asked before the reactor writes are one write's worth
        of frames; the parent answers each, in order, by number.
        """
        answers = [results(self.questions.ask("c", 101.0)) for _ in range(3)]
        self.assertEqual(
            frames(self.wire.client_transport.value()),
            [b"A 0 101.0 c", b"A 1 101.0 c", b"A 2 101.0 c"],
        )
        self.wire.to_server()
        self.assertEqual(
            frames(self.wire.server_transport.value()),
            [b"0 Y 2 60 1 60 100.0", b"1 Y 2 60 0 60 100.0", b"2 N 2 60 0 60"],
        )
        self.wire.to_client()
        self.assertEqual(
            answers,
            [
                [(Decision(True, 2, 60, 1, 60), 100.0)],
                [(Decision(True, 2, 60, 0, 60), 100.0)],
                [(Decision(False, 2, 60, 0, 60), None)],
            ],
        )

    def test_keys_with_spaces_and_beyond_ascii(self) -> None:
        """A key is whatever follows the third space: a UNIX peer's name may hold anything."""
        key = "/run/a socket/ü"
        answer = results(self.questions.ask(key, 101.0))
        self.wire.pump()
        self.assertTrue(answer[0][0].allowed)
        self.assertEqual(self.shared.newest(key), 100.0)

    def test_corrections_are_counted_in_order_with_questions(self) -> None:
        """
        A record sent before a question is counted before it is decided, and a
        release likewise: the pipe is the order.
        """
        self.questions.tell(RECORD, "c", 99.5)
        self.questions.tell(RECORD, "c", 99.75)
        refused = results(self.questions.ask("c", 101.0))
        self.questions.tell(RELEASE, "c", 99.5)
        admitted = results(self.questions.ask("c", 101.0))
        self.assertEqual(
            frames(self.wire.client_transport.value())[:2], [b"R 99.5 c", b"R 99.75 c"]
        )
        self.wire.pump()
        self.assertEqual(refused, [(Decision(False, 2, 60, 0, 60), None)])
        self.assertEqual(admitted, [(Decision(True, 2, 60, 0, 60), 100.0)])

    def test_expired_question(self) -> None:
        answer = results(self.questions.ask("c", 100.0))
        self.wire.pump()
        self.assertIsInstance(answer[0].value, AdmitExpired)
        self.assertEqual(len(self.shared), 0)

    def test_error_answer(self) -> None:
        self.desk.limiter = None
        answer = results(self.questions.ask("c", 101.0))
        self.wire.pump()
        self.assertIsInstance(answer[0].value, ParentError)
        self.assertEqual(answer[0].getErrorMessage(), "rate limiting is off")

    def test_unexpected_failure_is_logged_and_answered(self) -> None:
        """A limiter that breaks answers that question with an error; the pipe goes on."""

        class Broken(SlidingWindowLimiter):
            def decide(self, key: str) -> Decision:
                raise ZeroDivisionError("boom")

        self.desk.limiter = Broken(1, 60, self.clock)
        answer = results(self.questions.ask("c", 101.0))
        self.wire.pump()
        self.assertIsInstance(answer[0].value, ParentError)
        self.assertEqual(answer[0].getErrorMessage(), "boom")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.desk.limiter = self.shared
        again = results(self.questions.ask("c", 101.0))
        self.wire.pump()
        self.assertTrue(again[0][0].allowed)

    def test_rate_store_unavailable_carries_retry_after(self) -> None:
        from twisted.internet.defer import fail

        class Closed:
            def decide(self, key: str, deadline: float | None) -> Any:
                return fail(RateStoreUnavailable(7))

        self.desk.rate_store = Closed()  # type: ignore[assignment]
        answer = results(self.questions.ask("c", 101.0))
        self.assertEqual(frames(self.wire.client_transport.value()), [b"A 0 101.0 c"])
        self.wire.to_server()
        self.assertEqual(frames(self.wire.server_transport.value()), [b"0 U 7"])
        self.wire.to_client()
        self.assertEqual(answer[0].value.retry_after, 7)

    def test_answers_out_of_order_reach_their_questions(self) -> None:
        """A rate store may answer a later question first: the numbers match them up."""
        from twisted.internet.defer import Deferred

        pending: list[Deferred[Any]] = []

        class Slow:
            def decide(self, key: str, deadline: float | None) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                pending.append(d)
                return d

        from llmgw.redisstore import Admission

        self.desk.rate_store = Slow()  # type: ignore[assignment]
        first = results(self.questions.ask("a", 101.0))
        second = results(self.questions.ask("b", 101.0))
        self.wire.pump()
        pending[1].callback(Admission(Decision(True, 9, 60, 8, 60), 100.5))
        self.wire.pump()
        self.assertEqual((first, second), ([], [(Decision(True, 9, 60, 8, 60), 100.5)]))
        pending[0].callback(Admission(Decision(False, 9, 60, 0, 30), None))
        self.wire.pump()
        self.assertEqual(first, [(Decision(False, 9, 60, 0, 30), None)])

    def test_pipe_lost_fails_the_waiting_and_later_questions(self) -> None:
        waiting = results(self.questions.ask("c", 101.0))
        self.questions.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(waiting[0].value, ConnectionDone)
        later = results(self.questions.ask("c", 101.0))
        self.assertIsInstance(later[0].value, ConnectionDone)
        self.questions.tell(RECORD, "c", 100.0)
        self.assertEqual(
            frames(self.wire.client_transport.value()),
            [b"A 0 101.0 c"],
            "nothing written after the pipe was lost",
        )

    def test_answer_after_the_parent_went_away_is_not_written(self) -> None:
        self.questions.ask("c", 101.0)
        self.wire.to_server()
        self.wire.server_transport.clear()
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()

        class Late:
            def decide(self, key: str, deadline: float | None) -> Deferred[Any]:
                return d

        self.desk.rate_store = Late()  # type: ignore[assignment]
        self.questions.ask("c", 101.0)
        self.wire.to_server()
        self.desk.connectionLost(Failure(ConnectionDone()))
        from llmgw.redisstore import Admission

        d.callback(Admission(Decision(True, 2, 60, 0, 60), 100.0))
        self.assertEqual(self.wire.server_transport.value(), b"")


class MalformedFrameTests(SynchronousTestCase):
    """One bad frame never closes the pipe: that would leave the worker on its fallback."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.shared = SlidingWindowLimiter(2, 60, self.clock)
        self.desk = AdmissionDesk(self.shared)
        self.questions = AdmissionQuestions()
        self.wire = Wire(self.desk, self.questions)

    def test_parent_drops_bad_frames_and_answers_the_next(self) -> None:
        for frame in (b"A x y", b"A 7", b"A 3 soon c", b"R never c", b"Q what", b"L"):
            self.desk.stringReceived(frame)
        self.assertEqual(frames(self.wire.server_transport.value()), [b"3 X malformed question"])
        self.assertFalse(self.wire.server_transport.disconnecting)
        answer = results(self.questions.ask("c", 1.0))
        self.wire.server_transport.clear()
        self.wire.pump()
        self.assertEqual(answer, [(Decision(True, 2, 60, 1, 60), 0.0)])
        self.assertEqual(len(self.shared), 1)

    def test_worker_fails_only_the_garbled_answer(self) -> None:
        garbled = results(self.questions.ask("c", 1.0))
        good = results(self.questions.ask("c", 1.0))
        self.questions.stringReceived(b"0 Y 2 60 1 sixty 0.0")
        self.questions.stringReceived(b"x Y")
        self.questions.stringReceived(b"1 Y 2 60 1 60 -")
        self.assertIsInstance(garbled[0].value, ParentError)
        self.assertEqual(good, [(Decision(True, 2, 60, 1, 60), None)])

    def test_key_too_long_for_a_frame_fails_at_once(self) -> None:
        answer = results(self.questions.ask("k" * 70_000, 1.0))
        self.assertEqual(len(answer), 1)
        self.assertEqual(self.wire.client_transport.value(), b"")
        self.assertEqual(self.questions._waiting, {})
