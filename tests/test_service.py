"""Tests for L{llmgw.service}: how the services are wired, key reloads, draining,
and a port that cannot be bound."""

from __future__ import annotations

import errno
import io
import os
import signal
import socket
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import llmgw
from llmgw.cluster import Supervisor, WorkerProcess
from llmgw.health import HealthChecker
from llmgw.keys import KeyRing
from llmgw.logs import ACCESS_LOG_BATCH_SECONDS, AccessLogFile
from llmgw.options import Config, Options
from llmgw.ratelimit import SlidingWindowLimiter
from llmgw.record import RequestRecord
from llmgw.service import (
    AccessLogService,
    DrainService,
    KeyReloadService,
    LocalCommands,
    MetricsListener,
    SweepService,
    clear_exit_signal,
    make_service,
)
from llmgw.site import GatewaySite
from llmgw.startup import StartupFailure, cannot_listen_message, refuse_to_start
from tests.loopback import (
    eventually,
    free_port,
    gateway_config,
    inline,
    reactor,
    request,
    start_upstream,
)
from tests.test_keys import capture_events
from tests.test_logs import finished_record


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

    def test_replicas_are_checked_in_process(self) -> None:
        """With --upstream and one worker, the checks feed this process's router."""
        upstreams = ("https://127.0.0.1:8001", "https://127.0.0.1:8002")
        top = make_service(
            Config(workers=1, upstreams=upstreams), MemoryReactorClock(), console=False
        )
        (checker,) = [s for s in top if isinstance(s, HealthChecker)]
        self.assertEqual(list(checker.replicas), list(upstreams))
        (server,) = [s for s in top if isinstance(s, StreamServerEndpointService)]
        resource = server.factory.resource
        checker.on_change(upstreams[1], False, None)
        self.assertEqual([r.up for r in resource.router.replicas], [True, False])

    def test_replicas_are_checked_by_the_parent(self) -> None:
        upstreams = ("https://127.0.0.1:8001", "https://127.0.0.1:8002")
        top = make_service(
            Config(workers=2, upstreams=upstreams), MemoryReactorClock(), console=False
        )
        (supervisor,) = [s for s in top if isinstance(s, Supervisor)]
        (checker,) = [s for s in top if isinstance(s, HealthChecker)]
        self.assertIs(supervisor.health, checker)
        self.assertEqual(checker.on_change, supervisor.replica_state_changed)
        self.assertEqual(checker.interval, 5.0)

    def test_lone_upstream_is_never_checked(self) -> None:
        """Nothing reaches a lone --aihost in the background."""
        for workers in (1, 2):
            top = make_service(Config(workers=workers), MemoryReactorClock(), console=False)
            self.assertEqual([s for s in top if isinstance(s, HealthChecker)], [])

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


class MetricsWiringTests(SynchronousTestCase):
    def test_off_unless_asked(self) -> None:
        for workers in (1, 2):
            top = make_service(Config(workers=workers), MemoryReactorClock(), console=False)
            self.assertNotIn(MetricsListener, [type(s) for s in top])

    def test_in_process_listener_outlives_the_drain(self) -> None:
        """Added before the drain, so that MultiService stops it after the drain began."""
        config = Config(workers=1, metrics_bind="[::1]:9464")
        kinds = [type(s) for s in make_service(config, MemoryReactorClock(), console=False)]
        self.assertLess(kinds.index(MetricsListener), kinds.index(DrainService))

    def test_parent_listener_waits_for_the_workers(self) -> None:
        clock = MemoryReactorClock()
        top = make_service(Config(workers=2, metrics_bind="127.0.0.1:9464"), clock, console=False)
        kinds = [type(s) for s in top]
        self.assertLess(kinds.index(MetricsListener), kinds.index(Supervisor))
        (listener,) = [s for s in top if isinstance(s, MetricsListener)]
        (supervisor,) = [s for s in top if isinstance(s, Supervisor)]
        listener.privilegedStartService()
        self.assertEqual(clock.tcpServers[0][0:1], (9464,))
        self.assertEqual(clock.tcpServers[0][3], "127.0.0.1")
        worker = WorkerProcess(supervisor, 1)
        supervisor.workers[1] = worker
        stopped = listener.stopService()
        self.assertNoResult(stopped)
        worker.ended.callback(None)
        self.successResultOf(stopped)


