"""Tests for L{llmgw.worker}: the parent's limiter seen from a worker, and the adopted port.

The limiter's unit tests wire a worker's L{RemoteLimiter} to the parent's
L{AdmissionDesk} through their pipe in memory, on a fake clock; the adopted port's run
on the real reactor with a real socket; the process test runs C{llmgw
--workers 2} as in L{tests.test_cluster} and stops its parent.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import treq
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmgw.admission import AdmissionDesk, AdmissionQuestions
from llmgw.ratelimit import Decision, SlidingWindowLimiter
from llmgw.worker import ADMIT_TIMEOUT, RemoteLimiter, SharedListeningSocket, stop_accepting
from tests.loopback import (
    CHAT,
    JSON_HEADERS,
    Reply,
    chat_body,
    eventually,
    inline,
    reactor,
    start_upstream,
)
from tests.test_admission import Wire
from tests.test_cluster import _kill, process_pid, serving, start_gateway_process


class RemoteLimiterTests(SynchronousTestCase):
    def test_decisions_come_from_the_parent(self) -> None:
        clock = Clock()
        shared = SlidingWindowLimiter(2, 60, clock)
        worker_side = AdmissionQuestions()
        wire = Wire(AdmissionDesk(shared), worker_side)
        remote = RemoteLimiter(worker_side, SlidingWindowLimiter(1, 60, clock), 1, clock)
        decisions: list[Decision] = []
        for _ in range(3):
            remote.admit("c").addCallback(decisions.append)
            wire.pump()
        self.assertEqual([d.allowed for d in decisions], [True, True, False])
        self.assertEqual(len(shared), 1)

    def test_parent_silent_falls_back_to_share(self) -> None:
        """No answer within the timeout: the worker's share decides, and it is logged."""
        clock = Clock()
        worker_side = AdmissionQuestions()
        worker_side.makeConnection(StringTransport())
        remote = RemoteLimiter(worker_side, SlidingWindowLimiter(1, 60, clock), 1, clock)
        decisions: list[Any] = []
        remote.admit("c").addCallback(decisions.append)
        self.assertEqual(decisions, [])
        clock.advance(1.0)
        self.assertEqual([d.allowed for d in decisions], [True])
        self.assertTrue(remote.degraded)
        remote.admit("c").addCallback(decisions.append)
        clock.advance(1.0)
        self.assertEqual([d.allowed for d in decisions], [True, False])
        self.flushLoggedErrors()


class StalledParent:
    """
    A worker's L{RemoteLimiter} and the parent's L{AdmissionDesk} in memory:
    limit 4 in 60 s for the gateway, a share of 2 for this worker's fallback.
    Nothing crosses the wire until the test pumps it, so the parent is
    stopped until then.
    """

    def __init__(self, parent_clock: Clock | None = None) -> None:
        self.clock = Clock()
        self.parent_clock = self.clock if parent_clock is None else parent_clock
        self.shared = SlidingWindowLimiter(4, 60, self.parent_clock)
        self.fallback = SlidingWindowLimiter(2, 60, self.clock)
        worker_side = AdmissionQuestions()
        self.wire = Wire(AdmissionDesk(self.shared), worker_side)
        self.remote = RemoteLimiter(worker_side, self.fallback, 2, self.clock)
        self.decisions: list[Decision] = []

    def ask(self) -> None:
        self.remote.admit("c").addCallback(self.decisions.append)

    def allowed(self) -> list[bool]:
        return [d.allowed for d in self.decisions]

    def counted(self) -> list[float]:
        """The times of the admissions the parent counts for the client."""
        times: list[float] = []
        while (newest := self.shared.newest("c")) is not None:
            times.insert(0, newest)
            self.shared.release("c", newest)
        for at in times:
            self.shared.record("c", at)
        return times


