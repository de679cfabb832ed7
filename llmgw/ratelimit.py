"""
Admission control: an exact per-client sliding window.

Sub-window buckets are cheaper but either over-admit at bucket edges or refuse
clients that stayed under the limit, so each client keeps the times of its
admitted requests that still count.  That log holds no more than C{limit}
entries, because no more than C{limit} admissions can count at once, unless
admissions decided elsewhere are recorded into it (L{SlidingWindowLimiter.record}).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, insort
from collections import OrderedDict
from functools import lru_cache

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

__all__ = [
    "Decision",
    "ILimiter",
    "SlidingWindowLimiter",
    "format_go_duration",
    "rate_limit_headers",
]

# Each admission forgets up to this many idle clients: more than the one client an
# admission can add, so the backlog of idle clients shrinks faster than it can grow.
_FORGET_PER_ADMISSION = 2


class ILimiter(Interface):
    """The admission seam: in-process now, across worker processes (AMP) and Redis later."""

    def admit(key: str) -> Deferred[Decision]:
        """
        Decide whether the client C{key} may make a request now.

        Asynchronous so that the decision can be taken in another process.
        """


@attrs.frozen
class Decision:
    """What the limiter decided, with the numbers the RateLimit headers report."""

    allowed: bool
    limit: int
    window: int
    """Seconds."""
    remaining: int
    """Admissions left in the window after this decision."""
    reset: int
    """
    Whole seconds, at least 1, until a slot frees.  For a refusal this is the
    Retry-After value: a retry exactly this many seconds later is admitted.
    """


@implementer(ILimiter)
class SlidingWindowLimiter:
    """
    Admit at most C{limit} requests per client in any C{window} seconds.

    An admission at time C{s} counts at time C{t} iff C{t - s < window}, and a
    request is admitted iff fewer than C{limit} admissions count.  Refusals are
    not recorded, so a client that backs off is not punished for asking.

    Memory: a client with one counted admission costs a bare float, more cost an
    C{array('d')}; the table is kept in order of each client's latest admission
    so that idle clients can be forgotten from its head in amortized O(1).  A
    plain dict cannot do that cheaply: deleting from its head leaves tombstones
    that every later peek at the head has to walk over.

    The clock is assumed not to go backwards.  If it does, admissions are
    recorded no earlier than the client's previous one, which only makes the
    limiter stricter for that client until the clock catches up.
    """

    def __init__(self, limit: int, window: int, clock: IReactorTime) -> None:
        if limit < 1 or window < 1:
            raise ValueError(f"limit and window must be at least 1, not {limit} and {window}")
        self._limit = limit
        self._window = window
        self._clock = clock
        self._admitted: OrderedDict[str, float | array[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._admitted)

    def admit(self, key: str) -> Deferred[Decision]:
        return succeed(self.decide(key))

    def decide(self, key: str) -> Decision:
        """The synchronous core, for L{admit} and for a cross-process authority."""
        now = self._clock.seconds()
        window = self._window
        admitted = self._admitted
        times = admitted.get(key)
        if isinstance(times, array):
            first = 0 if now - times[0] < window else self._first_counted(times, now)
            counted = len(times) - first
            if counted >= self._limit:
                # The admission whose expiry brings the count under the limit:
                # the oldest one, unless recorded admissions took it past.
                return self._refuse(now, times[len(times) - self._limit])
            if counted:
                del times[:first]
                times.append(max(now, times[-1]))
                oldest = times[0]
            else:
                admitted[key] = oldest = now
        elif times is not None and now - times < window:
            if self._limit == 1:
                return self._refuse(now, times)
            admitted[key] = array("d", (times, max(now, times)))
            counted, oldest = 1, times
        else:
            admitted[key] = oldest = now
            counted = 0
        admitted.move_to_end(key)
        self._forget_idle(now, _FORGET_PER_ADMISSION)
        return self._allow(now, oldest, counted + 1)

    @property
    def clock(self) -> IReactorTime:
        """The clock the window is measured on."""
        return self._clock

    def newest(self, key: str) -> float | None:
        """The time of the client's latest admission, if one is remembered."""
        times = self._admitted.get(key)
        if isinstance(times, array):
            return times[-1]
        return times

    def record(self, key: str, at: float) -> None:
        """
        Count an admission decided elsewhere, made at C{at}: a worker's fallback
        served the request while this limiter could not be asked.  It counts
        even past the limit, because the request was served, and it expires
        at its own time, so the window stays exact.  The client moves to the
        end of the table as for any admission; a recorded time is at most a
        stall old, so idle clients are still forgotten, if a little later.
        """
        now = self._clock.seconds()
        if now - at >= self._window:
            return
        admitted = self._admitted
        times = admitted.get(key)
        if isinstance(times, array):
            insort(times, at)
        elif times is None:
            admitted[key] = at
        else:
            admitted[key] = array("d", sorted((times, at)))
        if self.newest(key) == at:
            admitted.move_to_end(key)

    def release(self, key: str, at: float) -> None:
        """Forget the admission made at C{at}: the request it admitted was not served."""
        admitted = self._admitted
        times = admitted.get(key)
        if isinstance(times, array):
            index = bisect_left(times, at)
            if index < len(times) and times[index] == at:
                del times[index]
                if not times:
                    del admitted[key]
        elif times == at:
            del admitted[key]

    def sweep(self) -> int:
        """
        Forget every client whose admissions have all expired; return how many.

        A dict never shrinks its table as entries leave it, so after a flood
        has passed the table is rebuilt at the size of the clients left.
        """
        forgotten = self._forget_idle(self._clock.seconds(), len(self._admitted))
        if forgotten > len(self._admitted):
            self._admitted = OrderedDict(self._admitted)
        return forgotten

    def _forget_idle(self, now: float, most: int) -> int:
        admitted = self._admitted
        window = self._window
        forgotten = 0
        while forgotten < most and admitted:
            key = next(iter(admitted))
            times = admitted[key]
            latest = times[-1] if isinstance(times, array) else times
            if now - latest < window:
                break
            del admitted[key]
            forgotten += 1
        return forgotten

    def _first_counted(self, times: array[float], now: float) -> int:
        """
        The index of the oldest admission that still counts, given that the
        first one does not.  It gallops from the front, because usually only
        the few admissions made since the client's last request have expired,
        and compares with the exact predicate used everywhere else rather than
        bisecting for C{now - window}, whose rounding can disagree with it.
        """
        window = self._window
        size = len(times)
        low = probe = 1
        while probe < size and now - times[probe] >= window:
            low = probe + 1
            probe *= 2
        high = min(probe, size)
        while low < high:
            middle = (low + high) // 2
            if now - times[middle] >= window:
                low = middle + 1
            else:
                high = middle
        return low

    def _allow(self, now: float, oldest: float, counted: int) -> Decision:
        return Decision(
            allowed=True,
            limit=self._limit,
            window=self._window,
            remaining=self._limit - counted,
            reset=self._seconds_until_expiry(now, oldest),
        )

    def _refuse(self, now: float, blocking: float) -> Decision:
        return Decision(
            allowed=False,
            limit=self._limit,
            window=self._window,
            remaining=0,
            reset=self._seconds_until_expiry(now, blocking),
        )

    def _seconds_until_expiry(self, now: float, admitted_at: float) -> int:
        """
        The least whole C{r >= 1} for which the admission at C{admitted_at} no
        longer counts at C{now + r}, computed with the float addition a clock
        performs when it advances, so a client retrying after exactly C{r}
        seconds is admitted and one retrying a second earlier is not.
        """
        window = self._window
        r = max(1, math.ceil(admitted_at + window - now))
        while r > 1 and (now + (r - 1)) - admitted_at >= window:
            r -= 1
        while (now + r) - admitted_at < window:
            r += 1
        return r