class MetricsInProcessTests(TestCase):
    """One worker: the process holds its own totals and serves them on --metrics-bind."""

    timeout = 30

    @inline
    async def test_served_on_its_own_port_only(self) -> None:
        upstream = start_upstream(self)
        api_port, metrics_port = free_port(), free_port()
        config = gateway_config(
            upstream, workers=1, bindport=api_port, metrics_bind=f"127.0.0.1:{metrics_port}"
        )
        top = make_service(config, reactor)
        console = list(top)[-1]
        console.disownServiceParent()  # its commands are used, not a terminal
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        reply = await request(self, api_port, "GET", b"/metrics")
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.json()["error"]["code"], "not_found")
        (server,) = [
            s
            for s in top
            if isinstance(s, StreamServerEndpointService) and not isinstance(s, MetricsListener)
        ]
        site = server.factory
        assert isinstance(site, GatewaySite)
        # What the request path hands its observers for every request it finishes.
        finished = RequestRecord(
            "r1", 0.0, "127.0.0.1", "POST", "/v1/chat/completions", status=502, finished=0.25
        )
        for observer in site.record_observers:
            observer(finished)
        reply = await request(self, metrics_port, "GET", b"/metrics")
        self.assertEqual(reply.status, 200)
        self.assertTrue(
            reply.header(b"content-type").startswith(b"text/plain; version="),  # type: ignore[union-attr]
        )
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.body.decode())
            for sample in family.samples
        }
        chat = ("route", "/v1/chat/completions")
        self.assertEqual(samples[("llmgw_requests_total", (("code", "502"), chat))], 1.0)
        self.assertEqual(samples[("llmgw_request_duration_seconds_sum", (chat,))], 0.25)
        self.assertEqual(samples[("llmgw_workers", ())], 1.0)
        self.assertEqual(samples[("llmgw_requests_in_flight", ())], 0.0)
        self.assertEqual(samples[("llmgw_worker_restarts_total", ())], 0.0)
        reply = await request(self, metrics_port, "GET", b"/v1/models")
        self.assertEqual((reply.status, reply.body), (404, b"Not Found: metrics are at /metrics\n"))
        # The console's figures are the same totals'.
        stats = await console.commands.stats()
        (row,) = stats["workers"]
        # Every response counted, the 404 above too once the request path records it.
        responses = sum(v for (name, _), v in samples.items() if name == "llmgw_requests_total")
        self.assertIn(responses, (1.0, 2.0))
        self.assertEqual((row["served"], row["refused"], row["upstream_errors"]), (responses, 0, 1))


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


