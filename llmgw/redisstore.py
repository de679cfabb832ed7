"""
One exact sliding window shared by several gateway hosts, kept in Redis.

Each host's parent process asks Redis for every decision, with one Lua script
that runs atomically on the one key of the client: drop the admissions that no
longer count, count the rest, admit and record if under the limit, and return
the numbers of the RateLimit headers.  The time is Redis' own (C{TIME}), so the
hosts' clocks do not matter, and each call touches one key, so the script runs
on Redis Cluster too.

Redis is a dependency the gateway must survive: each decision has a deadline
(C{--rate-store-timeout}), five failures in a row open a breaker that skips
Redis for five seconds before one decision probes it again, and meanwhile
C{--rate-store-fallback} decides: this host's embedded exact limiter
(C{local}), everyone (C{open}) or no one (C{closed}, a 503).  No request waits
longer than the deadline for Redis, and none fails because of it.

The client library, txredisapi, is optional (the C{llmgw[redis]} extra): it
is imported only when a store is started.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmgw import errors
from llmgw.options import RateStoreAddress, rate_store_address
from llmgw.ratelimit import Decision, ILimiter, SlidingWindowLimiter

if TYPE_CHECKING:
    from llmgw.options import Config

__all__ = [
    "EXTRA_MISSING",
    "SCRIPT",
    "CircuitBreaker",
    "DeadlinePassed",
    "RateStoreService",
    "RateStoreUnavailable",
    "RedisSlidingWindowLimiter",
    "TxRedisConnection",
    "redis_key",
    "require_txredisapi",
]

log = Logger()

#: Failures in a row that open the breaker, and how long it then skips Redis.
BREAKER_FAILURES = 5
BREAKER_SECONDS = 5.0

#: The one start-up error when the optional client library is not installed.
EXTRA_MISSING = "--rate-store needs the llmgw[redis] extra (pip install 'llmgw[redis]')"

#: A lost connection is retried at most this many seconds apart, so that a
#: Redis that returns is back in use within the breaker's five seconds
#: (txredisapi's own backoff grows to ten).
RECONNECT_MAX_SECONDS = 1.0

#: KEYS[1]: the client's log, a sorted set of admissions scored by their time
#: in microseconds.  ARGV: the limit; the window in microseconds; the member
#: to add, unique across hosts; and -1 to decide, or to record an admission
#: decided elsewhere, how many microseconds ago it was made.  Returns
#: {allowed (1 or 0), remaining, reset}: reset is the least whole number of
#: seconds after which the admission that blocks (or the oldest) stops
#: counting, the same number L{SlidingWindowLimiter} gives.
SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local member = ARGV[3]
local age = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local function reset(admitted)
  local seconds = math.floor((admitted + window - now + 999999) / 1000000)
  if seconds < 1 then seconds = 1 end
  return seconds
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local counted = redis.call('ZCARD', key)
if age >= 0 then
  if age < window then
    redis.call('ZADD', key, now - age, member)
    redis.call('PEXPIRE', key, math.ceil(window / 1000))
  end
  return {1, 0, 0}
end
if counted >= limit then
  local blocking = redis.call('ZRANGE', key, counted - limit, counted - limit, 'WITHSCORES')
  return {0, 0, reset(tonumber(blocking[2]))}
end
redis.call('ZADD', key, now, member)
redis.call('PEXPIRE', key, math.ceil(window / 1000))
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {1, limit - counted - 1, reset(tonumber(oldest[2]))}
"""

SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

#: The script's last argument when it decides rather than records.
_DECIDE = -1


def redis_key(client: str) -> str:
    """The client's key in Redis: hashed, so that no API key or address is stored there."""
    return "llmgw:rl:" + hashlib.sha256(client.encode()).hexdigest()


class DeadlinePassed(Exception):
    """The question's deadline passed before Redis answered: nothing counts for it."""


class RateStoreUnavailable(Exception):
    """
    Redis cannot decide and C{--rate-store-fallback closed} refuses everyone.

    The one argument is the Retry-After in seconds, as text or a number: it
    crosses the pipe from the parent to a worker as text
    (L{llmgw.admission}).
    """

    def __init__(self, retry_after: int | str) -> None:
        super().__init__(str(retry_after))

    @property
    def retry_after(self) -> int:
        try:
            return max(1, int(self.args[0]))
        except ValueError:
            return 1


@attrs.frozen
class Admission:
    """A decision, and what L{RedisSlidingWindowLimiter.release} takes to take it back."""

    decision: Decision
    receipt: float | None
    """For an admission, its time on this host's clock, unique on this host."""


