"""Tests for L{llmgw.cluster}: real processes on loopback.

Each test runs C{python -m twisted -n llmgw --workers 2} in front of a stand-in
model served by this test process, so the test can see what reached the model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmgw.cluster import (
    ACCESS_LOG_CHUNK,
    ParentSide,
    access_log_chunks,
    config_from_json,
    config_to_json,
)
from llmgw.logs import AccessLogFile
from llmgw.mock import Behaviour
from llmgw.options import Config
from tests.loopback import (
    Reply,
    Upstream,
    chat_body,
    eventually,
    free_port,
    inline,
    reactor,
    request,
    start_upstream,
)


class GatewayProcess(ProcessProtocol):
    """A C{twistd -n llmgw} process and everything it printed."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()
        self.status: Any = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.status = reason.value
        self.ended.callback(getattr(reason.value, "exitCode", None))

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker, from the parent's log."""
        pids: dict[int, int] = {}
        for number, pid in re.findall(r"Started worker (\d+) \(pid (\d+)\)", self.text()):
            pids[int(number)] = int(pid)
        return pids

    def served_by(self, worker: int) -> int:
        return len(re.findall(rf"worker {worker}: \S+ POST /v1/chat/completions 200", self.text()))


def start_gateway_process(
    test: TestCase, upstream: Upstream, *arguments: str, workers: int = 2
) -> tuple[GatewayProcess, int]:
    port = free_port()
    process = GatewayProcess()
    args = [
        sys.executable,
        "-m",
        "llmgw.cli",
        "--bindport",
        str(port),
        "--aihost",
        "localhost",
        "--aihostport",
        str(upstream.port),
        "--aica",
        upstream.ca_file,
        "--workers",
        str(workers),
        *arguments,
    ]
    env = {**os.environ, "NO_COLOR": "1"}
    transport = reactor.spawnProcess(
        process, sys.executable, args, env=env, childFDs={0: "w", 1: "r", 2: "r"}
    )

    def stop() -> Deferred[Any]:
        if process.ended.called:
            return defer.succeed(None)
        for pid in process.worker_pids().values():
            _kill(pid, signal.SIGKILL)
        transport.signalProcess("KILL")
        return process.ended

    test.addCleanup(stop)
    return process, port


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


