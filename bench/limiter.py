"""
How fast SlidingWindowLimiter decides and how much memory it keeps per client.

    .venv/bin/python bench/limiter.py            # or: PYTHONPATH=. python3 bench/limiter.py

Time comes from twisted.internet.task.Clock, advanced between requests as the
reactor's clock would be, so the figures include Clock.advance.  Client keys
are dotted IPv4 strings made per request, as llmgw.clients makes them; the
memory figure counts them, since the limiter keeps them alive.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Iterator

from twisted.internet.task import Clock

from llmgw.ratelimit import Decision, SlidingWindowLimiter, rate_limit_headers

CLIENTS = 1_000_000
LIMIT = 1000
WINDOW = 900


def keys(count: int) -> Iterator[str]:
    for i in range(count):
        yield f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def distinct_clients(step: float) -> tuple[Clock, SlidingWindowLimiter, float]:
    """One request from each of CLIENTS clients, C{step} seconds apart."""
    clock = Clock()
    limiter = SlidingWindowLimiter(LIMIT, WINDOW, clock)
    started = time.perf_counter()
    for key in keys(CLIENTS):
        clock.advance(step)
        limiter.decide(key)
    return clock, limiter, time.perf_counter() - started


def report(name: str, count: int, seconds: float) -> None:
    print(f"{name:<52} {count / seconds:>12,.0f} /s  ({seconds / count * 1e6:.2f} us each)")


def main() -> None:
    print(f"Python {sys.version.split()[0]}, limit {LIMIT} per {WINDOW} s\n")

    _, limiter, seconds = distinct_clients(0.0005)
    report(f"decide, {CLIENTS:,} distinct clients", CLIENTS, seconds)

    _, limiter, seconds = distinct_clients(0.002)
    report(
        f"decide, {CLIENTS:,} clients over {CLIENTS * 0.002:.0f} s (forgetting)", CLIENTS, seconds
    )
    print(f"{'  tracked at the end (clients in the last window)':<52} {len(limiter):>12,}")

    clock = Clock()
    limiter = SlidingWindowLimiter(LIMIT, WINDOW, clock)
    requests = 200_000
    started = time.perf_counter()
    for _ in range(requests):
        clock.advance(0.001)
        limiter.decide("203.0.113.1")
    seconds = time.perf_counter() - started
    report(f"decide, one client at {LIMIT} per {WINDOW} s (mostly refused)", requests, seconds)
    started = time.perf_counter()
    for _ in range(requests):
        clock.advance(1)
        limiter.decide("203.0.113.1")
    seconds = time.perf_counter() - started
    report(f"decide, one client with {LIMIT} counted, 1 per second", requests, seconds)

    decision = Decision(True, LIMIT, WINDOW, 999, 900)
    started = time.perf_counter()
    for _ in range(requests):
        rate_limit_headers(decision)
    report("rate_limit_headers", requests, time.perf_counter() - started)

    tracemalloc.start()
    clock, limiter, _ = distinct_clients(0.0005)
    retained, _ = tracemalloc.get_traced_memory()
    print(f"\nafter {CLIENTS:,} distinct clients, one request each (tracemalloc):")
    print(f"  tracked clients  {len(limiter):>12,}")
    print(f"  bytes per client {retained / len(limiter):>12.1f}  (key string included)")
    clock.advance(WINDOW)
    started = time.perf_counter()
    forgotten = limiter.sweep()
    seconds = time.perf_counter() - started
    retained, _ = tracemalloc.get_traced_memory()
    print(f"one window later, sweep() forgot {forgotten:,} in {seconds:.2f} s;")
    print(f"  tracked clients  {len(limiter):>12,}, {retained:,} bytes retained")
    tracemalloc.stop()


if __name__ == "__main__":
    main()
