"""Tests for L{llmgw.metrics}: counting records, deltas, totals, the exposition."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from llmgw.cluster import ParentSide
from llmgw.metrics import (
    DURATION_BUCKETS,
    TTFT_BUCKETS,
    Counts,
    GatewayCollector,
    LocalMetrics,
    MetricsResource,
    MetricsTotals,
    ParentState,
    WorkerMetrics,
    cumulative_buckets,
    encode_delta,
    metrics_registry,
)
from llmgw.options import Options, split_host_port
from llmgw.record import Attempt, RequestRecord

DEFAULT = "served/model"
A = "https://127.0.0.1:8001"
B = "https://127.0.0.1:8002"


class Gateway:
    """What a worker's metrics read: its in-flight counts and the models its replicas list."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.upstream_in_flight = {A: 0, B: 0}
        self.listed: frozenset[str] = frozenset({"listed/model"})

    def metrics(self) -> WorkerMetrics:
        return WorkerMetrics(
            DEFAULT,
            lambda: self.listed,
            (A, B),
            lambda: self.in_flight,
            lambda: self.upstream_in_flight,
        )


def record(clock: Clock, seconds: float = 0.2, **fields: Any) -> RequestRecord:
    """A request that took C{seconds} on C{clock}, finished now."""
    values: dict[str, Any] = {
        "request_id": "id",
        "client": "127.0.0.1",
        "method": "POST",
        "route": "/v1/chat/completions",
        "model": DEFAULT,
        "status": 200,
        **fields,
    }
    started = clock.seconds()
    clock.advance(seconds)
    return RequestRecord(started=started, finished=clock.seconds(), **values)


def series(delta: Mapping[str, Any], kind: str, name: str) -> dict[tuple[str, ...], Any]:
    return {tuple(labels): value for labels, value in delta[kind].get(name, [])}


def scrape(test: SynchronousTestCase, collector: GatewayCollector) -> dict[str, Any]:
    """The exposition, parsed by prometheus_client's own parser: samples by name and labels."""
    stub: Any = StubTreq(MetricsResource(metrics_registry(collector)))  # methods set per instance
    response = test.successResultOf(stub.get("http://metrics.invalid/metrics"))
    body = test.successResultOf(stub.content(response))
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def state(**fields: Any) -> ParentState:
    return ParentState(**{"workers": 2, "limiter_clients": 0, "upstream_up": {}, **fields})


class WorkerMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = Gateway()
        self.metrics = self.gateway.metrics()

    def test_a_request_counted(self) -> None:
        self.metrics.observe(
            record(
                self.clock,
                0.3,
                stream=True,
                ttft=0.04,
                prompt_tokens=12,
                completion_tokens=30,
                attempts=[Attempt(A, "unreachable"), Attempt(B)],
                retry_reasons=["unreachable"],
            )
        )
        delta = self.metrics.take_delta()
        assert delta is not None
        self.assertEqual(
            series(delta, "counters", "requests_total"), {("/v1/chat/completions", "200"): 1}
        )
        self.assertEqual(
            series(delta, "counters", "tokens_total"),
            {("prompt", DEFAULT): 12, ("completion", DEFAULT): 30},
        )
        self.assertEqual(
            series(delta, "counters", "upstream_requests_total"),
            {(A, "unreachable"): 1, (B, "ok"): 1},
        )
        self.assertEqual(series(delta, "counters", "upstream_retries_total"), {("unreachable",): 1})
        (duration,) = series(delta, "histograms", "request_duration_seconds").values()
        self.assertEqual(duration[DURATION_BUCKETS.index(0.5)], 1)
        self.assertAlmostEqual(duration[-1], 0.3)
        (ttft,) = series(delta, "histograms", "time_to_first_token_seconds").items()
        self.assertEqual(ttft[0], (DEFAULT,))
        self.assertEqual(ttft[1][TTFT_BUCKETS.index(0.05)], 1)
        self.assertEqual(delta["gauges"]["requests_in_flight"], [[[], 0]])

    def test_refusals_and_aborts(self) -> None:
        self.metrics.observe(record(self.clock, status=429, rejected="rate_limit"))
        self.metrics.observe(
            record(self.clock, status=200, stream=True, stream_abort="client_gone")
        )
        self.metrics.observe(record(self.clock, status=400, rejected="made up"))
        delta = self.metrics.take_delta()
        assert delta is not None
        self.assertEqual(
            series(delta, "counters", "rejected_total"), {("rate_limit",): 1, ("other",): 1}
        )
        self.assertEqual(series(delta, "counters", "stream_aborts_total"), {("client_gone",): 1})
        self.assertEqual(
            series(delta, "counters", "requests_total"),
            {
                ("/v1/chat/completions", "429"): 1,
                ("/v1/chat/completions", "200"): 1,
                ("/v1/chat/completions", "400"): 1,
            },
        )

    def test_ttft_only_for_streams(self) -> None:
        self.metrics.observe(record(self.clock, ttft=0.1))
        delta = self.metrics.take_delta()
        assert delta is not None
        self.assertNotIn("time_to_first_token_seconds", delta["histograms"])

    def test_labels_bounded(self) -> None:
        """A model, route, upstream or reason nobody serves is C{other}."""
        for model in ("made-up/model", "listed/model", DEFAULT, None):
            self.metrics.observe(
                record(self.clock, model=model, prompt_tokens=1, route="/v1/../etc")
            )
        self.metrics.observe(
            record(self.clock, attempts=[Attempt("https://user:key@elsewhere:1", "strange")])
        )
        delta = self.metrics.take_delta()
        assert delta is not None
        self.assertEqual(
            series(delta, "counters", "tokens_total"),
            {("prompt", "other"): 2, ("prompt", "listed/model"): 1, ("prompt", DEFAULT): 1},
        )
        self.assertEqual(
            series(delta, "counters", "requests_total"),
            {("other", "200"): 4, ("/v1/chat/completions", "200"): 1},
        )
        self.assertEqual(
            series(delta, "counters", "upstream_requests_total"), {("other", "other"): 1}
        )

    def test_model_listed_later(self) -> None:
        """A model a replica lists from now on is named from now on."""
        self.metrics.observe(record(self.clock, model="new/model", completion_tokens=5))
        self.gateway.listed = frozenset({"new/model"})
        self.metrics.observe(record(self.clock, model="new/model", completion_tokens=7))
        delta = self.metrics.take_delta()
        assert delta is not None
        self.assertEqual(
            series(delta, "counters", "tokens_total"),
            {("completion", "other"): 5, ("completion", "new/model"): 7},
        )

    def test_no_status(self) -> None:
        """A request that ended with no response at all still counts, as C{none}."""
        self.metrics.observe(record(self.clock, status=None))
        delta = self.metrics.take_delta()
        assert delta is not None
        self.assertEqual(
            series(delta, "counters", "requests_total"), {("/v1/chat/completions", "none"): 1}
        )

    def test_delta_is_what_changed(self) -> None:
        self.metrics.observe(record(self.clock))
        first = self.metrics.take_delta()
        assert first is not None
        self.assertIsNone(self.metrics.take_delta(), "nothing changed")
        self.gateway.in_flight = 3
        self.gateway.upstream_in_flight[B] = 2
        second = self.metrics.take_delta()
        assert second is not None
        self.assertEqual(second["counters"], {})
        self.assertEqual(second["gauges"]["requests_in_flight"], [[[], 3]])
        self.assertEqual(second["gauges"]["upstream_in_flight"], [[[A], 0], [[B], 2]])
        self.metrics.observe(record(self.clock))
        third = self.metrics.take_delta()
        assert third is not None
        self.assertEqual(
            series(third, "counters", "requests_total"), {("/v1/chat/completions", "200"): 1}
        )
        always = self.metrics.take_delta(always=True)
        assert always is not None
        self.assertEqual((always["counters"], always["histograms"]), ({}, {}))