async def serving(
    test: TestCase, process: GatewayProcess, port: int, timeout: float = 30.0
) -> None:
    """Wait until the gateway answers /healthz."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = await request(test, port, "GET", b"/healthz")
            if reply.status == 200:
                return
        except Exception:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the gateway never served:\n" + process.text())
        await task.deferLater(reactor, 0.05, lambda: None)


async def many(test: TestCase, port: int, count: int, concurrency: int, body: bytes) -> list[int]:
    """C{count} chat requests, C{concurrency} at a time, each on its own connection."""
    statuses: list[int] = []
    pending = iter(range(count))

    async def lane() -> None:
        for _ in pending:
            reply = await request(test, port, body=body)
            statuses.append(reply.status)

    await defer.gatherResults(
        [Deferred.fromCoroutine(lane()) for _ in range(concurrency)], consumeErrors=True
    )
    return statuses


class ClusterTests(TestCase):
    timeout = 120

    @inline
    async def test_two_workers_serve(self) -> None:
        upstream = start_upstream(self)
        process, port = start_gateway_process(self, upstream)
        await serving(self, process, port)
        await eventually(lambda: process.text().count("serving") == 2, timeout=30)
        statuses = await many(self, port, 60, 12, chat_body())
        self.assertEqual(statuses, [200] * 60)
        await eventually(lambda: process.served_by(1) + process.served_by(2) == 60)
        self.assertGreater(process.served_by(1), 0, process.text())
        self.assertGreater(process.served_by(2), 0, process.text())
        parent = process_pid(process)
        children = child_pids(parent)
        self.assertEqual(sorted(children), sorted(process.worker_pids().values()))

    @inline
    async def test_killed_worker_replaced(self) -> None:
        upstream = start_upstream(self)
        process, port = start_gateway_process(self, upstream)
        await serving(self, process, port)
        await eventually(lambda: len(process.worker_pids()) == 2, timeout=30)
        old = process.worker_pids()[1]
        before = process.served_by(1)
        os.kill(old, signal.SIGKILL)
        killed_at = time.monotonic()

        async def new_worker_served() -> bool:
            pids = process.worker_pids()
            if pids.get(1) in (None, old):
                return False
            await many(self, port, 4, 4, chat_body())
            return process.served_by(1) > before

        # How fast it is replaced is measured in make bench, not asserted here:
        # a loaded machine running the suite in parallel must not fail it.
        while not await new_worker_served():
            await task.deferLater(reactor, 0.02, lambda: None)
            if time.monotonic() - killed_at > 30:
                self.fail("no new worker 1 served:\n" + process.text())
        self.assertIn(f"Worker 1 (pid {old})", process.text())

    @inline
    async def test_killed_parent_takes_workers_with_it(self) -> None:
        upstream = start_upstream(self)
        process, port = start_gateway_process(self, upstream)
        await serving(self, process, port)
        await eventually(lambda: len(process.worker_pids()) == 2, timeout=30)
        workers = list(process.worker_pids().values())
        os.kill(process_pid(process), signal.SIGKILL)
        await process.ended
        await eventually(lambda: not any(alive(pid) for pid in workers), timeout=10)

    @inline
    async def test_sigterm_drains_in_flight_requests(self) -> None:
        """200 slow requests in flight at SIGTERM all complete, and the exit code is 0."""
        upstream = start_upstream(self, defaults=Behaviour(delay=1.5))
        process, port = start_gateway_process(self, upstream, "--rate-limit", "0")
        await serving(self, process, port)
        await eventually(lambda: len(process.worker_pids()) == 2, timeout=30)
        workers = list(process.worker_pids().values())
        replies = [
            Deferred.fromCoroutine(request(self, port, body=chat_body(f"r{i}"))) for i in range(200)
        ]
        await eventually(lambda: upstream.model.started == 200, timeout=30)
        os.kill(process_pid(process), signal.SIGTERM)
        try:
            results = await defer.gatherResults(replies, consumeErrors=True)
        except defer.FirstError as e:
            # What the gateway logged says why a request in hand was dropped.
            self.fail(f"{e.subFailure.getErrorMessage()}\n{process.text()}")
        self.assertEqual([r.status for r in results], [200] * 200)
        code = await process.ended
        self.assertEqual(code, 0, process.text())
        self.assertFalse(any(alive(pid) for pid in workers))

    @inline
    async def test_drain_refuses_new_connections(self) -> None:
        """
        From the moment a stop begins, a new connection is refused (not accepted
        and reset later), while the request in hand finishes and the exit is 0.
        """
        upstream = start_upstream(self)
        process, port = start_gateway_process(self, upstream, "--grace", "20")
        await serving(self, process, port)
        await eventually(lambda: len(process.worker_pids()) == 2, timeout=30)
        slow = Deferred.fromCoroutine(
            request(self, port, body=chat_body("slow", mock={"delay": 3.0}))
        )
        await eventually(lambda: upstream.model.started == 1, timeout=10)
        os.kill(process_pid(process), signal.SIGTERM)
        await eventually(lambda: "Stopping 2 workers" in process.text(), timeout=10)
        with socket.socket() as late:
            late.settimeout(5)
            self.assertRaises(ConnectionRefusedError, late.connect, ("127.0.0.1", port))
        self.assertFalse(slow.called, "the slow request ended before the refusal was tried")
        reply = await slow
        self.assertEqual((reply.status, reply.json()["object"]), (200, "chat.completion"))
        self.assertEqual(await process.ended, 0, process.text())
        self.assertNotIn("Traceback", process.text())
        self.assertNotIn("Unhandled", process.text())

    @inline
    async def test_limit_holds_across_workers(self) -> None:
        upstream = start_upstream(self)
        process, port = start_gateway_process(self, upstream)
        await serving(self, process, port)
        await eventually(lambda: process.text().count("serving") == 2, timeout=30)
        statuses = await many(self, port, 1100, 20, chat_body())
        self.assertEqual((statuses.count(200), statuses.count(429)), (1000, 100))
        self.assertEqual(upstream.model.started, 1000)
        self.assertGreater(process.served_by(1), 0)
        self.assertGreater(process.served_by(2), 0)


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


async def scrape(test: TestCase, port: int) -> Samples:
    """C{GET /metrics}, parsed with prometheus_client's own parser."""
    reply = await request(test, port, "GET", b"/metrics")
    test.assertEqual(reply.status, 200, reply.body)
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def requests_counted(samples: Samples, route: str, code: str) -> float:
    return samples.get("llmgw_requests_total", {}).get((("code", code), ("route", route)), 0.0)