class RedisCommands(Protocol):
    """What the limiter needs of a Redis connection (L{TxRedisConnection}, or a test's double)."""

    @property
    def connected(self) -> bool: ...

    def run_script(self, key: str, arguments: list[int | str]) -> Deferred[Any]: ...

    def remove(self, key: str, member: str) -> Deferred[Any]: ...


class CircuitBreaker:
    """
    Stop asking a Redis that keeps failing: after C{threshold} failures in a
    row it is skipped for C{seconds}, then one question probes it, and the
    breaker closes on that probe's answer or opens again on its failure.
    """

    def __init__(self, threshold: int = BREAKER_FAILURES, seconds: float = BREAKER_SECONDS):
        self.threshold = threshold
        self.seconds = seconds
        self.failures = 0
        self.open_until: float | None = None
        self.probing = False

    def allows(self, now: float) -> bool:
        """Whether this question may go to Redis; the first one after the pause probes."""
        if self.open_until is None:
            return True
        if now < self.open_until or self.probing:
            return False
        self.probing = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = None
        self.probing = False

    def probe_void(self) -> None:
        """
        The probe's question was given up for its own deadline, not Redis':
        it tells nothing, so the next question probes instead.
        """
        self.probing = False

    def failed(self, now: float) -> bool:
        """Count a failure; return whether it opened the breaker."""
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.open_until = now + self.seconds
            self.probing = False
            return True
        return False

    def retry_after(self, now: float) -> int:
        """Whole seconds until Redis is asked again: the Retry-After of a closed fallback."""
        if self.open_until is None:
            return 1
        return max(1, math.ceil(self.open_until - now))