class HistogramTests(SynchronousTestCase):
    def test_value_on_a_bound_is_in_that_bucket(self) -> None:
        """Prometheus buckets are C{le}: 0.5 is in the 0.5 bucket, 0.5001 is not."""
        counts = Counts()
        for value in (0.5, 0.5001, 0.0, 600.0, 4000.0):
            counts.observe("request_duration_seconds", ("other",), value)
        (own,) = counts.histograms["request_duration_seconds"].values()
        self.assertEqual(own[DURATION_BUCKETS.index(0.5)], 1)
        self.assertEqual(own[DURATION_BUCKETS.index(1.0)], 1)
        self.assertEqual(own[0], 1)
        self.assertEqual(own[DURATION_BUCKETS.index(600.0)], 1)
        self.assertEqual(own[len(DURATION_BUCKETS)], 1, "past the last bound: +Inf")
        self.assertEqual(sum(own[:-1]), 5)
        self.assertAlmostEqual(own[-1], 0.5 + 0.5001 + 600 + 4000)

    def test_buckets_reach_past_the_default_timeout(self) -> None:
        self.assertGreater(DURATION_BUCKETS[-1], 600.0)
        self.assertGreaterEqual(TTFT_BUCKETS[-1], 600.0)

    def test_cumulative(self) -> None:
        self.assertEqual(
            cumulative_buckets((0.1, 1.0), [2, 0, 3, 9.5]),
            [("0.1", 2), ("1.0", 2), ("+Inf", 5)],
        )


class TotalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.one = Gateway()
        self.two = Gateway()
        self.first = self.one.metrics()
        self.second = self.two.metrics()
        self.totals = MetricsTotals()

    def send(self, source: str, metrics: WorkerMetrics) -> None:
        delta = metrics.take_delta()
        assert delta is not None
        for text in encode_delta(delta):
            self.totals.apply_json(source, text)

    def test_sums_over_workers(self) -> None:
        self.first.observe(record(self.clock, 0.2, prompt_tokens=3))
        self.second.observe(record(self.clock, 0.7, prompt_tokens=4))
        self.second.observe(record(self.clock, 0.01, status=502))
        self.one.in_flight, self.two.in_flight = 2, 5
        self.one.upstream_in_flight[A] = 1
        self.two.upstream_in_flight[A] = 4
        self.send("w1", self.first)
        self.send("w2", self.second)
        counters = self.totals.counts.counters
        self.assertEqual(
            counters["requests_total"],
            {("/v1/chat/completions", "200"): 2, ("/v1/chat/completions", "502"): 1},
        )
        self.assertEqual(counters["tokens_total"], {("prompt", DEFAULT): 7})
        self.assertEqual(self.totals.gauge("requests_in_flight"), {(): 7})
        self.assertEqual(self.totals.gauge("upstream_in_flight"), {(A,): 5, (B,): 0})
        (durations,) = self.totals.counts.histograms["request_duration_seconds"].values()
        self.assertEqual(sum(durations[:-1]), 3)
        self.assertAlmostEqual(durations[-1], 0.91)
        self.assertEqual([self.totals.console_counts(w).served for w in ("w1", "w2")], [1, 2])
        self.assertEqual(self.totals.console_counts("w2").upstream_errors, 1)

    def test_a_source_ended(self) -> None:
        """Its counts stay, its gauges go, and a restart is counted unless stopping."""
        self.first.observe(record(self.clock))
        self.one.in_flight = 2
        self.send("w1", self.first)
        self.two.in_flight = 1
        self.send("w2", self.second)
        self.totals.source_ended("w1", restarting=True)
        self.totals.source_ended("w2", restarting=False)
        self.assertEqual(
            self.totals.counts.counters["requests_total"], {("/v1/chat/completions", "200"): 1}
        )
        self.assertEqual(self.totals.gauge("requests_in_flight"), {})
        self.assertEqual(self.totals.worker_restarts, 1)
        self.assertEqual(self.totals.ended.served, 1)

    def test_nothing_goes_down(self) -> None:
        """A delta that is odd in any way is left out, never subtracted."""
        self.first.observe(record(self.clock))
        self.send("w1", self.first)
        for text in (
            "not json",
            "[1]",
            json.dumps({"counters": {"requests_total": [[["/healthz", "200"], -5]]}}),
            json.dumps({"counters": {"requests_total": [[["/healthz"], 5]]}}),
            json.dumps({"counters": {"nobody_total": [[[], 5]]}}),
            json.dumps({"histograms": {"request_duration_seconds": [[["/healthz"], [1, 2]]]}}),
            json.dumps({"counters": {"requests_total": 7}}),
        ):
            self.totals.apply_json("w1", text)
        self.assertEqual(
            self.totals.counts.counters["requests_total"], {("/v1/chat/completions", "200"): 1}
        )
        self.assertEqual(len(self.flushLoggedErrors()), 0, "logged as a warning, not as an error")

    def test_big_delta_split(self) -> None:
        """A delta over AMP's value limit goes in pieces that add up to it."""
        for number in range(400):
            self.first.observe(record(self.clock, route="/v1/models", status=200 + number))
        self.one.in_flight = 9
        delta = self.first.take_delta()
        assert delta is not None
        pieces = encode_delta(delta, limit=2000)
        self.assertGreater(len(pieces), 5)
        self.assertTrue(all(len(piece.encode()) <= 2000 for piece in pieces))
        whole, split = MetricsTotals(), MetricsTotals()
        whole.apply("w", delta)
        for piece in pieces:
            split.apply_json("w", piece)
        self.assertEqual(split.counts.counters, whole.counts.counters)
        self.assertEqual(split.counts.histograms, whole.counts.histograms)
        self.assertEqual(split.gauge("requests_in_flight"), {(): 9})


class ExpositionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = Gateway()
        self.worker = self.gateway.metrics()
        self.totals = MetricsTotals()

    def collector(self, **fields: Any) -> GatewayCollector:
        def take() -> None:
            delta = self.worker.take_delta()
            if delta is not None:
                self.totals.apply("w1", delta)

        return GatewayCollector(self.totals, lambda: state(**fields), "1.2.3", take)

    def test_parsed_by_prometheus_client(self) -> None:
        self.worker.observe(
            record(
                self.clock, 0.3, stream=True, ttft=0.2, completion_tokens=9, attempts=[Attempt(A)]
            )
        )
        self.worker.observe(record(self.clock, 1200.5, route="/healthz", status=200))
        self.gateway.in_flight = 4
        self.gateway.upstream_in_flight[A] = 3
        self.totals.worker_restarts = 2
        samples = scrape(
            self, self.collector(workers=2, limiter_clients=17, upstream_up={A: True, B: False})
        )
        self.assertEqual(
            samples["llmgw_requests_total"],
            {
                (("code", "200"), ("route", "/healthz")): 1.0,
                (("code", "200"), ("route", "/v1/chat/completions")): 1.0,
            },
        )
        chat = (("route", "/v1/chat/completions"),)
        buckets = samples["llmgw_request_duration_seconds_bucket"]
        self.assertEqual(buckets[(("le", "0.25"), *chat)], 0.0)
        self.assertEqual(buckets[(("le", "0.5"), *chat)], 1.0)
        self.assertEqual(buckets[(("le", "+Inf"), *chat)], 1.0)
        healthz = (("route", "/healthz"),)
        self.assertEqual(buckets[(("le", "1200.0"), *healthz)], 0.0)
        self.assertEqual(buckets[(("le", "1800.0"), *healthz)], 1.0)
        self.assertEqual(samples["llmgw_request_duration_seconds_count"][healthz], 1.0)
        self.assertAlmostEqual(samples["llmgw_request_duration_seconds_sum"][healthz], 1200.5)
        self.assertEqual(
            samples["llmgw_time_to_first_token_seconds_count"], {(("model", DEFAULT),): 1.0}
        )
        self.assertEqual(
            samples["llmgw_tokens_total"], {(("model", DEFAULT), ("type", "completion")): 9.0}
        )
        self.assertEqual(
            samples["llmgw_rejected_total"],
            {
                (("reason", reason),): 0.0
                for reason in ("rate_limit", "auth", "validation", "too_large", "read_timeout")
            },
        )
        self.assertEqual(
            samples["llmgw_stream_aborts_total"],
            {(("cause", c),): 0.0 for c in ("client_gone", "upstream_broke", "idle_timeout")},
        )
        self.assertEqual(
            samples["llmgw_upstream_requests_total"], {(("outcome", "ok"), ("upstream", A)): 1.0}
        )
        self.assertEqual(samples["llmgw_requests_in_flight"], {(): 4.0})
        self.assertEqual(
            samples["llmgw_upstream_in_flight"], {(("upstream", A),): 3.0, (("upstream", B),): 0.0}
        )
        self.assertEqual(
            samples["llmgw_upstream_up"], {(("upstream", A),): 1.0, (("upstream", B),): 0.0}
        )
        self.assertEqual(samples["llmgw_worker_restarts_total"], {(): 2.0})
        self.assertEqual(samples["llmgw_workers"], {(): 2.0})
        self.assertEqual(samples["llmgw_limiter_clients"], {(): 17.0})
        self.assertEqual(samples["llmgw_build_info"], {(("version", "1.2.3"),): 1.0})

    def test_lone_aihost_has_no_upstream_up(self) -> None:
        """A lone --aihost is never checked: no verdict is made up for it."""
        samples = scrape(self, self.collector(upstream_up={}))
        self.assertNotIn("llmgw_upstream_up", samples)
        self.assertEqual(samples["llmgw_requests_in_flight"], {(): 0.0})

    def test_totals_read_at_each_scrape(self) -> None:
        collector = self.collector()
        self.worker.observe(record(self.clock))
        self.assertEqual(len(scrape(self, collector)["llmgw_requests_total"]), 1)
        self.worker.observe(record(self.clock))
        (count,) = scrape(self, collector)["llmgw_requests_total"].values()
        self.assertEqual(count, 2.0)

    def test_openmetrics_when_asked(self) -> None:
        stub: Any = StubTreq(MetricsResource(metrics_registry(self.collector())))
        response = self.successResultOf(
            stub.get(
                "http://metrics.invalid/metrics",
                headers={b"Accept": [b"application/openmetrics-text; version=1.0.0"]},
            )
        )
        self.assertEqual(response.code, 200)
        content_type = response.headers.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"application/openmetrics-text"), content_type)
        self.assertTrue(self.successResultOf(stub.content(response)).endswith(b"# EOF\n"))


class MetricsResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        collector = GatewayCollector(MetricsTotals(), state, "1.2.3")
        self.stub: Any = StubTreq(MetricsResource(metrics_registry(collector)))

    def get(self, path: str, method: str = "GET") -> tuple[int, bytes, Any]:
        response = self.successResultOf(self.stub.request(method, "http://metrics.invalid" + path))
        return response.code, self.successResultOf(self.stub.content(response)), response.headers

    def test_metrics(self) -> None:
        code, body, headers = self.get("/metrics")
        self.assertEqual(code, 200)
        content_type = headers.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"text/plain; version="), content_type)
        self.assertIn(b'\nllmgw_build_info{version="1.2.3"} 1.0\n', body)

    def test_nothing_else(self) -> None:
        for path in ("/", "/metrics/", "/v1/models", "/metricsx"):
            code, body, _ = self.get(path)
            self.assertEqual((code, body), (404, b"Not Found: metrics are at /metrics\n"))
        code, body, headers = self.get("/metrics", "POST")
        self.assertEqual((code, body), (405, b"Method Not Allowed\n"))
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])


class LocalMetricsTests(SynchronousTestCase):
    def test_one_process_holds_its_totals(self) -> None:
        gateway = Gateway()
        local = LocalMetrics(gateway.metrics())
        clock = Clock()
        local.worker.observe(record(clock, status=429, rejected="rate_limit"))
        local.worker.observe(record(clock, status=504))
        counts = local.update().console_counts(LocalMetrics.SOURCE)
        self.assertEqual((counts.served, counts.refused, counts.upstream_errors), (2, 1, 1))
        local.worker.observe(record(clock))
        self.assertEqual(local.update().console_counts(LocalMetrics.SOURCE).served, 3)