class StalledParentLimiterTests(SynchronousTestCase):
    """What the parent counts after a stall is what the worker served."""

    def tearDown(self) -> None:
        self.flushLoggedErrors()

    def test_only_the_first_question_waits(self) -> None:
        stall = StalledParent()
        stall.ask()
        self.assertEqual(stall.decisions, [])
        stall.clock.advance(ADMIT_TIMEOUT)
        self.assertEqual(stall.allowed(), [True])
        stall.clock.advance(0.5)
        for _ in range(3):
            stall.ask()
        self.assertEqual(stall.allowed(), [True, True, False, False])
        self.assertTrue(stall.remote.degraded)

    def test_parent_counts_what_the_fallback_admitted(self) -> None:
        """
        The question read after its deadline is not recorded; the fallback's two
        admissions are, at their own times; the client then gets two more, and
        its Retry-After is when the first fallback admission expires.
        """
        stall = StalledParent()
        stall.ask()
        stall.clock.advance(ADMIT_TIMEOUT)
        stall.clock.advance(0.5)
        for _ in range(3):
            stall.ask()
        stall.clock.advance(5)
        stall.wire.pump()
        self.assertFalse(stall.remote.degraded)
        self.assertEqual(stall.counted(), [1.0, 1.5])
        for _ in range(3):
            stall.ask()
            stall.wire.pump()
        self.assertEqual(stall.allowed()[4:], [True, True, False])
        self.assertEqual(
            stall.decisions[4:],
            [
                Decision(allowed=True, limit=4, window=60, remaining=1, reset=55),
                Decision(allowed=True, limit=4, window=60, remaining=0, reset=55),
                Decision(allowed=False, limit=4, window=60, remaining=0, reset=55),
            ],
        )

    def test_an_error_answer_ends_the_stall(self) -> None:
        """Even an error from the parent shows it is alive: the next request asks it."""
        stall = StalledParent()
        stall.ask()
        stall.clock.advance(ADMIT_TIMEOUT)
        self.assertEqual(stall.allowed(), [True])
        parent = stall.wire.server
        assert isinstance(parent, AdmissionDesk)
        parent.limiter = None  # it answers an error: rate limiting is off
        stall.wire.pump()
        stall.ask()
        self.assertEqual(stall.allowed(), [True], "decided by the fallback, not asked")

    def test_parent_answers_again_without_a_request(self) -> None:
        """The stalled question's answer is the probe: the next request asks the parent."""
        stall = StalledParent()
        stall.ask()
        stall.clock.advance(ADMIT_TIMEOUT)
        stall.wire.pump()
        self.assertFalse(stall.remote.degraded)
        stall.ask()
        self.assertEqual(len(stall.decisions), 1, "decided without asking the parent")
        stall.wire.pump()
        self.assertEqual(stall.allowed(), [True, True])
        self.assertEqual(stall.counted(), [1.0, 1.0])

    def test_answer_after_giving_up_is_released_when_the_fallback_admitted(self) -> None:
        """The parent recorded just before the deadline, the worker gave up just after."""
        stall = StalledParent()
        stall.ask()
        stall.wire.to_server()
        self.assertEqual(stall.counted(), [0.0])
        stall.clock.advance(ADMIT_TIMEOUT)
        self.assertEqual(stall.allowed(), [True])
        stall.wire.pump()
        self.assertEqual(stall.counted(), [1.0])

    def test_answer_after_giving_up_is_released_when_the_fallback_refused(self) -> None:
        stall = StalledParent()
        stall.fallback.decide("c")
        stall.fallback.decide("c")
        stall.ask()
        stall.wire.to_server()
        stall.clock.advance(ADMIT_TIMEOUT)
        self.assertEqual(stall.allowed(), [False])
        stall.wire.pump()
        self.assertEqual(stall.counted(), [])

    def test_expired_before_the_timer_fires(self) -> None:
        """
        A parent that reads the question after its deadline says so, and the
        fallback decides then, even if the worker's own timer is late.
        """
        parent_clock = Clock()
        parent_clock.advance(ADMIT_TIMEOUT)
        stall = StalledParent(parent_clock)
        stall.ask()
        stall.wire.pump()
        self.assertEqual(stall.allowed(), [True])
        self.assertEqual(stall.clock.getDelayedCalls(), [])
        self.assertFalse(stall.remote.degraded)
        self.assertEqual(stall.counted(), [0.0])

    def test_parent_gone(self) -> None:
        """Without a parent, the fallback decides at once and nothing is left waiting."""
        stall = StalledParent()
        stall.remote.parent.connectionLost(Failure(ConnectionDone()))
        stall.ask()
        self.assertEqual(stall.allowed(), [True])
        self.assertEqual(stall.clock.getDelayedCalls(), [])


