"""Tests for L{llmgw.worker}: the parent's limiter seen from a worker, and the adopted port.

The limiter's unit tests wire a worker's L{RemoteLimiter} to the parent's
L{ParentSide} through AMP in memory, on a fake clock.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmgw.cluster import ParentSide
from llmgw.ratelimit import Decision, SlidingWindowLimiter
from llmgw.worker import RemoteLimiter, SharedListeningSocket, stop_accepting
from tests.loopback import eventually, inline, reactor


class LoopbackAMP:
    """Two AMP peers wired back to back in memory."""

    def __init__(self, server: amp.AMP, client: amp.AMP) -> None:
        self.server, self.client = server, client
        self.server_transport, self.client_transport = StringTransport(), StringTransport()
        server.makeConnection(self.server_transport)
        client.makeConnection(self.client_transport)

    def pump(self) -> None:
        while self.server_transport.value() or self.client_transport.value():
            to_client, to_server = self.server_transport.value(), self.client_transport.value()
            self.server_transport.clear()
            self.client_transport.clear()
            self.client.dataReceived(to_client)
            self.server.dataReceived(to_server)


class RemoteLimiterTests(SynchronousTestCase):
    def test_decisions_come_from_the_parent(self) -> None:
        clock = Clock()
        shared = SlidingWindowLimiter(2, 60, clock)
        worker_side = amp.AMP()
        wire = LoopbackAMP(ParentSide(shared), worker_side)
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
        worker_side = amp.AMP()
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