def format_go_duration(seconds: int) -> str:
    """
    Whole seconds the way Go's C{time.Duration} prints them (C{59s}, C{6m0s},
    C{1h0m0s}), which is what OpenAI sends in C{x-ratelimit-reset-requests}.
    """
    if seconds < 0:
        return "-" + format_go_duration(-seconds)
    minutes, secs = divmod(seconds, 60)
    if not minutes:
        return f"{secs}s"
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return f"{minutes}m{secs}s"
    return f"{hours}h{minutes}m{secs}s"


@lru_cache(maxsize=64)
def _policy_value(limit: int, window: int) -> bytes:
    return b'"default";q=%d;w=%d' % (limit, window)


@lru_cache(maxsize=4096)
def _reset_duration(seconds: int) -> bytes:
    return format_go_duration(seconds).encode("ascii")


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """
    The IETF draft's structured RateLimit fields, then OpenAI's
    C{x-ratelimit-*-requests} headers that existing SDKs and dashboards read.
    """
    return [
        (b"RateLimit-Policy", _policy_value(decision.limit, decision.window)),
        (b"RateLimit", b'"default";r=%d;t=%d' % (decision.remaining, decision.reset)),
        (b"x-ratelimit-limit-requests", b"%d" % (decision.limit,)),
        (b"x-ratelimit-remaining-requests", b"%d" % (decision.remaining,)),
        (b"x-ratelimit-reset-requests", _reset_duration(decision.reset)),
    ]
