"""
Tests for the arithmetic and the verdicts of C{bench/run.py} (C{make bench}):
how stream test (iii) tells CPU per relayed chunk from CPU per stream opened,
and how the report's Targets table states issue 13's targets first.

The bench is not part of the package: these tests load it from the source
tree, and skip where it is not there (pybuild copies only C{tests/}).
"""

# The report's rows are compared exactly, typographic signs and all.
# ruff: noqa: RUF001

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

RUN_PY = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def load_bench() -> ModuleType:
    if not RUN_PY.exists():
        raise SkipTest(f"the bench is not in this tree ({RUN_PY})")
    spec = importlib.util.spec_from_file_location("llmgw_bench_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stream_result(**figures: Any) -> dict[str, Any]:
    """What C{measure_direct} or C{measure_relay} gives for a clean run, with C{figures}."""
    result: dict[str, Any] = {
        "streams_ok": 500,
        "streams_expected": 500,
        "streams_failed": 0,
        "events": 8000,
        "events_expected": 8000,
        "lost": 0,
        "stalls": 0,
        "max_gap_ms": 51.0,
        "lat_p50_ms": 0.5,
        "lat_p90_ms": 1.0,
        "lat_p99_ms": 2.0,
        "lat_max_ms": 9.0,
        "cpu_us_per_event": 100.0,
        "cpu_us_per_stream": 1600.0,
        "rss_per_stream_kb": 40.0,
        "cpu_cores": 0.5,
        "foreign_cores": 0.01,
        "peak_open": 500,
    }
    result.update(figures)
    return result


class SplitStreamCpuTests(SynchronousTestCase):
    """
    C{split_stream_cpu}: per chunk = (CPU of the long run - CPU of the short
    run) / (streams x extra chunks); per stream = CPU of the short run /
    streams - short chunks x per chunk.
    """

    def setUp(self) -> None:
        self.bench = load_bench()

    def test_issue_figures(self) -> None:
        """
        The figures issue 13 measured for the gateway (47.1 us a chunk,
        2.19 ms a stream) come back out of the CPU of 500 streams at 16 and
        at 256 chunks.
        """
        streams, per_chunk, per_stream = 500, 47.1e-6, 2.19e-3
        short = streams * (per_stream + 16 * per_chunk)
        long = streams * (per_stream + 256 * per_chunk)
        chunk_us, stream_us = self.bench.split_stream_cpu(short, long, streams, 16, 256)
        self.assertAlmostEqual(chunk_us, 47.1, places=9)
        self.assertAlmostEqual(stream_us, 2190.0, places=6)

    def test_formula(self) -> None:
        """
        (7.2 - 1.2) s / (500 x 240) = 50 us a chunk; 1.2 s / 500 - 16 x 50 us
        = 1,600 us a stream.
        """
        chunk_us, stream_us = self.bench.split_stream_cpu(1.2, 7.2, 500, 16, 256)
        self.assertAlmostEqual(chunk_us, 50.0, places=9)
        self.assertAlmostEqual(stream_us, 1600.0, places=6)

    def test_no_cost_per_chunk(self) -> None:
        """Two runs that cost the same: every microsecond went to opening streams."""
        self.assertEqual(self.bench.split_stream_cpu(1.0, 1.0, 500, 16, 256), (0.0, 2000.0))

    def test_ramp(self) -> None:
        """(iii) opens its streams at 250 a second: 500 over 2 s."""
        self.assertEqual(self.bench.split_ramp(500), 2.0)
        self.assertEqual(self.bench.split_ramp(100), 0.4)


class ExactOrTicksTests(SynchronousTestCase):
    """
    C{exact_or_ticks}: a relay's CPU from schedstat's nanoseconds, unless the
    ticks of C{/proc/PID/stat} show more than rounding can explain.
    """

    def setUp(self) -> None:
        self.bench = load_bench()
        self.tick = 1 / self.bench.CLOCK_TICKS

    def test_rounding(self) -> None:
        """Ticks that differ by up to a tick per process are rounding: the exact figure stands."""
        self.assertEqual(
            self.bench.exact_or_ticks(1.234567, 1.234567 + 2.5 * self.tick, 3), 1.234567
        )
        self.assertEqual(self.bench.exact_or_ticks(1.234567, 1.20, 3), 1.234567)

    def test_thread_ended(self) -> None:
        """
        Ticks beyond that: a thread ended between the readings, and took its
        time out of schedstat's sum; the ticks have it.
        """
        self.assertEqual(
            self.bench.exact_or_ticks(1.0, 1.0 + 4 * self.tick, 3), 1.0 + 4 * self.tick
        )


def http_figures(**figures: float) -> dict[str, float]:
    """The request rounds' derived figures that issue 13's targets read."""
    derived = {
        "ratio": 1.6,
        "ratio_low": 1.4,
        "ratio_high": 1.8,
        "added_p50_ms": 0.6,
        "floor_added_p50_ms": 0.68,
    }
    derived.update(figures)
    return derived


def stream_figures(
    gateway_chunk: float = 40.0,
    pump_chunk: float = 40.0,
    gateway_stream: float = 1000.0,
    pump_stream: float = 500.0,
    rate: dict[str, Any] | None = None,
    opened: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream tests (i), (ii) and (iii) as C{issue13_targets} reads them."""
    return {
        "i": {
            "shape": {"conns": 500, "streams": 6, "chunks": 64, "interval_ms": 20.0, "ramp": 1.0},
            "gateway": stream_result(**(rate or {})),
            "pump": stream_result(stalls=12, lost=3),
        },
        "ii": {
            "gateway": stream_result(peak_open=5000, **(opened or {})),
            "pump": stream_result(peak_open=5000, rss_per_stream_kb=30.25),
        },
        "iii": {
            "split": {
                "gateway": {"cpu_us_per_chunk": gateway_chunk, "cpu_us_per_stream": gateway_stream},
                "pump": {"cpu_us_per_chunk": pump_chunk, "cpu_us_per_stream": pump_stream},
            }
        },
    }


class Issue13TargetsTests(SynchronousTestCase):
    """C{issue13_targets}: issue 13's five targets as rows, in its order."""

    def setUp(self) -> None:
        self.bench = load_bench()

    def test_nothing_run(self) -> None:
        """With no part of the bench run, every row says so and gives no verdict."""
        self.assertEqual(
            self.bench.issue13_targets({}, {}),
            [
                (
                    "throughput at 50 connections, gateway (limiter on) ÷ floor",
                    "not run",
                    "≥ 1.50×",
                    None,
                ),
                ("added p50 at 1 connection, over direct", "not run", "≤ the floor's", None),
                (
                    "(iii) CPU per relayed chunk, gateway ÷ pump",
                    "not run",
                    "≤ 1.05× the pump's",
                    None,
                ),
                (
                    "(iii) CPU per stream opened, gateway ÷ pump",
                    "not run",
                    "≤ 2.50× the pump's",
                    None,
                ),
                (
                    "(i) 500 × 64 events @ 20 ms: stalls and lost events",
                    "not run",
                    "0 stalls, 0 lost",
                    None,
                ),
                ("(ii) RSS per open stream", "not run", "≤ 48 KB", None),
            ],
        )

    def test_met(self) -> None:
        """Figures within every goal: each row is met, and says what was measured."""
        self.assertEqual(
            self.bench.issue13_targets(http_figures(), stream_figures()),
            [
                (
                    "throughput at 50 connections, gateway (limiter on) ÷ floor",
                    "1.60× (rounds 1.40–1.80)",
                    "≥ 1.50×",
                    True,
                ),
                (
                    "added p50 at 1 connection, over direct",
                    "+0.600 ms (floor +0.680 ms)",
                    "≤ the floor's",
                    True,
                ),
                (
                    "(iii) CPU per relayed chunk, gateway ÷ pump",
                    "1.00× (40.0 vs 40.0 µs per chunk)",
                    "≤ 1.05× the pump's",
                    True,
                ),
                (
                    "(iii) CPU per stream opened, gateway ÷ pump",
                    "2.00× (1,000.0 vs 500.0 µs per stream)",
                    "≤ 2.50× the pump's",
                    True,
                ),
                (
                    "(i) 500 × 64 events @ 20 ms: stalls and lost events",
                    "gateway 0 stalls, 0 lost (the pump in the same run: 12 stalls, 3 lost)",
                    "0 stalls, 0 lost",
                    True,
                ),
                (
                    "(ii) 5,000 open streams: RSS per open stream",
                    "40.0 KB (pump 30.2 KB)",
                    "≤ 48 KB",
                    True,
                ),
            ],
        )

    def test_issue_figures_missed(self) -> None:
        """The figures issue 13 started from miss every target."""
        rows = self.bench.issue13_targets(
            http_figures(ratio=1.20, ratio_low=0.90, ratio_high=1.56, added_p50_ms=0.81),
            stream_figures(
                gateway_chunk=47.1,
                pump_chunk=41.7,
                gateway_stream=2190.0,
                pump_stream=610.0,
                rate={"stalls": 400, "lost": 0},
                opened={"rss_per_stream_kb": 74.4},
            ),
        )
        self.assertEqual(
            [(measured, ok) for _, measured, _, ok in rows],
            [
                ("1.20× (rounds 0.90–1.56)", False),
                ("+0.810 ms (floor +0.680 ms)", False),
                ("1.13× (47.1 vs 41.7 µs per chunk)", False),
                ("3.59× (2,190.0 vs 610.0 µs per stream)", False),
                ("gateway 400 stalls, 0 lost (the pump in the same run: 12 stalls, 3 lost)", False),
                ("74.4 KB (pump 30.2 KB)", False),
            ],
        )

    def test_boundaries(self) -> None:
        """A figure exactly at its goal meets it."""
        rows = self.bench.issue13_targets(
            http_figures(ratio=1.5, added_p50_ms=0.68),
            stream_figures(
                gateway_chunk=105.0,
                pump_chunk=100.0,
                gateway_stream=1250.0,
                pump_stream=500.0,
                opened={"rss_per_stream_kb": 48.0},
            ),
        )
        self.assertEqual([ok for *_, ok in rows], [True] * 6)

    def test_lost_or_failed(self) -> None:
        """In (i), a lost event or a failed stream misses the target, as a stall does."""
        for rate, measured in [
            ({"lost": 64}, "gateway 0 stalls, 64 lost"),
            ({"streams_failed": 2}, "gateway 0 stalls, 0 lost, 2 streams failed"),
        ]:
            row = self.bench.issue13_targets({}, stream_figures(rate=rate))[4]
            self.assertEqual(
                row[1:],
                (
                    f"{measured} (the pump in the same run: 12 stalls, 3 lost)",
                    "0 stalls, 0 lost",
                    False,
                ),
            )

    def test_pump_not_positive(self) -> None:
        """
        A pump's CPU per chunk at or below zero (the two runs drifted apart)
        makes no ratio: the row gives none, and no verdict.
        """
        row = self.bench.issue13_targets({}, stream_figures(pump_chunk=-0.5))[2]
        self.assertEqual(
            row,
            (
                "(iii) CPU per relayed chunk, gateway ÷ pump",
                "n/a (pump -0.5 µs per chunk: the runs drifted)",
                "≤ 1.05× the pump's",
                None,
            ),
        )


class ReportTests(SynchronousTestCase):
    """C{report}: the Targets table leads with issue 13's rows, and (iii) is reported."""

    def setUp(self) -> None:
        self.bench = load_bench()
        self.results: dict[str, Any] = {
            "date": "2026-12-03",
            "command": "bench/run.py --only streams",
            "seconds": 60.0,
            "file_limit": 20000,
            "versions": {"machine": "m", "os": "o", "gateway": "g", "tools": "t"},
        }

    def targets(self, text: str) -> list[str]:
        return text.split("### Targets\n", 1)[1].strip().splitlines()

    def test_issue_13_first(self) -> None:
        """Issue 13's rows come first, marked with their issue, before any earlier issue's."""
        self.results["limiter"] = {
            "decisions_per_s": 1.0,
            "decisions_per_s_busy": 1.0,
            "bytes_per_client": 164.0,
        }
        rows = self.targets(self.bench.report(self.results, self.bench.parse_args([])))
        self.assertEqual(
            rows[2:5],
            [
                "| issue | target | measured | goal | |",
                "|---|---|---:|---:|---|",
                "| 13 | throughput at 50 connections, gateway (limiter on) ÷ floor | not run "
                "| ≥ 1.50× | n/a |",
            ],
        )
        self.assertEqual([row.split(" | ", 1)[0] for row in rows[4:]], ["| 13"] * 6 + ["| 7"])
        self.assertEqual(
            rows[-1], "| 7 | limiter bytes per tracked client | 164.0 B | ≤ 300 B | **met** |"
        )

    def test_split(self) -> None:
        """
        (iii): a table row per length and path, and a line with each relay's
        CPU per chunk and per stream and the gateway's multiples of the pump's.
        """
        shape = {"conns": 500, "streams": 1, "interval_ms": 50.0, "ramp": 2.0}
        runs = [
            {
                "chunks": chunks,
                "shape": dict(shape, chunks=chunks),
                "direct": stream_result(),
                "pump": stream_result(cpu_cores=0.25),
                "gateway": stream_result(cpu_cores=0.5, foreign_cores=0.03),
            }
            for chunks in (16, 256)
        ]
        self.results["streams"] = {
            "iii": {
                "shape": {"conns": 500, "chunks": [16, 256], "interval_ms": 50.0},
                "runs": runs,
                "split": {
                    "gateway": {"cpu_us_per_chunk": 52.5, "cpu_us_per_stream": 1500.0},
                    "pump": {"cpu_us_per_chunk": 50.0, "cpu_us_per_stream": 500.0},
                },
            }
        }
        text = self.bench.report(self.results, self.bench.parse_args([]))
        titles = [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| (iii)")]
        self.assertEqual(
            titles,
            [
                ["| (iii) 500 × 16 events, 50 ms apart", path]
                for path in ("direct", "pump", "gateway")
            ]
            + [
                ["| (iii) 500 × 256 events, 50 ms apart", path]
                for path in ("direct", "pump", "gateway")
            ],
        )
        relay_rows = [
            line
            for line in text.splitlines()
            if line.startswith("| (iii)") and " | direct | " not in line
        ]
        # CPU per event and per stream; no RSS per open stream (the relays
        # ran other streams since their idle RSS was read).
        self.assertEqual(
            [row.rsplit(" | ", 3)[1:] for row in relay_rows], [["100.0", "1,600", " |"]] * 4
        )
        self.assertIn(
            "- (iii) CPU per relayed chunk = (CPU at 256 chunks − CPU at 16) / (500 × 240), "
            "CPU per stream opened = CPU at 16 / 500 − 16 × per chunk: pump 50.0 µs per chunk, "
            "500 µs per stream; gateway 52.5 and 1,500 µs: **1.05×** and **3.00×** the pump's; "
            "cores busy (16 chunks: pump 0.25, gateway 0.50, 256 chunks: pump 0.25, gateway 0.50); "
            "other processes at most 0.03 cores\n",
            text,
        )
        rows = self.targets(text)
        self.assertEqual(
            rows[6:8],
            [
                "| 13 | (iii) CPU per relayed chunk, gateway ÷ pump | 1.05× (52.5 vs 50.0 µs per "
                "chunk) | ≤ 1.05× the pump's | **met** |",
                "| 13 | (iii) CPU per stream opened, gateway ÷ pump | 3.00× (1,500.0 vs 500.0 µs "
                "per stream) | ≤ 2.50× the pump's | **missed** |",
            ],
        )
