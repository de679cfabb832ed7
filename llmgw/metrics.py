"""Prometheus metrics: counted in each worker, summed in the parent, rendered there.

Every worker counts its finished requests in memory (L{WorkerMetrics}, fed by
the site's record observers) and, at least once a second and once more as it
drains, sends the parent what changed since it last did, as a JSON delta over
AMP.  The parent adds the deltas into L{MetricsTotals}, which only grow, so a
worker that dies loses at most its last second and a scrape never sees a
counter go down.  prometheus_client's multiprocess mode would do the summing
with one file per pid, which piles up for every worker that ever ran, and one
torn file breaks every scrape; a delta in a pipe has neither problem.

The parent renders the totals with a custom collector (L{GatewayCollector})
in a private registry, served by L{MetricsResource} on its own listener
(C{--metrics-bind}), never on the API port.  With one worker the same classes
run in one process, and the collector takes the worker's delta at scrape time.

Labels stay bounded: C{route} is one of L{llmgw.record.ROUTES} or C{other},
C{model} one of the models served (the replicas' listings and
C{--default-model}) or C{other}, C{upstream} a configured replica's name (its
origin, without credentials), and reasons, causes and outcomes are fixed
words.  Nothing in a label comes from a client but through those checks.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import attrs
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from llmgw.health import HealthChecker
from llmgw.record import ABORT_CAUSES, OUTCOMES, REJECT_REASONS, ROUTES, RequestRecord

log = Logger()

PREFIX = "llmgw_"

#: Seconds; they reach past the 600 s default C{--timeout}, since a whole
#: reply (or a long stream) may take that long and more.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)

#: Seconds to a stream's first event, on the same scale from 10 ms up to the
#: 600 s default C{--timeout}: a loaded model server queues for minutes.
TTFT_BUCKETS = tuple(bound for bound in DURATION_BUCKETS if 0.01 <= bound <= 600.0)

#: What a worker sends its delta after: the issue asks for at least once a second.
SEND_INTERVAL = 1.0

#: The largest delta sent in one AMP value (AMP's limit is 65535 bytes).
MAX_DELTA_BYTES = 60_000

OTHER = "other"

Labels = tuple[str, ...]


@attrs.frozen
class Family:
    """One metric: its name without the prefix, type, label names and help."""

    name: str
    kind: str
    labels: Labels
    help: str
    buckets: tuple[float, ...] = ()


COUNTERS = {
    family.name: family
    for family in (
        Family("requests_total", "counter", ("route", "code"), "Responses, by route and status."),
        Family(
            "tokens_total",
            "counter",
            ("type", "model"),
            "Tokens the model servers reported in usage, prompt and completion.",
        ),
        Family(
            "rejected_total",
            "counter",
            ("reason",),
            "Requests refused before they reached a model server, by reason.",
        ),
        Family(
            "stream_aborts_total",
            "counter",
            ("cause",),
            "Streamed replies that ended before the model server finished them.",
        ),
        Family(
            "upstream_requests_total",
            "counter",
            ("upstream", "outcome"),
            "Attempts at each model server, by how they ended.",
        ),
        Family(
            "upstream_retries_total",
            "counter",
            ("reason",),
            "Attempts made at another model server, by why the previous one failed.",
        ),
    )
}

HISTOGRAMS = {
    family.name: family
    for family in (
        Family(
            "request_duration_seconds",
            "histogram",
            ("route",),
            "Seconds from a request's first byte to its last byte sent.",
            DURATION_BUCKETS,
        ),
        Family(
            "time_to_first_token_seconds",
            "histogram",
            ("model",),
            "Seconds from a streamed request's first byte to its first event.",
            TTFT_BUCKETS,
        ),
    )
}

#: Gauges each worker reports as they are; the parent sums the live workers'.
WORKER_GAUGES = {
    family.name: family
    for family in (
        Family("requests_in_flight", "gauge", (), "Requests being served."),
        Family(
            "upstream_in_flight",
            "gauge",
            ("upstream",),
            "Requests in flight at each model server.",
        ),
    )
}

#: Counter series shown at zero before anything happened, so that a rate
#: over them starts at once and a dashboard shows every reason.
ZERO_SERIES: dict[str, tuple[Labels, ...]] = {
    "rejected_total": tuple((reason,) for reason in REJECT_REASONS),
    "stream_aborts_total": tuple((cause,) for cause in ABORT_CAUSES),
}


def bounded(value: str | None, allowed: tuple[str, ...]) -> str:
    """C{value} if it is one of C{allowed}, else L{OTHER}."""
    return value if value is not None and value in allowed else OTHER


class Counts:
    """
    Counters and histograms by family and label values.

    A histogram is kept as its buckets' own counts (not cumulative), the
    last one for C{+Inf}, followed by the sum of the values observed.
    """

    def __init__(self) -> None:
        self.counters: dict[str, dict[Labels, float]] = {name: {} for name in COUNTERS}
        self.histograms: dict[str, dict[Labels, list[float]]] = {name: {} for name in HISTOGRAMS}

    def add(self, name: str, labels: Labels, amount: float = 1) -> None:
        series = self.counters[name]
        series[labels] = series.get(labels, 0) + amount

    def observe(self, name: str, labels: Labels, value: float) -> None:
        buckets = HISTOGRAMS[name].buckets
        series = self.histograms[name]
        counts = series.get(labels)
        if counts is None:
            counts = series[labels] = [0.0] * (len(buckets) + 2)
        counts[bisect_left(buckets, value)] += 1
        counts[-1] += value

    def __bool__(self) -> bool:
        return any(self.counters.values()) or any(self.histograms.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "counters": {
                name: [[list(labels), value] for labels, value in series.items()]
                for name, series in self.counters.items()
                if series
            },
            "histograms": {
                name: [[list(labels), counts] for labels, counts in series.items()]
                for name, series in self.histograms.items()
                if series
            },
        }

    def merge(self, delta: Mapping[str, Any]) -> None:
        """
        Add a delta from L{to_json}.  Whatever does not fit (an unknown
        family, the wrong number of labels or buckets, a negative count) is
        left out, so that one odd delta cannot make a total go down or
        break a scrape.
        """
        for name, entries in (delta.get("counters") or {}).items():
            family = COUNTERS.get(name)
            if family is None:
                continue
            for labels, value in entries:
                if len(labels) == len(family.labels) and _amount(value):
                    self.add(name, tuple(str(label) for label in labels), value)
        for name, entries in (delta.get("histograms") or {}).items():
            family = HISTOGRAMS.get(name)
            if family is None:
                continue
            for labels, counts in entries:
                if (
                    len(labels) != len(family.labels)
                    or len(counts) != len(family.buckets) + 2
                    or not all(_amount(count) for count in counts)
                ):
                    continue
                key = tuple(str(label) for label in labels)
                series = self.histograms[name]
                total = series.setdefault(key, [0.0] * len(counts))
                for i, count in enumerate(counts):
                    total[i] += count


def _amount(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


class WorkerMetrics:
    """
    One worker's counts since it last reported, from its finished requests.

    L{observe} is one of the site's record observers; L{take_delta} hands
    over what changed and starts again from nothing.

    @param served_models: the model ids the router's replicas list now.
    @param in_flight: the worker's requests in flight now.
    @param upstream_in_flight: each replica's requests in flight now.
    """

    def __init__(
        self,
        default_model: str,
        served_models: Callable[[], frozenset[str]],
        upstreams: tuple[str, ...],
        in_flight: Callable[[], int],
        upstream_in_flight: Callable[[], Mapping[str, int]],
    ) -> None:
        self.default_model = default_model
        self.served_models = served_models
        self.upstreams = upstreams
        self.in_flight = in_flight
        self.upstream_in_flight = upstream_in_flight
        self.pending = Counts()
        self._gauges_sent: dict[str, Any] | None = None

    @classmethod
    def of_resource(cls, resource: Any) -> WorkerMetrics:
        """The metrics of a L{llmgw.api.GatewayResource}: its router, its counters."""
        router = resource.router
        return cls(
            resource.config.default_model,
            lambda: router.served_models,
            tuple(replica.name for replica in router.replicas),
            lambda: int(resource.counters.in_flight),
            lambda: {replica.name: replica.in_flight for replica in router.replicas},
        )

    def model_label(self, model: str | None) -> str:
        """A served model's id, or L{OTHER} for anything a client made up."""
        if model is not None and (model == self.default_model or model in self.served_models()):
            return model
        return OTHER

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request."""
        counts = self.pending
        route = bounded(record.route, ROUTES)
        code = "none" if record.status is None else str(int(record.status))
        counts.add("requests_total", (route, code))
        duration = record.duration
        if duration is not None:
            counts.observe("request_duration_seconds", (route,), max(duration, 0.0))
        model = None
        if record.prompt_tokens or record.completion_tokens or record.ttft is not None:
            model = self.model_label(record.model)
        if record.stream and record.ttft is not None:
            counts.observe("time_to_first_token_seconds", (model or OTHER,), max(record.ttft, 0.0))
        if record.prompt_tokens:
            counts.add("tokens_total", ("prompt", model or OTHER), record.prompt_tokens)
        if record.completion_tokens:
            counts.add("tokens_total", ("completion", model or OTHER), record.completion_tokens)
        if record.rejected is not None:
            counts.add("rejected_total", (bounded(record.rejected, REJECT_REASONS),))
        if record.stream_abort is not None:
            counts.add("stream_aborts_total", (bounded(record.stream_abort, ABORT_CAUSES),))
        for attempt in record.attempts:
            upstream = bounded(attempt.upstream, self.upstreams)
            counts.add("upstream_requests_total", (upstream, bounded(attempt.outcome, OUTCOMES)))
        for reason in record.retry_reasons:
            counts.add("upstream_retries_total", (bounded(reason, OUTCOMES),))

    def gauges(self) -> dict[str, Any]:
        return {
            "requests_in_flight": [[[], self.in_flight()]],
            "upstream_in_flight": [
                [[name], count]
                for name, count in self.upstream_in_flight().items()
                if name in self.upstreams
            ],
        }

    def take_delta(self, always: bool = False) -> dict[str, Any] | None:
        """
        What changed since the last delta, with the gauges as they are now;
        L{None} when nothing did (unless C{always}), so an idle worker sends nothing.
        """
        gauges = self.gauges()
        if not self.pending and gauges == self._gauges_sent and not always:
            return None
        delta = self.pending.to_json()
        delta["gauges"] = gauges
        self.pending = Counts()
        self._gauges_sent = gauges
        return delta


def encode_delta(delta: Mapping[str, Any], limit: int = MAX_DELTA_BYTES) -> list[str]:
    """
    A delta as JSON texts each under C{limit} bytes, for AMP's 64 KiB values.

    A worker's second of counts fits in one almost always; a very busy worker
    behind many models and replicas may need a few.  The gauges go whole in
    the first.
    """
    text = json.dumps(delta, separators=(",", ":"))
    if len(text.encode()) <= limit:
        return [text]
    pieces: list[dict[str, Any]] = [{"gauges": delta.get("gauges") or {}}]
    size = len(json.dumps(pieces[0]))
    for kind in ("counters", "histograms"):
        for name, entries in (delta.get(kind) or {}).items():
            for entry in entries:
                entry_size = len(json.dumps(entry).encode()) + len(name) + 32
                if size + entry_size > limit:
                    pieces.append({})
                    size = 2
                piece = pieces[-1].setdefault(kind, {}).setdefault(name, [])
                piece.append(entry)
                size += entry_size
    return [json.dumps(piece, separators=(",", ":")) for piece in pieces]


@attrs.define
class ConsoleCounts:
    """One row's figures in the console's C{stats}, taken from the same counts as the metrics."""

    served: int = 0
    refused: int = 0
    upstream_errors: int = 0

    def add(self, delta: Mapping[str, Any]) -> None:
        counters = delta.get("counters") or {}
        for labels, value in counters.get("requests_total") or ():
            if not _amount(value):
                continue
            self.served += int(value)
            if len(labels) == 2 and labels[1] in ("502", "504"):
                self.upstream_errors += int(value)
        for _, value in counters.get("rejected_total") or ():
            if _amount(value):
                self.refused += int(value)

    def __add__(self, other: ConsoleCounts) -> ConsoleCounts:
        return ConsoleCounts(
            self.served + other.served,
            self.refused + other.refused,
            self.upstream_errors + other.upstream_errors,
        )


class MetricsTotals:
    """
    The gateway's totals, in the parent (or the one process): they only grow.

    Deltas are added as they come, from each source (a worker process).  A
    source's gauges count while it lives; when it ends they are dropped, and
    its console figures are kept under L{ended}.

    @ivar worker_restarts: workers that ended while the gateway was not stopping.
    """

    def __init__(self) -> None:
        self.counts = Counts()
        self.gauges: dict[Hashable, dict[str, list[Any]]] = {}
        self.by_source: dict[Hashable, ConsoleCounts] = {}
        self.ended = ConsoleCounts()
        self.worker_restarts = 0

    def apply(self, source: Hashable, delta: Mapping[str, Any]) -> None:
        self.counts.merge(delta)
        self.by_source.setdefault(source, ConsoleCounts()).add(delta)
        gauges = delta.get("gauges")
        if isinstance(gauges, dict):
            self.gauges.setdefault(source, {}).update(
                (name, value)
                for name, value in gauges.items()
                if name in WORKER_GAUGES and isinstance(value, list)
            )

    def apply_json(self, source: Hashable, text: str) -> None:
        """A delta as a worker sent it; one that cannot be read is logged and left out."""
        try:
            delta = json.loads(text)
            if not isinstance(delta, dict):
                raise ValueError("not an object")
            self.apply(source, delta)
        except (ValueError, TypeError, AttributeError) as e:
            log.warn("A metrics delta was left out: {why}", why=str(e) or type(e).__name__)

    def source_ended(self, source: Hashable, restarting: bool) -> None:
        self.gauges.pop(source, None)
        self.ended = self.ended + self.by_source.pop(source, ConsoleCounts())
        if restarting:
            self.worker_restarts += 1

    def console_counts(self, source: Hashable) -> ConsoleCounts:
        return self.by_source.get(source, ConsoleCounts())

    def gauge(self, name: str, source: Hashable | None = None) -> dict[Labels, float]:
        """A worker gauge summed over the live sources (or one source's)."""
        sums: dict[Labels, float] = {}
        sources = self.gauges.values() if source is None else [self.gauges.get(source, {})]
        for gauges in sources:
            for entry in gauges.get(name, ()):
                try:
                    labels, value = entry
                    key = tuple(str(label) for label in labels)
                    sums[key] = sums.get(key, 0) + float(value)
                except (TypeError, ValueError):
                    continue
        return sums


@attrs.frozen
class ParentState:
    """What the parent knows itself, read at each scrape."""

    workers: int
    limiter_clients: int
    upstream_up: Mapping[str, bool]
    """Each checked replica's verdict; none for a lone C{--aihost}, which is never checked."""


class GatewayCollector:
    """
    A prometheus_client collector over L{MetricsTotals} and the parent's own state.

    @param before_collect: called first at each scrape; with one process it
        adds that process's latest counts to the totals.
    """

    def __init__(
        self,
        totals: MetricsTotals,
        parent_state: Callable[[], ParentState],
        version: str,
        before_collect: Callable[[], object] | None = None,
    ) -> None:
        self.totals = totals
        self.parent_state = parent_state
        self.version = version
        self.before_collect = before_collect

    def collect(self) -> Iterator[Metric]:
        if self.before_collect is not None:
            self.before_collect()
        totals = self.totals
        for name, family in COUNTERS.items():
            metric = CounterMetricFamily(PREFIX + name, family.help, labels=family.labels)
            series = dict.fromkeys(ZERO_SERIES.get(name, ()), 0.0)
            series.update(totals.counts.counters[name])
            for labels, value in sorted(series.items()):
                metric.add_metric(labels, value)
            yield metric
        for name, family in HISTOGRAMS.items():
            histogram = HistogramMetricFamily(PREFIX + name, family.help, labels=family.labels)
            for labels, counts in sorted(totals.counts.histograms[name].items()):
                histogram.add_metric(labels, cumulative_buckets(family.buckets, counts), counts[-1])
            yield histogram
        for name, family in WORKER_GAUGES.items():
            gauge = GaugeMetricFamily(PREFIX + name, family.help, labels=family.labels)
            sums = totals.gauge(name)
            if not family.labels:
                sums.setdefault((), 0.0)
            for labels, value in sorted(sums.items()):
                gauge.add_metric(labels, value)
            yield gauge
        state = self.parent_state()
        up = GaugeMetricFamily(
            PREFIX + "upstream_up",
            "Whether the health checks find each --upstream replica up (1) or down (0).",
            labels=("upstream",),
        )
        for name, is_up in state.upstream_up.items():
            up.add_metric((name,), 1.0 if is_up else 0.0)
        yield up
        yield CounterMetricFamily(
            PREFIX + "worker_restarts_total",
            "Workers restarted after they ended on their own.",
            value=totals.worker_restarts,
        )
        yield GaugeMetricFamily(
            PREFIX + "workers", "Worker processes running.", value=state.workers
        )
        yield GaugeMetricFamily(
            PREFIX + "limiter_clients",
            "Clients the rate limiter tracks.",
            value=state.limiter_clients,
        )
        info = GaugeMetricFamily(
            PREFIX + "build_info", "The llmgw version serving.", labels=("version",)
        )
        info.add_metric((self.version,), 1.0)
        yield info


def cumulative_buckets(bounds: tuple[float, ...], counts: list[float]) -> list[tuple[str, float]]:
    """Prometheus's C{le} buckets from each bucket's own count (the sum last, left out)."""
    buckets = []
    running = 0.0
    for bound, count in zip((*bounds, float("inf")), counts[:-1], strict=True):
        running += count
        buckets.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
    return buckets


def gateway_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmgw")
    except PackageNotFoundError:
        return "unknown"


def metrics_registry(collector: GatewayCollector) -> CollectorRegistry:
    """A registry of its own: the process's default one would add Python's own metrics."""
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


class MetricsResource(Resource):
    """
    C{GET /metrics} and nothing else, for the C{--metrics-bind} listener.

    The format follows the scraper's C{Accept} (Prometheus text, or
    OpenMetrics), as prometheus_client's own handler does.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        if request.path != b"/metrics":
            return _plain(request, 404, b"Not Found: metrics are at /metrics\n")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _plain(request, 405, b"Method Not Allowed\n")
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        try:
            body = encoder(self.registry)
        except Exception:
            log.failure("Rendering the metrics failed")
            return _plain(request, 500, b"Internal Server Error\n")
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        return body


def _plain(request: Request, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body


class LocalMetrics:
    """
    One process serving alone: its own counts are the totals, with no AMP
    between them; they are brought up to date whenever they are read.
    """

    SOURCE = "local"

    def __init__(self, worker: WorkerMetrics) -> None:
        self.worker = worker
        self.totals = MetricsTotals()

    def update(self) -> MetricsTotals:
        delta = self.worker.take_delta()
        if delta is not None:
            self.totals.apply(self.SOURCE, delta)
        return self.totals


def upstream_up(checker: HealthChecker | None) -> dict[str, bool]:
    """The checked replicas' verdicts; none for a lone C{--aihost}, which is never checked."""
    if checker is None:
        return {}
    return {
        name: replica.up for name, replica in checker.replicas.items() if replica.up is not None
    }