class AccessLogWiringTests(SynchronousTestCase):
    """C{--access-log}: opened first; written in process with one worker, else by the parent."""

    def test_one_worker_writes_it(self) -> None:
        path = self.mktemp()
        clock = MemoryReactorClock()
        top = make_service(Config(workers=1, access_log=path), clock, console=False)
        services = list(top)
        self.assertIsInstance(services[0], AccessLogService)
        services[0].startService()
        self.addCleanup(services[0].access_log.close)
        server = services[-1]
        assert isinstance(server, StreamServerEndpointService)
        site = server.factory
        assert isinstance(site, GatewaySite)
        [reload] = [s for s in services if isinstance(s, KeyReloadService)]
        self.assertIs(reload.access_log, services[0].access_log)
        self.assertEqual(len(site.record_observers), 2)  # the access log, and the metrics
        for observer in site.record_observers:
            observer(finished_record())
        clock.advance(ACCESS_LOG_BATCH_SECONDS)
        self.assertEqual(Path(path).read_text().count('"request_id":"0123456789ab00000007"'), 1)

    def test_last_lines_written_after_the_reactor_stops(self) -> None:
        path = self.mktemp()
        clock = MemoryReactorClock()
        top = make_service(Config(workers=1, access_log=path), clock, console=False)
        opener = next(iter(top))
        assert isinstance(opener, AccessLogService) and opener.lines is not None
        opener.startService()
        self.addCleanup(opener.access_log.close)
        from tests.test_logs import finished_record

        opener.lines.add_record(finished_record())
        self.assertEqual(Path(path).read_text(), "")
        [flush] = clock.triggers["after"]["shutdown"]
        flush[0]()
        self.assertEqual(Path(path).read_text().count("\n"), 1)

    def test_workers_send_theirs_to_the_parent(self) -> None:
        path = self.mktemp()
        top = make_service(Config(workers=2, access_log=path), MemoryReactorClock(), console=False)
        (supervisor,) = [s for s in top if isinstance(s, Supervisor)]
        (opener,) = [s for s in top if isinstance(s, AccessLogService)]
        self.assertIs(supervisor.access_log, opener.access_log)
        self.assertEqual(list(top).index(opener), 0)

    def test_off(self) -> None:
        top = make_service(Config(workers=1), MemoryReactorClock(), console=False)
        self.assertNotIn(AccessLogService, [type(s) for s in top])

    def test_cannot_open_ends_start_up(self) -> None:
        devnull = open(os.devnull, "w")
        self.addCleanup(devnull.close)
        self.patch(sys, "__stderr__", devnull)
        capture_events(self)
        path = os.path.join(self.mktemp(), "access.log")
        service = AccessLogService(AccessLogFile(path), MemoryReactorClock())
        failure = self.assertRaises(StartupFailure, service.startService)
        self.assertEqual(str(failure), f"--access-log {path}: No such file or directory")
        self.assertFalse(service.running)


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

    @inline
    async def test_sighup_reloads_the_parents_keys_for_the_health_checks(self) -> None:
        """
        With workers, the parent checks the replicas with the upstream key: a
        SIGHUP must rotate it there too, or every replica goes down once the
        model servers accept only the new key.
        """
        path = Path(self.mktemp())
        path.write_bytes(b"old-key\n")
        upstreams = ("https://127.0.0.1:8001", "https://127.0.0.1:8002")
        config = Config(workers=2, upstreams=upstreams, aikey_file=str(path))
        top = make_service(config, reactor, console=False)
        (supervisor,) = [s for s in top if isinstance(s, Supervisor)]
        (checker,) = [s for s in top if isinstance(s, HealthChecker)]
        path.write_bytes(b"new-key\n")
        supervisor._forward_hangup(signal.SIGHUP, None)
        await eventually(lambda: checker.keys.upstream_authorization == b"Bearer new-key")

    @inline
    async def test_sighup_reopens_the_access_log(self) -> None:
        path = self.mktemp()
        access_log = AccessLogFile(path)
        access_log.open()
        self.addCleanup(access_log.close)
        service = KeyReloadService(KeyRing(None, None), reactor, access_log)
        service.startService()
        self.addCleanup(service.stopService)
        os.rename(path, path + ".1")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: os.path.exists(path))
        access_log.write("new\n")
        self.assertEqual(Path(path).read_text(), "new\n")


def cannot_listen(code: int, interface: str = "127.0.0.1", port: int = 42069) -> CannotListenError:
    return CannotListenError(interface, port, OSError(code, os.strerror(code)))


class CannotListenMessageTests(SynchronousTestCase):
    """One line, named by the flag that fixes it."""

    def test_busy_port(self) -> None:
        self.assertEqual(
            cannot_listen_message(cannot_listen(errno.EADDRINUSE)),
            "--bindport 42069: address already in use",
        )
        self.assertEqual(
            cannot_listen_message(cannot_listen(errno.EADDRINUSE, "::1"), "--port", "--bindip"),
            "--port 42069: address already in use",
        )

    def test_privileged_port(self) -> None:
        self.assertEqual(
            cannot_listen_message(cannot_listen(errno.EACCES, port=80)),
            "--bindport 80: permission denied",
        )

    def test_address_this_host_does_not_have(self) -> None:
        self.assertEqual(
            cannot_listen_message(cannot_listen(errno.EADDRNOTAVAIL, "192.0.2.1")),
            "--bindip 192.0.2.1: cannot assign requested address",
        )

    def test_anything_else_names_both(self) -> None:
        self.assertEqual(
            cannot_listen_message(cannot_listen(errno.ENOBUFS, "::1")),
            "--bindip ::1 --bindport 42069: no buffer space available",
        )


def occupied_port(test: TestCase | SynchronousTestCase) -> int:
    """A port on 127.0.0.1 that something else listens on, for the test's length."""
    holder = socket.socket()
    test.addCleanup(holder.close)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return int(holder.getsockname()[1])