class DeltaOverAmpTests(SynchronousTestCase):
    """A worker's L{llmgw.worker.WorkerSide} and the parent's L{ParentSide}, over AMP in memory."""

    def test_sent_and_summed(self) -> None:
        from llmgw.worker import WorkerSide

        totals = MetricsTotals()
        parent = ParentSide(totals, "w1")
        worker = WorkerSide(lambda: None)
        gateway = Gateway()
        worker.metrics = gateway.metrics()
        to_parent, to_worker = StringTransport(), StringTransport()
        worker.makeConnection(to_parent)
        parent.makeConnection(to_worker)

        def pump() -> None:
            while to_parent.value() or to_worker.value():
                data, _ = to_parent.value(), to_parent.clear()
                parent.dataReceived(data)
                data, _ = to_worker.value(), to_worker.clear()
                worker.dataReceived(data)

        clock = Clock()
        worker.metrics.observe(record(clock, prompt_tokens=2))
        gateway.in_flight = 1
        sent = worker.send_metrics()
        self.assertNoResult(sent)
        pump()
        self.successResultOf(sent)
        self.assertEqual(totals.counts.counters["tokens_total"], {("prompt", DEFAULT): 2})
        self.assertEqual(totals.gauge("requests_in_flight"), {(): 1})
        self.successResultOf(worker.send_metrics())  # nothing changed: nothing sent
        self.assertEqual(to_parent.value(), b"")


class MetricsBindOptionTests(SynchronousTestCase):
    """C{--metrics-bind HOST:PORT} (here, with the metrics: tests/test_options.py is not mine)."""

    def parse(self, *argv: str) -> str | None:
        options = Options()
        options.parseOptions(list(argv))
        bind: str | None = options.config.metrics_bind
        return bind

    def test_off_unless_given(self) -> None:
        self.assertIsNone(self.parse())

    def test_accepted(self) -> None:
        for given, kept in (
            ("127.0.0.1:9464", "127.0.0.1:9464"),
            ("0.0.0.0:1", "0.0.0.0:1"),
            ("[::1]:9464", "[::1]:9464"),
            ("[0:0::1]:65535", "[::1]:65535"),
            (" 127.0.0.1:9464 ", "127.0.0.1:9464"),
        ):
            self.assertEqual(self.parse("--metrics-bind", given), kept)
        self.assertEqual(split_host_port("[::1]:9464"), ("::1", 9464))

    def test_refused_with_the_flag_named(self) -> None:
        for value in (
            "9464",
            ":9464",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:port",
            "localhost:9464",
            "::1:9464",
            "[127.0.0.1]:9464",
            "[::1:9464",
            "[nope]:9464",
            "",
        ):
            error = self.assertRaises(
                usage.UsageError, Options().parseOptions, ["--metrics-bind", value]
            )
            self.assertTrue(str(error).startswith(f"--metrics-bind: {value!r}: "), str(error))


class DashboardTests(SynchronousTestCase):
    def test_dashboard_asks_for_metrics_that_exist(self) -> None:
        """Every series contrib/grafana/llmgw.json queries is one the gateway exposes."""
        path = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "llmgw.json"
        if not path.exists():
            raise self.skipTest("run from an installed copy of the tests, without contrib/")
        dashboard = json.loads(path.read_text())
        queried = set(re.findall(r"llmgw_[a-z_]+", path.read_text()))
        clock = Clock()
        worker = Gateway().metrics()
        worker.observe(
            record(
                clock,
                stream=True,
                ttft=0.1,
                prompt_tokens=1,
                attempts=[Attempt(A, "unreachable"), Attempt(B)],
                retry_reasons=["unreachable"],
            )
        )
        totals = MetricsTotals()
        delta = worker.take_delta()
        assert delta is not None
        totals.apply("w", delta)
        collector = GatewayCollector(totals, lambda: state(upstream_up={A: True}), "1")
        exposed = set(scrape(self, collector))
        self.assertEqual(queried - exposed, set())
        self.assertEqual(dashboard["uid"], "llmgw")
        titles = [panel["title"] for panel in dashboard["panels"]]
        self.assertEqual(len(titles), len(set(titles)))
