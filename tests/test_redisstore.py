"""
Tests for L{llmgw.redisstore}, the limit shared by several hosts through Redis,
and for its flags in L{llmgw.options}.

The unit tests drive a fake clock and a Redis double whose answers the test
hands out, so timeouts, the breaker and the fallback policies are exact.  The
integration tests run Debian's C{redis-server} on a private Unix socket in a
temporary directory; they skip without it or without txredisapi (the
C{llmgw[redis]} extra, which Debian 12 does not package), except under
C{CI=true}, where a missing C{redis-server} fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from llmgw import errors
from llmgw.admission import AdmissionDesk, AdmissionQuestions, AdmitExpired
from llmgw.errors import ApiError
from llmgw.options import Config, Options, RateStoreAddress, rate_store_address
from llmgw.ratelimit import Decision, SlidingWindowLimiter
from llmgw.redisstore import (
    EXTRA_MISSING,
    SCRIPT_SHA,
    CircuitBreaker,
    DeadlinePassed,
    RateStoreService,
    RateStoreUnavailable,
    RedisSlidingWindowLimiter,
    TxRedisConnection,
    redis_key,
)
from llmgw.service import make_service
from llmgw.startup import StartupFailure
from llmgw.worker import RemoteLimiter
from tests.loopback import (
    chat_body,
    eventually,
    gateway_config,
    inline,
    reactor,
    request,
    start_gateway,
    start_upstream,
)
from tests.test_admission import Wire
from tests.test_cluster import serving, start_gateway_process
from tests.test_options import parse


def _import_txredisapi() -> Any:
    try:
        import txredisapi as module
    except ImportError:
        return None
    return module


txredisapi: Any = _import_txredisapi()


def without_txredisapi(test: SynchronousTestCase) -> None:
    """Make C{import txredisapi} fail for the rest of the test, as where it is not installed."""
    saved = sys.modules.get("txredisapi")
    sys.modules["txredisapi"] = None  # type: ignore[assignment]

    def restore() -> None:
        if saved is None:
            del sys.modules["txredisapi"]
        else:
            sys.modules["txredisapi"] = saved

    test.addCleanup(restore)


REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)


class RateStoreAddressTests(SynchronousTestCase):
    """C{--rate-store} URLs: TCP or a Unix socket, a database, and never a password."""

    def test_tcp_defaults(self) -> None:
        self.assertEqual(
            rate_store_address("redis://127.0.0.1"), RateStoreAddress("127.0.0.1", 6379, None, 0)
        )

    def test_tcp_port_and_db(self) -> None:
        address = rate_store_address("redis://redis.internal:6380/3")
        self.assertEqual(address, RateStoreAddress("redis.internal", 6380, None, 3))
        self.assertEqual(str(address), "redis://redis.internal:6380/3")

    def test_ipv6(self) -> None:
        address = rate_store_address("redis://[::1]:6379/")
        self.assertEqual(address, RateStoreAddress("::1", 6379, None, 0))
        self.assertEqual(str(address), "redis://[::1]:6379/0")

    def test_unix(self) -> None:
        address = rate_store_address("unix:///run/redis/redis.sock?db=2")
        self.assertEqual(address, RateStoreAddress(None, 0, "/run/redis/redis.sock", 2))
        self.assertEqual(str(address), "unix:///run/redis/redis.sock?db=2")
        self.assertEqual(rate_store_address("unix:///r.sock").db, 0)

    def test_refused(self) -> None:
        for url, message in [
            ("http://127.0.0.1", "give it as redis://host[:port][/db]"),
            ("redis://", "the host is missing"),
            ("redis://h:0", "the port is not a number"),
            ("redis://h:99999", "the port is not a number"),
            ("redis://h/x", "the database 'x' is not a number"),
            ("redis://h?db=1", "a redis:// URL takes no query"),
            ("unix://host/r.sock", "give a Unix socket as unix:///absolute/path"),
            ("unix:///r.sock?database=1", "the only query a unix:// URL takes is ?db=N"),
        ]:
            with self.subTest(url=url):
                error = self.assertRaises(ValueError, rate_store_address, url)
                self.assertIn(message, str(error))

    def test_password_refused_without_repeating_it(self) -> None:
        for url in ("redis://:s3cret@h:6379", "redis://user:s3cret@h", "unix://:s3cret@/r.sock"):
            with self.subTest(url=url):
                error = self.assertRaises(usage.UsageError, parse, "--rate-store", url)
                self.assertEqual(
                    str(error),
                    "--rate-store: the URL holds credentials; "
                    "put the password in --rate-store-password-file",
                )
                self.assertNotIn("s3cret", str(error))


class RateStoreOptionsTests(SynchronousTestCase):
    def test_defaults_change_nothing(self) -> None:
        config = parse()
        self.assertEqual(
            (
                config.rate_store,
                config.rate_store_password_file,
                config.rate_store_timeout,
                config.rate_store_fallback,
            ),
            (None, None, 0.25, "local"),
        )

    def test_every_flag(self) -> None:
        password = self.mktemp()
        with open(password, "w") as f:
            f.write("s3cret\n")
        config = parse(
            "--rate-store",
            "unix:///run/redis.sock?db=1",
            "--rate-store-password-file",
            password,
            "--rate-store-timeout",
            "0.1",
            "--rate-store-fallback",
            "closed",
        )
        self.assertEqual(config.rate_store, "unix:///run/redis.sock?db=1")
        self.assertEqual(config.rate_store_password_file, password)
        self.assertEqual(config.rate_store_timeout, 0.1)
        self.assertEqual(config.rate_store_fallback, "closed")

    def test_usage_errors(self) -> None:
        for argv, message in [
            (
                ["--rate-store-fallback", "maybe"],
                "--rate-store-fallback: 'maybe' is not a policy; use local, open or closed",
            ),
            (["--rate-store-timeout", "0"], "--rate-store-timeout: 0 must be a finite number"),
            (
                ["--rate-store-timeout", "1"],
                "--rate-store-timeout: 1 is too long: a worker stops waiting for an "
                "admission after 1 s; use less",
            ),
            (
                ["--rate-store-password-file", "/etc/hostname"],
                "--rate-store-password-file needs --rate-store",
            ),
            (
                ["--rate-store", "redis://h", "--rate-store-password-file", "/nonexistent"],
                "--rate-store-password-file '/nonexistent': no such readable file",
            ),
            (
                ["--rate-store", "redis://h", "--rate-limit", "0"],
                "--rate-store needs limiting on: --rate-limit above 0",
            ),
        ]:
            with self.subTest(argv=argv):
                error = self.assertRaises(usage.UsageError, parse, *argv)
                self.assertTrue(str(error).startswith(message), str(error))

    def test_help_lists_the_flags(self) -> None:
        text = str(Options())
        for flag in (
            "--rate-store=",
            "--rate-store-password-file=",
            "--rate-store-timeout=",
            "--rate-store-fallback=",
        ):
            self.assertIn(flag, text)


class RedisDouble:
    """A connection whose script replies the test hands out, one Deferred a call."""

    def __init__(self) -> None:
        self.connected = True
        self.calls: list[tuple[str, list[int | str], Deferred[Any]]] = []
        self.removed: list[tuple[str, str]] = []

    def run_script(self, key: str, arguments: list[int | str]) -> Deferred[Any]:
        reply: Deferred[Any] = Deferred()
        self.calls.append((key, arguments, reply))
        return reply

    def remove(self, key: str, member: str) -> Deferred[Any]:
        self.removed.append((key, member))
        return succeed(1)

    def answer(self, values: list[int], call: int = -1) -> None:
        self.calls[call][2].callback(values)


@implementer(ILogObserver)
class Logged:
    """The events L{llmgw.redisstore} logs while a test runs."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "llmgw.redisstore":
            self.events.append(event)

    def levels(self) -> list[str]:
        return [event["log_level"].name for event in self.events]