@implementer(ILimiter)
class RedisSlidingWindowLimiter:
    """
    Admit at most C{limit} requests per client in any C{window} seconds,
    counted across every host that shares the Redis.

    The same rule as L{SlidingWindowLimiter}, with Redis' clock: an admission
    at C{s} counts at C{t} iff C{t - s < window}.  Each admission this host
    makes is mirrored into C{fallback}, this host's embedded limiter, so that
    when Redis fails the C{local} policy starts from what this host admitted
    rather than from nothing.

    @ivar redis: the connection, set by L{RateStoreService} while it runs.
    @ivar counts: decisions by Redis and by the fallback, and Redis' failures,
        for the console and metrics.
    """

    def __init__(
        self,
        limit: int,
        window: int,
        clock: IReactorTime,
        fallback: SlidingWindowLimiter,
        *,
        policy: str = "local",
        timeout: float = 0.25,
        name: str = "Redis",
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.fallback = fallback
        self.policy = policy
        self.timeout = timeout
        self.name = name
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.redis: RedisCommands | None = None
        self.unreachable = False
        self.counts = {"redis": 0, "fallback": 0, "failures": 0}
        # Members are this process's tag and a time on its clock that only
        # grows, so two admissions in the same microsecond both count, on
        # one host or on several.
        self._tag = secrets.token_hex(6)
        self._last_receipt = 0.0
        self._window_us = window * 1_000_000

    def admit(self, key: str) -> Deferred[Decision]:
        def closed(failure: Failure) -> Failure:
            if failure.check(RateStoreUnavailable):
                retry_after = failure.value.retry_after  # type: ignore[union-attr]
                return Failure(errors.rate_store_unavailable(retry_after))
            return failure

        return self.decide(key).addCallbacks(lambda admission: admission.decision, closed)

    def decide(self, key: str, deadline: float | None = None) -> Deferred[Admission]:
        """
        Ask Redis, within C{--rate-store-timeout} and before C{deadline}.

        Fails with L{DeadlinePassed} if the deadline comes first (an admission
        Redis records after it is removed again), and with
        L{RateStoreUnavailable} when the C{closed} fallback refuses.
        """
        now = self.clock.seconds()
        if deadline is not None and now >= deadline:
            return fail(DeadlinePassed())
        if not self.breaker.allows(now):
            return self._fallback_decides(key)
        probe = self.breaker.open_until is not None
        redis = self.redis
        if redis is None or not redis.connected:
            self._failed(now, "not connected")
            return self._fallback_decides(key)
        budget, deadline_first = self.timeout, False
        if deadline is not None and deadline - now < budget:
            budget, deadline_first = deadline - now, True
        receipt = self._next_receipt(now)
        name, member = redis_key(key), self._member(receipt)
        result: Deferred[Admission] = Deferred()
        try:
            reply = redis.run_script(name, [self.limit, self._window_us, member, _DECIDE])
        except Exception as e:
            self._failed(now, str(e) or type(e).__name__)
            return self._fallback_decides(key)
        timer = self.clock.callLater(budget, self._too_late, result, key, deadline_first, probe)

        def answered(values: Any) -> None:
            if result.called:
                if _allowed(values):
                    # Decided without it: this admission must not count.
                    self._forget(name, member)
                return
            timer.cancel()
            try:
                decision = Decision(
                    allowed=bool(values[0]),
                    limit=self.limit,
                    window=self.window,
                    remaining=int(values[1]),
                    reset=int(values[2]),
                )
            except (TypeError, ValueError, IndexError, KeyError):
                self._failed(self.clock.seconds(), f"unexpected reply {values!r}")
                self._fallback_decides(key).chainDeferred(result)
                return
            self._succeeded()
            if decision.allowed:
                self.fallback.record(key, receipt)
            result.callback(Admission(decision, receipt if decision.allowed else None))

        def failed(failure: Failure) -> None:
            if result.called:
                return
            timer.cancel()
            self._failed(self.clock.seconds(), failure.getErrorMessage())
            self._fallback_decides(key).chainDeferred(result)

        reply.addCallbacks(answered, failed)
        return result

    def record(self, key: str, at: float) -> None:
        """
        Count an admission a worker's fallback made at C{at} (this host's
        clock) while the parent could not answer; it is recorded in Redis by
        its age, so that the hosts' clocks still do not matter.
        """
        self.fallback.record(key, at)
        now = self.clock.seconds()
        redis = self.redis
        if redis is None or not redis.connected or self.breaker.open_until is not None:
            return
        age = max(0, round((now - at) * 1_000_000))
        member = self._member(self._next_receipt(now))
        try:
            told = redis.run_script(redis_key(key), [self.limit, self._window_us, member, age])
        except Exception:
            return
        told.addErrback(lambda _: None)

    def release(self, key: str, at: float) -> None:
        """Take back the admission whose receipt is C{at}: its request was decided elsewhere."""
        self.fallback.release(key, at)
        self._forget(redis_key(key), self._member(at))

    def _forget(self, name: str, member: str) -> None:
        redis = self.redis
        if redis is None or not redis.connected:
            return
        try:
            removed = redis.remove(name, member)
        except Exception:
            return
        removed.addErrback(lambda _: None)

    def _member(self, receipt: float) -> str:
        return f"{self._tag}:{receipt!r}"

    def _next_receipt(self, now: float) -> float:
        receipt = max(now, math.nextafter(self._last_receipt, math.inf))
        self._last_receipt = receipt
        return receipt

    def _too_late(
        self, result: Deferred[Admission], key: str, deadline_first: bool, probe: bool
    ) -> None:
        if deadline_first:
            if probe:
                self.breaker.probe_void()
            result.errback(DeadlinePassed())
            return
        self._failed(self.clock.seconds(), f"no answer within {self.timeout:g} s")
        self._fallback_decides(key).chainDeferred(result)

    def _fallback_decides(self, key: str) -> Deferred[Admission]:
        self.counts["fallback"] += 1
        if self.policy == "open":
            return succeed(Admission(self._open_decision(), None))
        if self.policy == "closed":
            return fail(RateStoreUnavailable(self.breaker.retry_after(self.clock.seconds())))
        decision = self.fallback.decide(key)
        receipt = self.fallback.newest(key) if decision.allowed else None
        return succeed(Admission(decision, receipt))

    def _open_decision(self) -> Decision:
        """
        What C{open} admits with: nothing is counted, so the headers show a
        window with this one request in it.
        """
        return Decision(
            allowed=True,
            limit=self.limit,
            window=self.window,
            remaining=self.limit - 1,
            reset=self.window,
        )

    def _succeeded(self) -> None:
        self.counts["redis"] += 1
        self.breaker.succeeded()
        if self.unreachable:
            self.unreachable = False
            log.info(
                "The rate store {store} answers again: the shared limit is in force",
                store=self.name,
            )

    def _failed(self, now: float, why: str) -> None:
        self.counts["failures"] += 1
        self.breaker.failed(now)
        if not self.unreachable:
            self.unreachable = True
            log.error(
                "The rate store {store} cannot be reached ({why}); "
                "--rate-store-fallback {policy} decides until it answers",
                store=self.name,
                why=why,
                policy=self.policy,
            )


def _allowed(values: Any) -> bool:
    try:
        return bool(values[0])
    except (TypeError, IndexError, KeyError):
        return False


def require_txredisapi() -> Any:
    """The txredisapi module, or L{ImportError} with the line that names the extra."""
    try:
        import txredisapi
    except ImportError:
        raise ImportError(EXTRA_MISSING) from None
    return txredisapi


class TxRedisConnection:
    """
    A reconnecting txredisapi connection to one Redis, for the limiter.

    The factory is built here rather than by C{lazyConnection} so that the
    endpoint uses the given reactor and a lost connection is retried within
    L{RECONNECT_MAX_SECONDS}.  A question asked while disconnected is not
    queued (txredisapi would hold it until Redis returns, then run it long
    after its deadline): L{connected} says so at once, and the fallback decides.
    """

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._handler = factory.handler
        self._txredisapi = require_txredisapi()

    @classmethod
    def connect(
        cls,
        address: RateStoreAddress,
        password: str | None,
        reactor: Any,
        connect_timeout: float = 1.0,
    ) -> TxRedisConnection:
        from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

        txredisapi = require_txredisapi()
        handler = txredisapi.UnixConnectionHandler if address.path else txredisapi.ConnectionHandler
        factory = txredisapi.RedisFactory(
            address.path or f"{address.host}:{address.port}",
            address.db,
            1,
            isLazy=True,
            handler=handler,
            password=password,
        )
        factory.maxDelay = RECONNECT_MAX_SECONDS
        factory.initialDelay = min(factory.initialDelay, RECONNECT_MAX_SECONDS)
        endpoint: Any
        if address.path:
            endpoint = UNIXClientEndpoint(reactor, address.path, timeout=connect_timeout)
        else:
            assert address.host is not None
            endpoint = HostnameEndpoint(reactor, address.host, address.port, connect_timeout)
        factory.startConnecting(endpoint)
        return cls(factory)

    @property
    def connected(self) -> bool:
        return bool(self._factory.size)

    def when_connected(self) -> Deferred[None]:
        """Fires once the first connection is made (for tests and the start-up log)."""
        first = self._factory.deferred
        if first is None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()

        def connected(result: object) -> object:
            waiting.callback(None)
            return result

        first.addCallback(connected)
        return waiting

    def run_script(self, key: str, arguments: list[int | str]) -> Deferred[Any]:
        """EVALSHA, and on NOSCRIPT (a new or flushed Redis) load the script and run it again."""
        txredisapi = self._txredisapi

        def load(failure: Failure) -> Any:
            failure.trap(txredisapi.ScriptDoesNotExist)
            loaded: Deferred[Any] = self._handler.script_load(SCRIPT)
            return loaded.addCallback(lambda _: self._handler.evalsha(SCRIPT_SHA, [key], arguments))

        ran: Deferred[Any] = self._handler.evalsha(SCRIPT_SHA, [key], arguments)
        return ran.addErrback(load)

    def remove(self, key: str, member: str) -> Deferred[Any]:
        removed: Deferred[Any] = self._handler.zrem(key, member)
        return removed

    def disconnect(self) -> Deferred[Any]:
        stopped: Deferred[Any] = self._factory.disconnect()
        return stopped


class RateStoreService(Service):
    """The parent's connection to the rate store, made at start-up and closed on stop."""

    def __init__(
        self,
        limiter: RedisSlidingWindowLimiter,
        address: RateStoreAddress,
        password: str | None,
        reactor: Any,
    ) -> None:
        self.limiter = limiter
        self.address = address
        self.password = password
        self.reactor = reactor
        self.connection: TxRedisConnection | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.connection = TxRedisConnection.connect(self.address, self.password, self.reactor)
        self.limiter.redis = self.connection
        self.connection.when_connected().addCallback(
            lambda _: log.info("Sharing the rate limit through {store}", store=self.limiter.name)
        )

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.limiter.redis = None
        connection, self.connection = self.connection, None
        if connection is None:
            return succeed(None)
        return connection.disconnect().addErrback(lambda _: None)


def read_password(path: str | None) -> str | None:
    """The password file's first line, or L{None} without one (L{OSError} if unreadable)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        line = f.readline().rstrip("\r\n")
    return line or None


def shared_limiter(
    config: Config, clock: IReactorTime, fallback: SlidingWindowLimiter
) -> tuple[RedisSlidingWindowLimiter, RateStoreService]:
    """
    The shared limiter for C{--rate-store} and the service that connects it.

    Raises L{ImportError} naming the extra without txredisapi, and L{OSError}
    for an unreadable password file: start-up errors, for the caller to report.
    """
    assert config.rate_store is not None
    require_txredisapi()
    address = rate_store_address(config.rate_store)
    password = read_password(config.rate_store_password_file)
    limiter = RedisSlidingWindowLimiter(
        config.rate_limit,
        config.rate_window,
        clock,
        fallback,
        policy=config.rate_store_fallback,
        timeout=config.rate_store_timeout,
        name=str(address),
    )
    return limiter, RateStoreService(limiter, address, password, clock)