class RefuseToStartTests(SynchronousTestCase):
    def stderr(self, path: str) -> io.TextIOWrapper:
        stream = open(path, "w")
        self.addCleanup(stream.close)
        self.patch(sys, "__stderr__", stream)
        return stream

    def test_one_line_on_stderr_and_exit_status_1(self) -> None:
        path = self.mktemp()
        self.stderr(path)
        failure = self.assertRaises(StartupFailure, refuse_to_start, "--bindport 1: why")
        self.assertEqual(Path(path).read_text(), "--bindport 1: why\n")
        self.assertEqual((failure.code, str(failure)), (1, "--bindport 1: why"))
        # SystemExit: no traceback; Exception: a daemonizing twistd reports it.
        self.assertIsInstance(failure, SystemExit)
        self.assertIsInstance(failure, Exception)

    def test_a_daemon_logs_it(self) -> None:
        self.stderr(os.devnull)
        events = capture_events(self)
        self.assertRaises(StartupFailure, refuse_to_start, "--bindport 1: why")
        [event] = [e for e in events if e.get("log_namespace") == "llmgw.startup"]
        self.assertEqual((event["log_level"].name, event["line"]), ("error", "--bindport 1: why"))


class BusyPortTests(TestCase):
    """The gateway's own start on a port in use, in this process."""

    def start_on_busy_port(self, workers: int) -> None:
        port = occupied_port(self)
        path = self.mktemp()
        stream = open(path, "w")
        self.addCleanup(stream.close)
        self.patch(sys, "__stderr__", stream)
        top = make_service(Config(workers=workers, bindport=port), reactor, console=False)
        self.assertRaises(StartupFailure, top.privilegedStartService)
        self.assertEqual(Path(path).read_text(), f"--bindport {port}: address already in use\n")

    def test_one_worker(self) -> None:
        self.start_on_busy_port(1)

    def test_workers(self) -> None:
        self.start_on_busy_port(2)

    def test_metrics_port(self) -> None:
        """A --metrics-bind port in use: one line naming that flag."""
        port = occupied_port(self)
        path = self.mktemp()
        stream = open(path, "w")
        self.addCleanup(stream.close)
        self.patch(sys, "__stderr__", stream)
        for workers in (1, 2):
            config = Config(workers=workers, bindport=free_port(), metrics_bind=f"127.0.0.1:{port}")
            top = make_service(config, reactor, console=False)
            self.assertRaises(StartupFailure, top.privilegedStartService)
        self.assertEqual(
            Path(path).read_text(), f"--metrics-bind 127.0.0.1:{port}: address already in use\n" * 2
        )


TWISTD = "from twisted.scripts.twistd import run; run()"


async def run_to_exit(*arguments: str) -> tuple[str, str, int]:
    """Run C{python ARGUMENTS} with this checkout on its path: its output, errors and status."""
    root = str(Path(llmgw.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "NO_COLOR": "1"}
    out, err, code = await getProcessOutputAndValue(
        sys.executable, arguments, env=env, reactor=reactor
    )
    return out.decode(), err.decode(), code


class BusyPortProcessTests(TestCase):
    """C{llmgw} and C{twistd llmgw} on a port in use: one line, no traceback, status 1."""

    timeout = 120

    async def gateway(self, workers: int, *command: str) -> None:
        port = occupied_port(self)
        flags = ["--bindport", str(port), "--aihost", "127.0.0.1", "--workers", str(workers)]
        out, err, code = await run_to_exit(*command, *flags)
        self.assertEqual(err, f"--bindport {port}: address already in use\n", out)
        self.assertNotIn("Traceback", out)
        self.assertEqual(code, 1)

    @inline
    async def test_llmgw_with_one_worker(self) -> None:
        await self.gateway(1, "-m", "llmgw.cli")

    @inline
    async def test_llmgw_with_workers(self) -> None:
        await self.gateway(2, "-m", "llmgw.cli")

    @inline
    async def test_twistd_in_the_foreground(self) -> None:
        await self.gateway(2, "-c", TWISTD, "--nodaemon", "--pidfile=", "llmgw")

    @inline
    async def test_twistd_daemon(self) -> None:
        """The daemon's log says it, and twistd tells the command that started it."""
        port = occupied_port(self)
        pidfile, logfile = Path(self.mktemp()), Path(self.mktemp())
        twistd = ["-c", TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "llmgw"]
        flags = ["--bindport", str(port), "--aihost", "127.0.0.1", "--workers", "1"]
        out, err, code = await run_to_exit(*twistd, *flags)
        message = f"--bindport {port}: address already in use"
        self.assertEqual(
            (out, err, code),
            (
                "",
                f"An error has occurred: b'llmgw.startup.StartupFailure: {message}'\n"
                "Please look at log file for more information.\n",
                1,
            ),
        )
        await eventually(lambda: not pidfile.exists(), timeout=10)
        log = logfile.read_text()
        self.assertIn(f" [llmgw.startup#error] {message}\n", log)
        self.assertNotIn("Traceback", log)