def store(
    policy: str = "local", limit: int = 3, window: int = 60
) -> tuple[RedisSlidingWindowLimiter, RedisDouble, Clock]:
    clock = Clock()
    clock.advance(1000)
    redis = RedisDouble()
    limiter = RedisSlidingWindowLimiter(
        limit, window, clock, SlidingWindowLimiter(limit, window, clock), policy=policy
    )
    limiter.redis = redis
    return limiter, redis, clock


def results(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


class RedisLimiterTests(SynchronousTestCase):
    """Decisions with a Redis double and a fake clock."""

    def test_script_arguments_and_decision(self) -> None:
        limiter, redis, _ = store()
        decided = results(limiter.admit("203.0.113.7"))
        key, arguments, _ = redis.calls[0]
        self.assertEqual(key, "llmgw:rl:" + hashlib.sha256(b"203.0.113.7").hexdigest())
        self.assertEqual(arguments[:2], [3, 60_000_000])
        self.assertEqual(arguments[3], -1)
        self.assertRegex(str(arguments[2]), r"^[0-9a-f]{12}:1000\.0$")
        redis.answer([1, 2, 60])
        self.assertEqual(decided, [Decision(True, 3, 60, 2, 60)])

    def test_refusal_numbers_pass_through(self) -> None:
        limiter, redis, _ = store()
        decided = results(limiter.admit("c"))
        redis.answer([0, 0, 17])
        self.assertEqual(decided, [Decision(False, 3, 60, 0, 17)])

    def test_same_instant_members_differ(self) -> None:
        """Two admissions at one clock reading are two members, so both count."""
        limiter, redis, _ = store()
        limiter.admit("c")
        limiter.admit("c")
        members = [arguments[2] for _, arguments, _ in redis.calls]
        self.assertEqual(len(set(members)), 2)

    def test_never_longer_than_the_timeout(self) -> None:
        """Redis silent: at 0.25 s, not before, this host's limiter decides."""
        logged = Logged(self)
        limiter, _, clock = store()
        decided = results(limiter.admit("c"))
        clock.advance(0.2499)
        self.assertEqual(decided, [])
        clock.advance(0.0001)
        self.assertEqual(decided, [Decision(True, 3, 60, 2, 60)])
        self.assertEqual(logged.levels(), ["error"])
        self.assertIn("cannot be reached (no answer within 0.25 s)", _text(logged.events[0]))

    def test_late_admission_is_taken_back(self) -> None:
        limiter, redis, clock = store()
        limiter.admit("c")
        clock.advance(0.25)
        redis.answer([1, 2, 60])
        self.assertEqual(redis.removed, [(redis.calls[0][0], str(redis.calls[0][1][2]))])

    def test_error_reply_falls_back_at_once(self) -> None:
        limiter, redis, clock = store()
        decided = results(limiter.admit("c"))
        redis.calls[0][2].errback(Exception("ERR something"))
        self.assertEqual(decided, [Decision(True, 3, 60, 2, 60)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_malformed_reply_falls_back(self) -> None:
        limiter, redis, _ = store()
        decided = results(limiter.admit("c"))
        redis.answer([])
        self.assertEqual(decided, [Decision(True, 3, 60, 2, 60)])
        self.assertEqual(limiter.counts["failures"], 1)

    def test_disconnected_decides_at_once(self) -> None:
        limiter, redis, _ = store()
        redis.connected = False
        decided = results(limiter.admit("c"))
        self.assertEqual(decided, [Decision(True, 3, 60, 2, 60)])
        self.assertEqual(redis.calls, [])

    def test_breaker_skips_redis_then_probes(self) -> None:
        logged = Logged(self)
        limiter, redis, clock = store(limit=100)
        for _ in range(5):
            limiter.admit("c")
            clock.advance(0.25)
        self.assertEqual(len(redis.calls), 5)
        # Open: five seconds without asking Redis.
        decided = results(limiter.admit("c"))
        self.assertEqual(len(redis.calls), 5)
        self.assertEqual(decided[0].remaining, 94)
        clock.advance(4.99)
        limiter.admit("c")
        self.assertEqual(len(redis.calls), 5)
        clock.advance(0.01)
        # One probe; the others keep to the fallback while it is out.
        probe = results(limiter.admit("c"))
        limiter.admit("c")
        self.assertEqual(len(redis.calls), 6)
        redis.answer([1, 99, 60])
        self.assertEqual(probe, [Decision(True, 100, 60, 99, 60)])
        limiter.admit("c")
        self.assertEqual(len(redis.calls), 7)
        self.assertEqual(logged.levels(), ["error", "info"])
        self.assertIn("answers again", _text(logged.events[1]))

    def test_failed_probe_opens_again(self) -> None:
        limiter, redis, clock = store(limit=100)
        for _ in range(5):
            limiter.admit("c")
            clock.advance(0.25)
        clock.advance(5)
        limiter.admit("c")
        clock.advance(0.25)
        self.assertEqual(len(redis.calls), 6)
        limiter.admit("c")
        clock.advance(4.9)
        limiter.admit("c")
        self.assertEqual(len(redis.calls), 6)
        clock.advance(0.1)
        limiter.admit("c")
        self.assertEqual(len(redis.calls), 7)

    def test_probe_void_by_the_deadline_lets_the_next_question_probe(self) -> None:
        """
        A probe the worker stopped waiting for says nothing of Redis: the next
        question probes again, rather than Redis being skipped for good.
        """
        limiter, redis, clock = store(limit=100)
        for _ in range(5):
            limiter.admit("c")
            clock.advance(0.25)
        clock.advance(5)
        probe = results(limiter.decide("c", deadline=clock.seconds() + 0.1))
        self.assertEqual(len(redis.calls), 6)
        clock.advance(0.1)
        self.assertIsInstance(probe[0].value, DeadlinePassed)
        decided = results(limiter.admit("c"))
        self.assertEqual(len(redis.calls), 7)
        redis.answer([1, 99, 60])
        self.assertEqual(decided, [Decision(True, 100, 60, 99, 60)])
        limiter.admit("c")
        self.assertEqual(len(redis.calls), 8)

    def test_fallback_starts_from_this_hosts_admissions(self) -> None:
        """Redis admitted two here; when it fails, the local limit of 3 has one left."""
        limiter, redis, _ = store()
        for remaining in (2, 1):
            limiter.admit("c")
            redis.answer([1, remaining, 60])
        redis.connected = False
        decided = [results(limiter.admit("c"))[0].allowed for _ in range(2)]
        self.assertEqual(decided, [True, False])

    def test_open_admits(self) -> None:
        limiter, redis, _ = store("open")
        redis.connected = False
        for _ in range(5):
            self.assertEqual(results(limiter.admit("c")), [Decision(True, 3, 60, 2, 60)])

    def test_closed_is_a_503_with_retry_after(self) -> None:
        limiter, redis, clock = store("closed")
        redis.connected = False
        failures = [results(limiter.admit("c"))[0] for _ in range(5)]
        first = failures[0].value
        self.assertIsInstance(first, ApiError)
        self.assertEqual((first.status, first.headers), (503, ((b"Retry-After", b"1"),)))
        self.assertEqual(
            json.loads(first.body()),
            {
                "error": {
                    "message": "The rate limiter cannot be reached, so no request is "
                    "admitted for now. Retry after 1 seconds.",
                    "type": "api_error",
                    "param": None,
                    "code": "rate_limiter_unavailable",
                }
            },
        )
        # The fifth failure opened the breaker: retry when it probes.
        clock.advance(1.5)
        refused = results(limiter.admit("c"))[0].value
        self.assertEqual(refused.headers, ((b"Retry-After", b"4"),))

    def test_deadline_before_the_timeout(self) -> None:
        """The worker stops waiting first: void, not a Redis failure, and taken back."""
        limiter, redis, clock = store()
        decided = results(limiter.decide("c", deadline=clock.seconds() + 0.1))
        clock.advance(0.1)
        self.assertIsInstance(decided[0].value, DeadlinePassed)
        self.assertEqual(limiter.counts["failures"], 0)
        redis.answer([1, 2, 60])
        self.assertEqual(len(redis.removed), 1)

    def test_deadline_passed_already(self) -> None:
        limiter, redis, clock = store()
        decided = results(limiter.decide("c", deadline=clock.seconds()))
        self.assertIsInstance(decided[0].value, DeadlinePassed)
        self.assertEqual(redis.calls, [])

    def test_record_sends_the_age(self) -> None:
        limiter, redis, clock = store()
        limiter.record("c", clock.seconds() - 0.5)
        self.assertEqual(redis.calls[0][1][3], 500_000)
        self.assertEqual(len(limiter.fallback), 1)

    def test_release_removes_the_member(self) -> None:
        limiter, redis, _ = store()
        admission = results(limiter.decide("c"))
        redis.answer([1, 2, 60])
        receipt = admission[0].receipt
        limiter.release("c", receipt)
        self.assertEqual(redis.removed, [(redis.calls[0][0], str(redis.calls[0][1][2]))])
        self.assertIsNone(limiter.fallback.newest("c"))

    def test_key_is_hashed(self) -> None:
        self.assertEqual(
            redis_key("sk-secret"),
            "llmgw:rl:" + hashlib.sha256(b"sk-secret").hexdigest(),
        )


class CircuitBreakerTests(SynchronousTestCase):
    def test_success_resets_the_count(self) -> None:
        breaker = CircuitBreaker()
        for _ in range(4):
            self.assertFalse(breaker.failed(0))
        breaker.succeeded()
        for _ in range(4):
            self.assertFalse(breaker.failed(0))
        self.assertTrue(breaker.failed(0))
        self.assertEqual(breaker.retry_after(0.5), 5)


def _text(event: dict[str, Any]) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


class AdmissionDeskTests(SynchronousTestCase):
    """A worker asks the parent on their pipe; the parent asks the rate store."""

    def setUp(self) -> None:
        self.limiter, self.redis, self.clock = store("closed")
        worker_side = AdmissionQuestions()
        self.wire = Wire(AdmissionDesk(self.limiter.fallback, rate_store=self.limiter), worker_side)
        self.remote = RemoteLimiter(
            worker_side, SlidingWindowLimiter(1, 60, self.clock), 1, self.clock
        )

    def test_answer_comes_when_redis_answers(self) -> None:
        decided = results(self.remote.admit("c"))
        self.wire.pump()
        self.assertEqual(decided, [])
        self.redis.answer([1, 2, 60])
        self.wire.pump()
        self.assertEqual(decided, [Decision(True, 3, 60, 2, 60)])

    def test_closed_is_a_503_in_the_worker(self) -> None:
        self.redis.connected = False
        decided = results(self.remote.admit("c"))
        self.wire.pump()
        error = decided[0].value
        self.assertIsInstance(error, ApiError)
        self.assertEqual((error.status, error.headers), (503, ((b"Retry-After", b"1"),)))
        self.assertFalse(self.remote.degraded)

    def test_expired_question(self) -> None:
        parent = AdmissionDesk(self.limiter.fallback, rate_store=self.limiter)
        answer = results(parent.admit("c", self.clock.seconds()))  # type: ignore[arg-type]
        self.assertIsInstance(answer[0].value, AdmitExpired)

    def test_release_and_record_reach_the_store(self) -> None:
        parent = AdmissionDesk(self.limiter.fallback, rate_store=self.limiter)
        parent.record_admission("c", self.clock.seconds())
        self.assertEqual(self.redis.calls[0][1][3], 0)
        parent.release_admission("c", 1.0)
        self.assertEqual(len(self.redis.removed), 1)


class UnavailableErrorTests(SynchronousTestCase):
    def test_crosses_amp_as_text(self) -> None:
        self.assertEqual(RateStoreUnavailable(4).retry_after, 4)
        self.assertEqual(RateStoreUnavailable("4").retry_after, 4)
        self.assertEqual(RateStoreUnavailable("garbled").retry_after, 1)

    def test_error_constructor(self) -> None:
        error = errors.rate_store_unavailable(7)
        self.assertEqual(error.status, 503)
        self.assertEqual(error.headers, ((b"Retry-After", b"7"),))


class WiringTests(SynchronousTestCase):
    """make_service puts the store in front of the embedded limiter, in either mode."""

    def needs_txredisapi(self) -> None:
        if txredisapi is None:
            raise SkipTest("txredisapi is not installed (pip install 'llmgw[redis]')")

    def test_one_worker(self) -> None:
        self.needs_txredisapi()
        config = Config(workers=1, rate_store="unix:///nonexistent/redis.sock?db=0")
        top = make_service(config, MemoryReactorClock(), console=False)
        stores = [s for s in top if isinstance(s, RateStoreService)]
        self.assertEqual(len(stores), 1)
        self.assertEqual(stores[0].limiter.name, "unix:///nonexistent/redis.sock?db=0")

    def test_workers(self) -> None:
        self.needs_txredisapi()
        from llmgw.cluster import Supervisor

        config = Config(workers=2, rate_store="redis://127.0.0.1:1/0")
        top = make_service(config, MemoryReactorClock(), console=False)
        supervisor = next(s for s in top if isinstance(s, Supervisor))
        self.assertIsInstance(supervisor.rate_store, RedisSlidingWindowLimiter)
        assert supervisor.rate_store is not None
        self.assertIs(supervisor.rate_store.fallback, supervisor.limiter)

    def test_store_stops_after_the_drain(self) -> None:
        """
        MultiService stops its children in reverse: the store must be added
        before what drains, so that requests in hand during --grace are still
        admitted by Redis, not refused (closed) or counted alone (local).
        """
        self.needs_txredisapi()
        from llmgw.cluster import Supervisor
        from llmgw.service import DrainService

        for workers, drainer in ((1, DrainService), (2, Supervisor)):
            config = Config(workers=workers, rate_store="redis://127.0.0.1:1/0")
            kinds = [type(s) for s in make_service(config, MemoryReactorClock(), console=False)]
            self.assertLess(kinds.index(RateStoreService), kinds.index(drainer))

    def test_missing_extra(self) -> None:
        self.patch(sys, "__stderr__", None)
        without_txredisapi(self)
        config = Config(workers=1, rate_store="redis://127.0.0.1:1/0")
        error = self.assertRaises(StartupFailure, make_service, config, MemoryReactorClock())
        self.assertEqual(str(error), EXTRA_MISSING)
        self.assertEqual(
            EXTRA_MISSING,
            "--rate-store needs the llmgw[redis] extra (pip install 'llmgw[redis]')",
        )

    def test_without_rate_store_nothing_changes(self) -> None:
        top = make_service(Config(workers=1), MemoryReactorClock(), console=False)
        self.assertEqual([s for s in top if isinstance(s, RateStoreService)], [])


# --- against a real redis-server ------------------------------------------


class RedisProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class RedisServer:
    """C{redis-server} on a Unix socket in the test's temporary directory."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        # Not under trial's temporary directory: a Unix socket's path must
        # fit in 108 bytes.
        self.directory = tempfile.mkdtemp(prefix="llmgw-redis-")
        test.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.socket = os.path.join(self.directory, "redis.sock")
        self.url = f"unix://{self.socket}?db=0"
        self.process: RedisProcess | None = None
        self.transport: Any = None

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = process = RedisProcess()
        arguments = [
            REDIS_SERVER,
            "--port",
            "0",
            "--unixsocket",
            self.socket,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
        ]
        self.transport = transport = reactor.spawnProcess(
            process, REDIS_SERVER, arguments, env={}, childFDs={0: "w", 1: "r", 2: "r"}
        )

        def stop() -> Deferred[None]:
            if not process.ended.called:
                try:
                    transport.signalProcess("KILL")
                except Exception:
                    pass
            return process.ended

        self.test.addCleanup(stop)
        try:
            await eventually(lambda: os.path.exists(self.socket), timeout=10)
        except AssertionError:
            raise AssertionError(
                "redis-server did not start:\n" + process.output.decode("utf-8", "replace")
            ) from None

    def signal(self, signal: int | str) -> None:
        self.transport.signalProcess(signal)

    async def kill(self) -> None:
        assert self.process is not None
        self.signal("KILL")
        await self.process.ended


def needs_redis() -> None:
    if txredisapi is None:
        raise SkipTest(
            "txredisapi is not installed: pip install 'llmgw[redis]' "
            "(Debian 12 does not package it)"
        )
    if REDIS_SERVER is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI needs redis-server: apt-get install redis-server")
        raise SkipTest("needs redis-server: apt-get install redis-server")


class RedisIntegrationTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        needs_redis()

    async def server(self) -> RedisServer:
        server = RedisServer(self)
        await server.start()
        return server

    async def host(
        self, server: RedisServer, limit: int = 3, window: int = 2, **options: Any
    ) -> RedisSlidingWindowLimiter:
        """One gateway host's limiter, connected to C{server}."""
        limiter = RedisSlidingWindowLimiter(
            limit, window, reactor, SlidingWindowLimiter(limit, window, reactor), **options
        )
        service = RateStoreService(limiter, rate_store_address(server.url), None, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        assert service.connection is not None
        await service.connection.when_connected()
        return limiter

    async def inspect(self, server: RedisServer) -> Any:
        client = await txredisapi.UnixConnection(server.socket)
        self.addCleanup(client.disconnect)
        return client

    @inline
    async def test_two_gateways_share_one_limit(self) -> None:
        """Requests alternate between two gateways: three in two seconds, in all."""
        server = await self.server()
        upstream = start_upstream(self)
        gateways = []
        for _ in range(2):
            limiter = await self.host(server)
            config = gateway_config(upstream, rate_limit=3, rate_window=2)
            gateways.append(start_gateway(self, config, limiter=limiter))
        replies = [await request(self, gateways[n % 2].port, body=chat_body()) for n in range(5)]
        self.assertEqual([r.status for r in replies], [200, 200, 200, 429, 429])
        self.assertEqual(
            [r.header(b"x-ratelimit-remaining-requests") for r in replies],
            [b"2", b"1", b"0", b"0", b"0"],
        )
        self.assertEqual([r.header(b"RateLimit") for r in replies[:1]], [b'"default";r=2;t=2'])
        self.assertEqual(replies[3].header(b"Retry-After"), b"2")
        self.assertEqual(replies[3].json()["error"]["code"], "rate_limit_exceeded")
        # A client that waits out Retry-After is admitted.
        retry_after = int(replies[4].header(b"Retry-After") or b"0")
        await task.deferLater(reactor, retry_after, lambda: None)
        again = await request(self, gateways[1].port, body=chat_body())
        self.assertEqual(again.status, 200)

    @inline
    async def test_concurrent_admissions_count_exactly(self) -> None:
        """Twenty at once from two hosts, for one client: exactly the limit is admitted."""
        server = await self.server()
        hosts = [await self.host(server, limit=7, window=60) for _ in range(2)]
        decisions = await defer.gatherResults([hosts[n % 2].admit("client") for n in range(20)])
        self.assertEqual(sum(d.allowed for d in decisions), 7)
        client = await self.inspect(server)
        self.assertEqual(await client.zcard(redis_key("client")), 7)

    @inline
    async def test_keys_expire_and_are_hashed(self) -> None:
        server = await self.server()
        limiter = await self.host(server, window=2)
        await limiter.admit("sk-very-secret-key")
        client = await self.inspect(server)
        keys = await client.keys("*")
        self.assertEqual(keys, [redis_key("sk-very-secret-key")])
        ttl = await client.execute_command("PTTL", keys[0])
        self.assertTrue(0 < ttl <= 2000, ttl)
        members = await client.zrange(keys[0], 0, -1)
        self.assertNotIn("sk-very-secret-key", " ".join(members))

    @inline
    async def test_script_loaded_again_after_a_flush(self) -> None:
        server = await self.server()
        limiter = await self.host(server)
        await limiter.admit("c")
        client = await self.inspect(server)
        await client.script_flush()
        self.assertEqual(await client.script_exists(SCRIPT_SHA), False)
        decision = await limiter.admit("c")
        self.assertEqual(decision, Decision(True, 3, 2, 1, 2))
        self.assertEqual(limiter.counts["failures"], 0)

    @inline
    async def test_stopped_redis_answers_within_the_timeout(self) -> None:
        """SIGSTOP: every decision within the timeout, the breaker opens, and Redis is back."""
        server = await self.server()
        limiter = await self.host(server, limit=100, window=60, timeout=0.1)
        logged = Logged(self)
        limiter.breaker.seconds = 1.0
        server.signal(signal.SIGSTOP)
        elapsed = []
        for _ in range(7):
            started = time.monotonic()
            decision = await limiter.admit("c")
            elapsed.append(time.monotonic() - started)
            self.assertTrue(decision.allowed)
        self.assertTrue(max(elapsed) < 0.1 + 0.05, elapsed)
        self.assertEqual(limiter.counts["failures"], 5)
        self.assertEqual(logged.levels(), ["error"])
        server.signal(signal.SIGCONT)
        await task.deferLater(reactor, 1.0, lambda: None)
        await limiter.admit("c")
        self.assertEqual(logged.levels(), ["error", "info"])
        # The five late admissions were taken back: Redis counts the probe alone.
        client = await self.inspect(server)
        await eventually(lambda: limiter.counts["redis"] == 1)
        self.assertEqual(await client.zcard(redis_key("c")), 1)

    @inline
    async def test_killed_under_load_then_restarted(self) -> None:
        """SIGKILL with requests in flight: no 5xx, and the limit is shared again on restart."""
        logged = Logged(self)
        server = await self.server()
        upstream = start_upstream(self)
        ports = []
        limiters = []
        for _ in range(2):
            limiter = await self.host(server, limit=1000, window=60)
            limiters.append(limiter)
            config = gateway_config(upstream, rate_limit=1000, rate_window=60)
            ports.append(start_gateway(self, config, limiter=limiter).port)

        async def lane(n: int) -> list[int]:
            statuses = []
            for _ in range(8):
                reply = await request(self, ports[n % 2], body=chat_body())
                statuses.append(reply.status)
            return statuses

        load = defer.gatherResults([Deferred.fromCoroutine(lane(n)) for n in range(6)])
        await task.deferLater(reactor, 0.05, lambda: None)
        await server.kill()
        statuses = [status for lane_statuses in await load for status in lane_statuses]
        self.assertEqual(set(statuses), {200})
        self.assertIn("error", logged.levels())
        await server.start()
        # Reconnected within a second, probed within the breaker's five.
        for limiter in limiters:
            limiter.counts["redis"] = 0
        started = time.monotonic()
        while not all(limiter.counts["redis"] for limiter in limiters):
            for limiter in limiters:
                await limiter.admit("probe")
            await task.deferLater(reactor, 0.1, lambda: None)
            self.assertLess(time.monotonic() - started, 6.5)
        shared = [await limiters[n % 2].admit("after") for n in range(4)]
        self.assertEqual([d.remaining for d in shared], [999, 998, 997, 996])

    @inline
    async def test_fallback_policies_over_http(self) -> None:
        """Redis gone: closed answers 503 with Retry-After, open admits; never a 500."""
        server = await self.server()
        upstream = start_upstream(self)
        ports = {}
        for policy in ("closed", "open"):
            limiter = await self.host(server, limit=1, window=60, policy=policy)
            config = gateway_config(upstream, rate_limit=1, rate_window=60)
            ports[policy] = start_gateway(self, config, limiter=limiter).port
        await server.kill()
        closed = await request(self, ports["closed"], body=chat_body())
        self.assertEqual(closed.status, 503)
        self.assertEqual(closed.header(b"Retry-After"), b"1")
        self.assertEqual(closed.json()["error"]["code"], "rate_limiter_unavailable")
        self.assertIsNone(closed.header(b"RateLimit"))
        opened = [await request(self, ports["open"], body=chat_body()) for _ in range(3)]
        self.assertEqual([r.status for r in opened], [200, 200, 200])
        self.assertEqual(opened[0].header(b"x-ratelimit-remaining-requests"), b"0")

    @inline
    async def test_two_gateway_processes_share_one_limit(self) -> None:
        """Two real llmgw processes, two workers each: their parents ask one Redis."""
        server = await self.server()
        upstream = start_upstream(self)
        ports = []
        for _ in range(2):
            process, port = start_gateway_process(
                self,
                upstream,
                "--rate-limit",
                "4",
                "--rate-window",
                "60",
                "--rate-store",
                server.url,
            )
            await serving(self, process, port)
            ports.append(port)
        client = await self.inspect(server)
        statuses = [(await request(self, ports[n % 2], body=chat_body())).status for n in range(6)]
        self.assertEqual(statuses, [200, 200, 200, 200, 429, 429])
        keys = await client.keys("llmgw:rl:*")
        self.assertEqual(len(keys), 1)
        self.assertEqual(await client.zcard(keys[0]), 4)


class ConnectionTests(SynchronousTestCase):
    def test_missing_library(self) -> None:
        without_txredisapi(self)
        error = self.assertRaises(
            ImportError,
            TxRedisConnection.connect,
            RateStoreAddress(None, 0, "/nonexistent", 0),
            None,
            MemoryReactorClock(),
        )
        self.assertEqual(str(error), EXTRA_MISSING)
