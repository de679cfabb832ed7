"""Tests for L{llmgw.service}: how the services are wired, key reloads, draining."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmgw.cluster import Supervisor
from llmgw.keys import KeyRing
from llmgw.options import Config, Options
from llmgw.ratelimit import SlidingWindowLimiter
from llmgw.service import (
    DrainService,
    KeyReloadService,
    LocalCommands,
    SweepService,
    clear_exit_signal,
    make_service,
)
from llmgw.site import GatewaySite
from tests.loopback import eventually, inline, reactor


class WiringTests(SynchronousTestCase):
    def test_one_worker_serves_in_process(self) -> None:
        top = make_service(Config(workers=1, bindport=8080), MemoryReactorClock(), console=False)
        kinds = [type(service) for service in top]
        self.assertEqual(
            kinds, [KeyReloadService, DrainService, SweepService, StreamServerEndpointService]
        )
        server = list(top)[-1]
        assert isinstance(server, StreamServerEndpointService)
        self.assertIsInstance(server.factory, GatewaySite)
        self.assertTrue(server._raiseSynchronously)

    def test_drain_before_listener_stops(self) -> None:
        """MultiService stops children in reverse: the listener closes, then the drain."""
        top = make_service(Config(workers=1), MemoryReactorClock(), console=False)
        names = [type(s).__name__ for s in reversed(list(top))]
        self.assertLess(names.index("StreamServerEndpointService"), names.index("DrainService"))

    def test_rate_limit_off(self) -> None:
        top = make_service(Config(workers=1, rate_limit=0), MemoryReactorClock(), console=False)
        self.assertNotIn(SweepService, [type(s) for s in top])

    def test_workers_get_the_supervisor(self) -> None:
        top = make_service(Config(workers=3), MemoryReactorClock(), console=False)
        (supervisor,) = [s for s in top if isinstance(s, Supervisor)]
        self.assertEqual(supervisor.config.workers, 3)
        self.assertIsInstance(supervisor.limiter, SlidingWindowLimiter)
        self.assertNotIn(StreamServerEndpointService, [type(s) for s in top])

    def test_console_added_last(self) -> None:
        top = make_service(Config(workers=1), MemoryReactorClock())
        self.assertEqual(type(list(top)[-1]).__name__, "ConsoleService")

    def test_nothing_connects_at_start(self) -> None:
        """Building the service contacts no one: only the listener exists."""
        clock = MemoryReactorClock()
        make_service(Config(workers=1), clock, console=False)
        self.assertEqual(clock.tcpClients, [])

    def test_options_to_service(self) -> None:
        options = Options()
        options.parseOptions(["--workers", "1", "--bindport", "1234"])
        top = make_service(options.config, MemoryReactorClock(), console=False)
        self.assertEqual(len(list(top)), 4)


class ExitStatusTests(SynchronousTestCase):
    def test_graceful_stop_exits_zero(self) -> None:
        clock = MemoryReactorClock()
        clock._exitSignal = signal.SIGTERM  # type: ignore[attr-defined]
        clear_exit_signal(clock)
        self.assertIsNone(clock._exitSignal)  # type: ignore[attr-defined]


class LocalCommandsTests(SynchronousTestCase):
    def test_stats_and_verbose(self) -> None:
        clock = MemoryReactorClock()
        top = make_service(Config(workers=1), clock)
        commands = list(top)[-1].commands
        assert isinstance(commands, LocalCommands)
        clock.advance(5)
        stats = self.successResultOf(commands.stats())
        self.assertEqual(stats["tracked_clients"], 0)
        (row,) = stats["workers"]
        self.assertEqual((row["worker"], row["served"], row["uptime"]), (1, 0, 5))
        self.successResultOf(commands.set_verbose(True))
        self.assertTrue(commands.resource.request_log.verbose)


class KeyReloadTests(TestCase):
    @inline
    async def test_sighup_reloads_keys(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"old-key\n")
        keys = KeyRing(None, str(path))
        service = KeyReloadService(keys, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        path.write_bytes(b"# rotated\nnew-key\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: keys.accepts(b"new-key"))
        self.assertFalse(keys.accepts(b"old-key"))
        self.flushLoggedErrors()