async def metrics_where(
    test: TestCase, port: int, condition: Any, timeout: float = 15.0
) -> Samples:
    """Scrape until C{condition(samples)} holds (workers send deltas once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(test, port)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"the metrics never got there: {samples}")
        await task.deferLater(reactor, 0.1, lambda: None)


class MetricsTests(TestCase):
    """C{--metrics-bind} with two real workers: the parent sums what they send."""

    timeout = 120

    async def start(self, upstream: Upstream, *arguments: str) -> tuple[GatewayProcess, int, int]:
        metrics_port = free_port()
        process, port = start_gateway_process(
            self, upstream, "--metrics-bind", f"127.0.0.1:{metrics_port}", *arguments
        )
        await serving(self, process, port)
        await eventually(lambda: len(process.worker_pids()) == 2, timeout=30)
        return process, port, metrics_port

    @inline
    async def test_sums_over_two_workers(self) -> None:
        upstream = start_upstream(self)
        process, port, metrics_port = await self.start(upstream)
        samples = await scrape(self, metrics_port)
        self.assertEqual(samples["llmgw_workers"], {(): 2.0})
        self.assertEqual(samples["llmgw_worker_restarts_total"], {(): 0.0})
        self.assertEqual(list(samples["llmgw_build_info"].values()), [1.0])
        self.assertNotIn("llmgw_upstream_up", samples, "a lone --aihost is never checked")
        # The API port never serves the metrics.
        reply = await request(self, port, "GET", b"/metrics")
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.json()["error"]["code"], "not_found")

        # Twelve requests to each worker: the other is stopped while they are accepted.
        slow = chat_body("slow", mock={"delay": 4.0})
        replies: list[Deferred[Reply]] = []
        pids = process.worker_pids()
        for stopped in (2, 1):
            os.kill(pids[stopped], signal.SIGSTOP)
            self.addCleanup(_kill, pids[stopped], signal.SIGCONT)
            replies += [Deferred.fromCoroutine(request(self, port, body=slow)) for _ in range(12)]
            sent = len(replies)
            await eventually(lambda: upstream.model.started == sent, timeout=30)  # noqa: B023
            os.kill(pids[stopped], signal.SIGCONT)
        origin = f"https://localhost:{upstream.port}"
        samples = await metrics_where(
            self, metrics_port, lambda s: s["llmgw_requests_in_flight"] == {(): 24.0}
        )
        self.assertEqual(samples["llmgw_upstream_in_flight"], {(("upstream", origin),): 24.0})
        self.assertEqual(samples["llmgw_limiter_clients"], {(): 1.0})
        results = await defer.gatherResults(replies, consumeErrors=True)
        self.assertEqual([r.status for r in results], [200] * 24)
        # The 24 in flight were summed over both workers.
        await eventually(lambda: process.served_by(1) + process.served_by(2) == 24)
        self.assertEqual((process.served_by(1), process.served_by(2)), (12, 12))
        await metrics_where(
            self, metrics_port, lambda s: s["llmgw_requests_in_flight"] == {(): 0.0}
        )
        chat = "/v1/chat/completions"
        samples = await metrics_where(
            self, metrics_port, lambda s: requests_counted(s, chat, "200") == 24
        )
        self.assertEqual(requests_counted(samples, "/metrics", "404"), 0)
        self.assertEqual(requests_counted(samples, "other", "404"), 1)
        self.assertEqual(samples["llmgw_request_duration_seconds_count"][(("route", chat),)], 24.0)
        self.assertEqual(
            samples["llmgw_upstream_requests_total"],
            {(("outcome", "ok"), ("upstream", origin)): 24.0},
        )

    @inline
    async def test_killed_worker(self) -> None:
        """A worker killed: the totals keep its counts, its gauges go, the restart is counted."""
        upstream = start_upstream(self)
        process, port, metrics_port = await self.start(upstream)
        statuses = await many(self, port, 20, 4, chat_body())
        self.assertEqual(statuses, [200] * 20)
        chat = "/v1/chat/completions"
        await metrics_where(self, metrics_port, lambda s: requests_counted(s, chat, "200") == 20)
        old = process.worker_pids()[1]
        os.kill(old, signal.SIGKILL)
        samples = await metrics_where(
            self, metrics_port, lambda s: s["llmgw_worker_restarts_total"] == {(): 1.0}
        )
        self.assertEqual(requests_counted(samples, chat, "200"), 20)
        await eventually(lambda: process.worker_pids()[1] != old, timeout=10)
        await metrics_where(self, metrics_port, lambda s: s["llmgw_workers"] == {(): 2.0})
        await many(self, port, 10, 4, chat_body())
        samples = await metrics_where(
            self, metrics_port, lambda s: requests_counted(s, chat, "200") == 30
        )
        self.assertEqual(samples["llmgw_worker_restarts_total"], {(): 1.0})

    @inline
    async def test_metrics_served_through_the_drain(self) -> None:
        """
        A stop drains every worker; /metrics answers until they have ended,
        so a scrape sees the drain, and the workers' last counts with it.
        """
        upstream = start_upstream(self)
        process, port, metrics_port = await self.start(upstream, "--grace", "20")
        slow = chat_body("slow", mock={"delay": 3.0})
        replies = [Deferred.fromCoroutine(request(self, port, body=slow)) for _ in range(4)]
        await eventually(lambda: upstream.model.started == 4, timeout=30)
        os.kill(process_pid(process), signal.SIGTERM)
        await eventually(lambda: "Stopping 2 workers" in process.text(), timeout=10)
        await metrics_where(
            self, metrics_port, lambda s: s["llmgw_requests_in_flight"] == {(): 4.0}
        )
        self.assertFalse(any(reply.called for reply in replies))
        results = await defer.gatherResults(replies, consumeErrors=True)
        self.assertEqual([r.status for r in results], [200] * 4)
        self.assertEqual(await process.ended, 0, process.text())
        self.assertNotIn("Traceback", process.text())
        self.assertNotIn("metrics delta", process.text())


def process_pid(process: GatewayProcess) -> int:
    assert process.transport is not None
    pid = process.transport.pid
    assert pid is not None
    return int(pid)


def child_pids(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().split(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                children.append(int(entry))
    return children


def read_lines(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


class AccessLogClusterTests(TestCase):
    """Two real workers, one C{--access-log} file written by the parent, reopened on SIGHUP."""

    timeout = 120

    @inline
    async def test_one_file_for_two_workers_reopened_on_hangup(self) -> None:
        upstream = start_upstream(self)
        path = os.path.abspath(self.mktemp())
        process, port = start_gateway_process(self, upstream, "--access-log", path)
        await serving(self, process, port)
        await eventually(lambda: process.text().count("serving") == 2, timeout=30)
        ids: list[bytes | None] = []

        async def send(count: int) -> None:
            for _ in range(count):
                reply = await request(self, port, body=chat_body("one two"))
                self.assertEqual(reply.status, 200)
                ids.append(reply.header(b"x-request-id"))

        # Twenty requests to each worker: the other is stopped while they are served.
        pids = process.worker_pids()
        for stopped in (2, 1):
            os.kill(pids[stopped], signal.SIGSTOP)
            self.addCleanup(_kill, pids[stopped], signal.SIGCONT)
            await defer.gatherResults(
                [Deferred.fromCoroutine(send(5)) for _ in range(4)], consumeErrors=True
            )
            os.kill(pids[stopped], signal.SIGCONT)

        # /healthz, asked while waiting for the gateway to serve, has lines too.
        def chats() -> list[dict[str, Any]]:
            return [e for e in read_lines(path) if e["route"] == "/v1/chat/completions"]

        await eventually(lambda: len(chats()) == 40, timeout=10)
        self.assertEqual(sorted(e["request_id"].encode() for e in chats()), sorted(ids))
        # With --access-log, the JSON lines replace the text access line.
        self.assertEqual((process.served_by(1), process.served_by(2)), (0, 0))
        for entry in chats():
            self.assertEqual(
                {key: entry[key] for key in ("method", "status", "client", "attempts")},
                {"method": "POST", "status": 200, "client": "127.0.0.1", "attempts": 1},
            )
            self.assertEqual((entry["prompt_tokens"], entry["completion_tokens"]), (2, 2))
        os.rename(path, path + ".1")
        os.kill(process_pid(process), signal.SIGHUP)
        # The reopen is asynchronous: until the new file exists, lines go to the old one.
        await eventually(lambda: os.path.exists(path), timeout=10)
        before = len(read_lines(path + ".1"))
        ids.clear()
        await send(3)
        await eventually(lambda: len(read_lines(path)) == 3, timeout=10)
        # Each worker hands its lines on in batches: the file's order across
        # workers is the batches' order, not the replies'.
        self.assertEqual(sorted(e["request_id"].encode() for e in read_lines(path)), sorted(ids))
        self.assertEqual(len(read_lines(path + ".1")), before)


class AccessLogChunkTests(SynchronousTestCase):
    def test_small_batch_is_one_message(self) -> None:
        self.assertEqual(access_log_chunks("a\nb\n"), ["a\nb\n"])

    def test_large_batch_split_at_line_ends(self) -> None:
        line = "x" * 999 + "\n"
        batch = line * 150
        chunks = access_log_chunks(batch)
        self.assertEqual("".join(chunks), batch)
        self.assertEqual([len(chunk) for chunk in chunks], [60_000, 60_000, 30_000])
        for chunk in chunks:
            self.assertLessEqual(len(chunk), ACCESS_LOG_CHUNK)
            self.assertTrue(chunk.endswith("\n"))

    def test_line_longer_than_a_message_is_cut(self) -> None:
        chunks = access_log_chunks("a\n" + "y" * 70_000 + "\nb\n")
        self.assertEqual(chunks, ["a\n", "y" * (ACCESS_LOG_CHUNK - 1) + "\n", "b\n"])


class ParentAccessLogTests(SynchronousTestCase):
    def test_lines_appended(self) -> None:
        path = self.mktemp()
        access_log = AccessLogFile(path)
        access_log.open()
        self.addCleanup(access_log.close)
        parent = ParentSide()
        parent.access_log = access_log
        self.assertEqual(parent.access_log_lines(lines="{}\n{}\n"), {})
        with open(path) as f:
            self.assertEqual(f.read(), "{}\n{}\n")

    def test_no_file(self) -> None:
        self.assertEqual(ParentSide().access_log_lines(lines="{}\n"), {})


class ConfigTransportTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        import ipaddress

        config = Config(
            trusted_proxies=(ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("::1")),
            allowed_fields=frozenset({"chat_template"}),
            workers=3,
        )
        self.assertEqual(config_from_json(config_to_json(config)), config)


TWISTD = "from twisted.scripts.twistd import run; run()"


class DaemonTests(TestCase):
    timeout = 120

    @inline
    async def test_pidfile_kill_stops_everything(self) -> None:
        """C{twistd --pidfile --logfile llmgw}: C{kill $(cat pidfile)} stops parent and workers."""
        upstream = start_upstream(self)
        pidfile = os.path.abspath(self.mktemp())
        logfile = os.path.abspath(self.mktemp())
        port = free_port()
        launcher = GatewayProcess()
        args = [sys.executable, "-c", TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}"]
        args += ["llmgw", "--bindport", str(port), "--aihost", "localhost"]
        args += ["--aihostport", str(upstream.port), "--aica", upstream.ca_file, "--workers", "2"]
        reactor.spawnProcess(launcher, sys.executable, args, env=dict(os.environ))
        self.assertEqual(await launcher.ended, 0, launcher.text())
        await eventually(lambda: os.path.exists(pidfile), timeout=10)
        with open(pidfile) as f:
            parent = int(f.read())
        self.addCleanup(_kill, parent, signal.SIGKILL)
        await eventually(lambda: len(child_pids(parent)) == 2, timeout=30)
        workers = child_pids(parent)
        for pid in workers:
            self.addCleanup(_kill, pid, signal.SIGKILL)
        process = GatewayProcess()
        await serving(self, process, port)
        reply = await request(self, port, body=chat_body("daemon"))
        self.assertEqual(reply.status, 200)
        os.kill(parent, signal.SIGTERM)
        await eventually(lambda: not alive(parent) and not any(map(alive, workers)), timeout=30)
        with open(logfile) as f:
            log = f.read()
        self.assertRegex(log, r"worker [12]: .* POST /v1/chat/completions 200")
        self.assertIn("Stopping 2 workers", log)


class ConsoleProcessTests(TestCase):
    timeout = 120

    @inline
    async def test_console_in_a_terminal(self) -> None:
        """The real gateway under a pseudo-terminal: stats, verbose, exit."""
        from tests.test_console import TerminalSession

        upstream = start_upstream(self)
        port = free_port()
        session = TerminalSession()
        args = [sys.executable, "-m", "llmgw.cli", "--bindport", str(port), "--aihost"]
        args += ["localhost", "--aihostport", str(upstream.port), "--aica", upstream.ca_file]
        args += ["--workers", "2"]
        process = reactor.spawnProcess(
            session, sys.executable, args, env={**os.environ, "NO_COLOR": "1"}, usePTY=True
        )

        def reap() -> Deferred[Any]:
            if not session.exited:
                process.signalProcess("KILL")
            return session.ended

        self.addCleanup(reap)
        await session.wait_for("llmgw> ", timeout=30)
        await session.wait_for("worker 2: GatewaySite starting", timeout=30)
        reply = await request(self, port, body=chat_body("console"))
        self.assertEqual(reply.status, 200)
        process.write(b"stats\r")
        await session.wait_for("tracked clients: 1")
        # The figures are the metrics' totals, which count finished records.
        self.assertRegex(session.text(), r"total\s+1\s+0\s+0\s+0")
        process.write(b"verbose on\r")
        await session.wait_for("verbose logging on")
        await request(self, port, body=chat_body("now verbose"))
        await session.wait_for('"content":"now verbose"')
        process.write(b"exit\r")
        ended = await session.ended
        self.assertIsInstance(ended, ProcessDone, session.text())


class BackoffTests(SynchronousTestCase):
    """A worker that keeps crashing is restarted ever more slowly, up to a cap."""

    def test_crash_loop_backs_off(self) -> None:
        from twisted.internet.error import ProcessTerminated
        from twisted.internet.testing import MemoryReactorClock

        from llmgw.cluster import MAX_BACKOFF, STABLE_SECONDS, Supervisor, WorkerProcess

        clock = MemoryReactorClock()
        supervisor = Supervisor(Config(workers=1), clock, colour=False)
        spawned: list[int] = []
        supervisor.spawn = spawned.append  # type: ignore[method-assign, assignment]
        delays: list[float] = []
        for _ in range(9):
            worker = WorkerProcess(supervisor, 1)
            supervisor.workers[1] = worker
            clock.advance(1)  # dies a second after starting
            supervisor.worker_ended(worker, Failure(ProcessTerminated(signal=9)))
            (restart,) = clock.getDelayedCalls()
            delays.append(round(restart.getTime() - clock.seconds(), 3))
            clock.advance(restart.getTime() - clock.seconds())
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, MAX_BACKOFF, MAX_BACKOFF])
        self.assertEqual(spawned, [1] * 9)
        worker = WorkerProcess(supervisor, 1)
        supervisor.workers[1] = worker
        clock.advance(STABLE_SECONDS)
        supervisor.worker_ended(worker, Failure(ProcessTerminated(signal=9)))
        (restart,) = clock.getDelayedCalls()
        self.assertEqual(restart.getTime(), clock.seconds())
        self.flushLoggedErrors()


class StatsFromTotalsTests(SynchronousTestCase):
    """The console's served, refused and upstream errors are the metrics' totals."""

    def test_rows_and_ended_workers(self) -> None:
        from twisted.internet.error import ProcessTerminated
        from twisted.internet.testing import MemoryReactorClock

        from llmgw.cluster import Supervisor, WorkerProcess

        clock = MemoryReactorClock()
        supervisor = Supervisor(Config(workers=2), clock, colour=False)
        supervisor.spawn = lambda number: None  # type: ignore[method-assign]
        live, dead = WorkerProcess(supervisor, 1), WorkerProcess(supervisor, 2)
        supervisor.workers.update({1: live, 2: dead})
        requests = {
            "counters": {
                "requests_total": [
                    [["/v1/chat/completions", "200"], 5],
                    [["/v1/chat/completions", "429"], 2],
                    [["/v1/chat/completions", "504"], 1],
                ],
                "rejected_total": [[["rate_limit"], 2]],
            }
        }
        for worker in (live, dead):
            worker.amp.metrics_delta(json.dumps(requests))
        supervisor.worker_ended(dead, Failure(ProcessTerminated(signal=9)))
        # What a worker answers: its own counters, which the totals' figures replace.
        answer = {
            "served": 0,
            "in_flight": 1,
            "refused": 0,
            "upstream_errors": 0,
            "uptime": 3.0,
            "replicas": "[]",
        }
        live.amp.callRemote = lambda command: defer.succeed(dict(answer))  # type: ignore[method-assign, misc]
        stats = self.successResultOf(Deferred.fromCoroutine(supervisor.stats()))
        self.assertEqual(
            stats["workers"],
            [
                {
                    "worker": 1,
                    "pid": None,
                    "served": 8,
                    "in_flight": 1,
                    "refused": 2,
                    "upstream_errors": 1,
                    "uptime": 3.0,
                },
                {"worker": "ended", "pid": None, "served": 8, "refused": 2, "upstream_errors": 1},
            ],
        )
        self.assertEqual(supervisor.metrics.worker_restarts, 1)
        self.flushLoggedErrors()
