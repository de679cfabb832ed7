"""
Tests for L{llmgw.ratelimit}.

The properties replay random request schedules against a brute-force oracle
that keeps every admitted time and counts with the limiter's own definition:
an admission at C{s} counts at C{t} iff C{t - s < window}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from llmgw.ratelimit import (
    Decision,
    ILimiter,
    SlidingWindowLimiter,
    format_go_duration,
    rate_limit_headers,
)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, int, list[float]]:
    """
    A limit, a window, and the clock increments before each request: zeros for
    bursts, exact windows and their neighbours for the edges, and fractions
    whose sums are inexact in binary floating point.
    """
    limit = draw(st.integers(1, 4))
    window = draw(st.integers(1, 8))
    increment = st.one_of(
        st.just(0),
        st.just(window),
        st.integers(0, 2 * window),
        st.sampled_from([0.1, 0.3, 0.5, window - 0.5, window - 0.1, window + 0.1]),
        st.floats(0, 2 * window, allow_nan=False, allow_infinity=False),
    )
    return limit, window, draw(st.lists(increment, max_size=40))


def counted(admitted: list[float], now: float, window: int) -> int:
    return sum(1 for at in admitted if now - at < window)


def replay(
    limit: int, window: int, increments: list[float]
) -> tuple[Clock, SlidingWindowLimiter, list[tuple[float, Decision]]]:
    clock = Clock()
    limiter = SlidingWindowLimiter(limit, window, clock)
    decisions = []
    for increment in increments:
        clock.advance(increment)
        decisions.append((clock.seconds(), limiter.decide("client")))
    return clock, limiter, decisions


class SlidingWindowPropertyTests(SynchronousTestCase):
    @given(schedules())
    def test_never_over_admits(self, schedule: tuple[int, int, list[float]]) -> None:
        """No half-open interval of one window holds more than C{limit} admissions."""
        limit, window, increments = schedule
        _, _, decisions = replay(limit, window, increments)
        admitted = [at for at, decision in decisions if decision.allowed]
        for start in admitted:
            inside = [at for at in admitted if at >= start and at - start < window]
            self.assertLessEqual(len(inside), limit)

    @given(schedules())
    def test_under_limit_never_refused(self, schedule: tuple[int, int, list[float]]) -> None:
        """
        A request that finds fewer than C{limit} admissions in its window is
        admitted, and the numbers reported are the oracle's.
        """
        limit, window, increments = schedule
        admitted: list[float] = []
        for now, decision in replay(limit, window, increments)[2]:
            before = counted(admitted, now, window)
            self.assertEqual(decision.allowed, before < limit)
            if decision.allowed:
                admitted.append(now)
                self.assertEqual(decision.remaining, limit - before - 1)
            else:
                self.assertEqual(decision.remaining, 0)

    @given(schedules())
    def test_reset_is_when_a_slot_frees(self, schedule: tuple[int, int, list[float]]) -> None:
        """
        C{reset} is the least whole number of seconds after which one more
        request would be admitted (refused) or the oldest admission stops
        counting (allowed), with the clock's own float addition.
        """
        limit, window, increments = schedule
        admitted: list[float] = []
        for now, decision in replay(limit, window, increments)[2]:
            if decision.allowed:
                admitted.append(now)
            using = limit - decision.remaining
            self.assertGreaterEqual(decision.reset, 1)
            self.assertLess(counted(admitted, now + decision.reset, window), using)
            if decision.reset > 1:
                self.assertEqual(counted(admitted, now + (decision.reset - 1), window), using)

    @given(schedules())
    def test_retry_after_is_honoured(self, schedule: tuple[int, int, list[float]]) -> None:
        """
        A client refused with C{reset} seconds is admitted when it retries after
        exactly that many seconds, and still refused a second earlier.
        """
        limit, window, increments = schedule
        saturated = [*increments, *[0] * limit]
        _, limiter, _ = replay(limit, window, saturated)
        refusal = limiter.decide("client")
        self.assertFalse(refusal.allowed)

        clock, limiter, _ = replay(limit, window, saturated)
        clock.advance(refusal.reset)
        self.assertTrue(limiter.decide("client").allowed)

        if refusal.reset > 1:
            clock, limiter, _ = replay(limit, window, saturated)
            clock.advance(refusal.reset - 1)
            self.assertFalse(limiter.decide("client").allowed)

    @given(
        st.integers(1, 3),
        st.integers(1, 5),
        st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 6)), max_size=60),
    )
    def test_clients_are_independent_and_idle_ones_forgotten(
        self, limit: int, window: int, requests: list[tuple[str, int]]
    ) -> None:
        """
        Each client gets its own exact window however the others' requests
        interleave and get forgotten, and after a sweep exactly the clients with
        an admission still counting are tracked.
        """
        clock = Clock()
        limiter = SlidingWindowLimiter(limit, window, clock)
        admitted: dict[str, list[float]] = {}
        for key, increment in requests:
            clock.advance(increment)
            now = clock.seconds()
            times = admitted.setdefault(key, [])
            decision = limiter.decide(key)
            self.assertEqual(decision.allowed, counted(times, now, window) < limit)
            if decision.allowed:
                times.append(now)
            self.assertGreaterEqual(len(limiter), 1)
        now = clock.seconds()
        active = sum(1 for times in admitted.values() if counted(times, now, window))
        limiter.sweep()
        self.assertEqual(len(limiter), active)


class SlidingWindowLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = SlidingWindowLimiter(3, 10, self.clock)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ILimiter, self.limiter))

    def test_admit_fires_with_the_decision(self) -> None:
        self.assertEqual(
            self.successResultOf(self.limiter.admit("a")),
            Decision(allowed=True, limit=3, window=10, remaining=2, reset=10),
        )

    def test_counts_down_then_refuses(self) -> None:
        self.assertEqual(self.limiter.decide("a"), Decision(True, 3, 10, 2, 10))
        self.clock.advance(2)
        self.assertEqual(self.limiter.decide("a"), Decision(True, 3, 10, 1, 8))
        self.clock.advance(3)
        self.assertEqual(self.limiter.decide("a"), Decision(True, 3, 10, 0, 5))
        self.assertEqual(self.limiter.decide("a"), Decision(False, 3, 10, 0, 5))
        self.assertEqual(self.limiter.decide("b"), Decision(True, 3, 10, 2, 10))

    def test_window_is_half_open(self) -> None:
        """An admission stops counting exactly one window later, not a moment after."""
        limiter = SlidingWindowLimiter(1, 10, self.clock)
        self.assertTrue(limiter.decide("a").allowed)
        self.clock.advance(9.5)
        self.assertEqual(limiter.decide("a"), Decision(False, 1, 10, 0, 1))
        self.clock.advance(0.5)
        self.assertEqual(limiter.decide("a"), Decision(True, 1, 10, 0, 10))

    def test_window_edge_in_the_clocks_arithmetic(self) -> None:
        """
        Admitted at 0.1, a client told to retry in 10 seconds does so at
        C{0.1 + 10}, and C{(0.1 + 10) - 0.1 == 10} although C{(0.1 + 10) - 10 < 0.1}:
        expiry is decided by the elapsed time, as the retry arithmetic is.
        """
        limiter = SlidingWindowLimiter(2, 10, self.clock)
        self.clock.advance(0.1)
        limiter.decide("a")
        limiter.decide("a")
        self.assertEqual(limiter.decide("a"), Decision(False, 2, 10, 0, 10))
        self.clock.advance(10)
        self.assertEqual(limiter.decide("a"), Decision(True, 2, 10, 1, 10))

    def test_reset_rounds_up(self) -> None:
        limiter = SlidingWindowLimiter(1, 10, self.clock)
        self.clock.advance(0.5)
        limiter.decide("a")
        self.clock.advance(0.5)
        self.assertEqual(limiter.decide("a").reset, 10)

    def test_refusals_do_not_count(self) -> None:
        limiter = SlidingWindowLimiter(1, 10, self.clock)
        limiter.decide("a")
        for _ in range(5):
            self.clock.advance(1)
            self.assertFalse(limiter.decide("a").allowed)
        self.clock.advance(5)
        self.assertTrue(limiter.decide("a").allowed)

    def test_only_expired_admissions_are_dropped(self) -> None:
        """Admissions leave the window one by one, oldest first."""
        for _ in range(3):
            self.limiter.decide("a")
            self.clock.advance(4)
        # Admitted at 0, 4 and 8; now 12: the one at 0 has expired.
        self.assertEqual(self.limiter.decide("a"), Decision(True, 3, 10, 0, 2))
        self.assertEqual(self.limiter.decide("a"), Decision(False, 3, 10, 0, 2))
        self.clock.advance(2)
        self.assertEqual(self.limiter.decide("a"), Decision(True, 3, 10, 0, 4))

    def test_clock_going_backwards_only_makes_it_stricter(self) -> None:
        """
        An admission is recorded no earlier than the one before it, so a clock
        stepped back can neither expire it early nor unsort the log.
        """
        limiter = SlidingWindowLimiter(2, 10, self.clock)
        self.clock.advance(10)
        limiter.decide("a")
        self.clock.advance(-5)
        self.assertTrue(limiter.decide("a").allowed)
        self.clock.advance(10)
        self.assertFalse(limiter.decide("a").allowed)
        self.clock.advance(5)
        self.assertTrue(limiter.decide("a").allowed)

    def test_clock_going_backwards_keeps_the_log_sorted(self) -> None:
        limiter = SlidingWindowLimiter(10, 10, self.clock)
        for step in (1, 1, 1, 7, -6):
            self.clock.advance(step)
            limiter.decide("a")
        # Recorded at 1, 2, 3, 10 and 10; at 14 the last two still count.
        self.clock.advance(10)
        self.assertEqual(limiter.decide("a"), Decision(True, 10, 10, 7, 6))

    def test_many_expire_at_once(self) -> None:
        """One of them exactly at the edge of the window."""
        limiter = SlidingWindowLimiter(10, 10, self.clock)
        for _ in range(7):
            limiter.decide("a")
            self.clock.advance(1)
        # Admitted at 0 to 6; at 15 the one at 5 has just expired.
        self.clock.advance(8)
        self.assertEqual(limiter.decide("a"), Decision(True, 10, 10, 8, 1))

    def test_rejects_empty_limits(self) -> None:
        self.assertRaises(ValueError, SlidingWindowLimiter, 0, 10, self.clock)
        self.assertRaises(ValueError, SlidingWindowLimiter, 1, 0, self.clock)


class ForgettingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = SlidingWindowLimiter(3, 10, self.clock)

    def test_tracks_each_client(self) -> None:
        self.assertEqual(len(self.limiter), 0)
        for key in "abc":
            self.limiter.decide(key)
        self.limiter.decide("a")
        self.assertEqual(len(self.limiter), 3)

    def test_refused_newcomer_is_not_tracked(self) -> None:
        limiter = SlidingWindowLimiter(1, 10, self.clock)
        limiter.decide("a")
        limiter.decide("a")
        self.assertEqual(len(limiter), 1)

    def test_admissions_forget_idle_clients(self) -> None:
        """Each admission forgets a couple of idle clients, without a sweep."""
        for key in "abcd":
            self.limiter.decide(key)
        self.clock.advance(10)
        self.limiter.decide("e")
        self.assertEqual(len(self.limiter), 3)
        self.limiter.decide("f")
        self.assertEqual(len(self.limiter), 2)

    def test_sweep_forgets_every_idle_client(self) -> None:
        for key in "abcd":
            self.limiter.decide(key)
            self.limiter.decide(key)
        self.clock.advance(9.5)
        self.assertEqual(self.limiter.sweep(), 0)
        self.assertEqual(len(self.limiter), 4)
        self.clock.advance(0.5)
        self.assertEqual(self.limiter.sweep(), 4)
        self.assertEqual(len(self.limiter), 0)

    def test_recent_admission_keeps_a_client(self) -> None:
        """A client is kept while its latest admission counts, however old its first."""
        self.limiter.decide("a")
        self.clock.advance(5)
        self.limiter.decide("b")
        self.clock.advance(1)
        self.limiter.decide("a")
        self.clock.advance(9)
        self.assertEqual(self.limiter.sweep(), 1)
        self.assertEqual(len(self.limiter), 1)
        self.assertEqual(self.limiter.decide("a"), Decision(True, 3, 10, 1, 1))

    def test_recent_admissions_keep_a_client(self) -> None:
        """The same, for a client with several admissions counting."""
        self.limiter.decide("a")
        self.limiter.decide("a")
        self.clock.advance(5)
        self.limiter.decide("b")
        self.clock.advance(1)
        self.limiter.decide("a")
        self.clock.advance(9)
        self.assertEqual(self.limiter.sweep(), 1)
        self.assertEqual(len(self.limiter), 1)
        self.assertEqual(self.limiter.decide("a"), Decision(True, 3, 10, 1, 1))

    def test_sweep_after_a_flood_keeps_the_rest(self) -> None:
        """Rebuilding the table after most clients left keeps the others and their order."""
        for key in "abc":
            self.limiter.decide(key)
        self.clock.advance(5)
        self.limiter.decide("d")
        self.limiter.decide("d")
        self.clock.advance(5)
        self.assertEqual(self.limiter.sweep(), 3)
        self.assertEqual(self.limiter.decide("d"), Decision(True, 3, 10, 0, 5))
        self.clock.advance(1)
        self.limiter.decide("e")
        self.clock.advance(9)
        self.assertEqual(self.limiter.sweep(), 1)
        self.assertEqual(len(self.limiter), 1)
        self.assertEqual(self.limiter.decide("e"), Decision(True, 3, 10, 1, 1))

    def test_forgotten_client_starts_afresh(self) -> None:
        for _ in range(3):
            self.limiter.decide("a")
        self.clock.advance(10)
        self.assertEqual(self.limiter.sweep(), 1)
        self.assertEqual(self.limiter.decide("a"), Decision(True, 3, 10, 2, 10))


class HeaderTests(SynchronousTestCase):
    def test_allowed(self) -> None:
        self.assertEqual(
            rate_limit_headers(Decision(True, 1000, 900, 999, 900)),
            [
                (b"RateLimit-Policy", b'"default";q=1000;w=900'),
                (b"RateLimit", b'"default";r=999;t=900'),
                (b"x-ratelimit-limit-requests", b"1000"),
                (b"x-ratelimit-remaining-requests", b"999"),
                (b"x-ratelimit-reset-requests", b"15m0s"),
            ],
        )

    def test_refused(self) -> None:
        self.assertEqual(
            rate_limit_headers(Decision(False, 60, 3600, 0, 59)),
            [
                (b"RateLimit-Policy", b'"default";q=60;w=3600'),
                (b"RateLimit", b'"default";r=0;t=59'),
                (b"x-ratelimit-limit-requests", b"60"),
                (b"x-ratelimit-remaining-requests", b"0"),
                (b"x-ratelimit-reset-requests", b"59s"),
            ],
        )

    def test_go_durations(self) -> None:
        self.assertEqual(
            [format_go_duration(s) for s in (0, 1, 59, 60, 360, 900, 3600, 3723, 90061, -61)],
            ["0s", "1s", "59s", "1m0s", "6m0s", "15m0s", "1h0m0s", "1h2m3s", "25h1m1s", "-1m1s"],
        )