class SharedListeningSocketTests(TestCase):
    """The parent shuts the shared socket down: the worker's port ends quietly."""

    def adopt(self) -> tuple[socket.socket, Any]:
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        listening.setblocking(False)
        port = reactor.adoptStreamPort(listening.fileno(), socket.AF_INET, Factory())
        port.socket = SharedListeningSocket(port.socket, port)
        self.addCleanup(stop_accepting, port)
        return listening, port

    @inline
    async def test_woken_to_accept_after_the_shutdown(self) -> None:
        """C{accept()} fails with C{EINVAL}: no error is logged, and the port stops."""
        listening, port = self.adopt()
        listening.shutdown(socket.SHUT_RD)
        port.doRead()
        await eventually(lambda: not port.connected)
        self.assertEqual(self.flushLoggedErrors(), [])
        address = listening.getsockname()
        with socket.socket() as late:
            self.assertRaises(ConnectionRefusedError, late.connect, address)

    @inline
    async def test_stop_after_the_reactor_closed_the_port(self) -> None:
        """The reactor sees the hang-up and closes the port; the drain still stops it once."""
        listening, port = self.adopt()
        listening.shutdown(socket.SHUT_RD)
        await eventually(lambda: not port.connected)
        self.assertIsNone(self.successResultOf(stop_accepting(port)))


class KeepAliveClient:
    """Requests one after another on one connection, so one worker serves them all."""

    def __init__(self, test: TestCase, port: int) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        test.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        self.url = f"http://127.0.0.1:{port}".encode() + CHAT

    async def chat(self, text: str) -> tuple[Reply, float]:
        """The whole reply, and the seconds it took."""
        started = time.monotonic()
        response = await self.http.post(
            self.url, data=chat_body(text), headers=Headers(JSON_HEADERS)
        )
        body = await treq.content(response)
        return Reply(response.code, response.headers, body), time.monotonic() - started


class StalledParentTests(TestCase):
    """C{kill -STOP} of the parent, then C{kill -CONT}: the limit still counts what was served."""

    timeout = 120

    @inline
    async def test_fallback_admissions_count_once_the_parent_answers(self) -> None:
        upstream = start_upstream(self)
        process, port = start_gateway_process(self, upstream, "--rate-limit", "4")
        await serving(self, process, port)
        await eventually(lambda: process.text().count("serving") == 2, timeout=30)
        client = KeepAliveClient(self, port)
        parent = process_pid(process)
        os.kill(parent, signal.SIGSTOP)
        self.addCleanup(_kill, parent, signal.SIGCONT)
        replies: list[Reply] = []
        took: list[float] = []
        first_asked = time.monotonic()
        for i in range(4):
            reply, seconds = await client.chat(f"stalled {i}")
            replies.append(reply)
            took.append(seconds)
        first_answered = first_asked + took[0]
        self.assertEqual([r.status for r in replies], [200, 200, 429, 429])
        # Only the first question waits for the stalled parent.
        self.assertGreaterEqual(took[0], ADMIT_TIMEOUT)
        self.assertLess(max(took[1:]), ADMIT_TIMEOUT, took)  # none waited the timeout
        os.kill(parent, signal.SIGCONT)
        await eventually(lambda: "The parent's limiter answers again" in process.text(), 10)
        after: list[Reply] = []
        for i in range(2):
            after.append((await client.chat(f"after {i}"))[0])
        refused_asked = time.monotonic()
        refused = (await client.chat("refused"))[0]
        refused_answered = time.monotonic()
        self.assertEqual([r.status for r in after], [200, 200])
        self.assertEqual([r.header(b"x-ratelimit-remaining-requests") for r in after], [b"1", b"0"])
        self.assertEqual(refused.status, 429)
        # The first fallback admission, made between one timeout after the
        # first question and its answer, is the one that expires first.
        retry_after = int(refused.header(b"retry-after") or b"0")
        earliest = 900 - (refused_answered - (first_asked + ADMIT_TIMEOUT))
        latest = 900 - (refused_asked - first_answered)
        self.assertTrue(earliest - 1 < retry_after < latest + 1, (earliest, retry_after, latest))

        # One connection: one worker decided all seven, four while the parent was stopped.
        def served_by() -> list[int]:
            line = "worker {}: 127.0.0.1 POST /v1/chat/completions"
            return sorted(process.text().count(line.format(worker)) for worker in (1, 2))

        await eventually(lambda: served_by() == [0, 7], timeout=10)
