"""A worker process: adopt the parent's socket, serve, ask the parent to admit.

Started by L{llmgw.cluster.Supervisor} as C{python -m llmgw.worker CONFIG N
COLOUR} with the listening socket on file descriptor 3, AMP to the parent on
stdin/stdout, and its log on stderr.  It ignores SIGINT (a Ctrl-C in the
terminal reaches the whole process group; the parent decides), drains on
SIGTERM, and drains too when its stdin closes, because that means the parent
is gone, even if it was killed with SIGKILL.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import ILogObserver, Logger, eventAsText, globalLogBeginner
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from llmgw import heap
from llmgw.admission import (
    FROM_PARENT_FD,
    RECORD,
    RELEASE,
    TO_PARENT_FD,
    AdmissionQuestions,
    AdmitExpired,
    Answer,
    ParentError,
)
from llmgw.api import GatewayResource
from llmgw.cluster import (
    AccessLogLines,
    MetricsDelta,
    QuietAMP,
    ReplicaState,
    SetVerbose,
    WorkerStats,
    access_log_chunks,
    config_from_json,
)
from llmgw.errors import rate_store_unavailable
from llmgw.health import decode_models
from llmgw.keys import KeyRing
from llmgw.logs import BatchedAccessLines
from llmgw.metrics import SEND_INTERVAL, WorkerMetrics, encode_delta
from llmgw.options import Config
from llmgw.ratelimit import Decision, ILimiter, SlidingWindowLimiter
from llmgw.redisstore import RateStoreUnavailable
from llmgw.site import GatewaySite

log = Logger()

LISTENING_FD = 3

#: Seconds a worker waits for the parent's admission before deciding alone.
ADMIT_TIMEOUT = 1.0

#: Seconds a draining worker waits for the parent to take its last metrics.
FINAL_METRICS_TIMEOUT = 2.0


@implementer(ILimiter)
class RemoteLimiter:
    """
    The parent's limiter, seen from a worker.

    If the parent cannot answer (gone, or slower than L{ADMIT_TIMEOUT}), the
    worker falls back to a local limiter holding its share, C{limit // workers},
    of the limit, at the cost of refusing some clients sooner.  Both
    transitions are logged.

    Only the first request of a stall waits: while a question that timed out
    is still unanswered, the fallback decides at once, and the answer to that
    question is what shows the parent is back.  The parent's count stays what
    was served: each question carries the time the worker stops waiting, after
    which the parent does not record it; what the fallback admits is reported
    with its time (L{llmgw.admission.RECORD}); and an admission the parent
    recorded for a question the worker had just given up on is released
    (L{llmgw.admission.RELEASE}).  The pipe to the parent is in order, so all of that
    is counted before the parent's next decision for this worker.
    """

    def __init__(
        self,
        parent: AdmissionQuestions,
        fallback: SlidingWindowLimiter,
        fallback_share: int,
        clock: IReactorTime,
    ) -> None:
        self.parent = parent
        self.fallback = fallback
        self.fallback_share = fallback_share
        self.clock = clock
        self.degraded = False
        self._waiting_for_parent = False

    def admit(self, key: str) -> Deferred[Decision]:
        if self._waiting_for_parent:
            return succeed(self._fallback_decides(key))
        result: Deferred[Decision] = Deferred()
        timer = self.clock.callLater(ADMIT_TIMEOUT, self._time_out, result, key)
        deadline = self.clock.seconds() + ADMIT_TIMEOUT

        def answered(answer: Answer) -> None:
            self._parent_answers()
            decision, admitted_at = answer
            if result.called:
                if admitted_at is not None:
                    self.parent.tell(RELEASE, key, admitted_at)
                return
            timer.cancel()
            result.callback(decision)

        def failed(failure: Failure) -> None:
            if failure.check(AdmitExpired):
                # Read too late, though before this worker's timer fired.
                self._parent_answers()
                if not result.called:
                    timer.cancel()
                    result.callback(self._fallback_decides(key))
            elif failure.check(RateStoreUnavailable):
                # --rate-store-fallback closed: the parent answered, with a 503.
                self._parent_answers()
                if not result.called:
                    timer.cancel()
                    retry_after = failure.value.retry_after  # type: ignore[union-attr]
                    result.errback(rate_store_unavailable(retry_after))
            else:
                if failure.check(ParentError):
                    # An answer, if not the one asked for: the parent is alive,
                    # so later requests ask it again rather than the fallback.
                    self._parent_answers()
                if not result.called:
                    timer.cancel()
                    self._give_up(result, key, failure.getErrorMessage())

        self.parent.ask(key, deadline).addCallbacks(answered, failed)
        return result

    def _time_out(self, result: Deferred[Decision], key: str) -> None:
        self._waiting_for_parent = True
        self._give_up(result, key, "timed out")

    def _give_up(self, result: Deferred[Decision], key: str, why: str) -> None:
        if not self.degraded:
            self.degraded = True
            log.error(
                "The parent's limiter cannot be reached ({why}); admitting by this "
                "worker's share of the limit ({share}) until it answers",
                why=why,
                share=self.fallback_share,
            )
        result.callback(self._fallback_decides(key))

    def _parent_answers(self) -> None:
        self._waiting_for_parent = False
        if self.degraded:
            self.degraded = False
            log.info("The parent's limiter answers again")

    def _fallback_decides(self, key: str) -> Decision:
        decision = self.fallback.decide(key)
        if decision.allowed:
            # Queued on the same pipe as the questions, so counted in order.
            self.parent.tell(RECORD, key, self.clock.seconds())
        return decision


class WorkerSide(QuietAMP):
    """What a worker answers the parent: its counters, and verbose on or off."""

    resource: GatewayResource | None = None
    metrics: WorkerMetrics | None = None

    def __init__(self, on_parent_gone: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.on_parent_gone = on_parent_gone

    def send_metrics(self, always: bool = False) -> Deferred[None]:
        """
        Send the parent what the counts gained since the last delta; fire once
        it has them all (or cannot: it is gone, and the counts with it).
        """
        delta = None if self.metrics is None else self.metrics.take_delta(always)
        if delta is None or self.transport is None:
            return succeed(None)
        sent = [
            self.callRemote(MetricsDelta, delta=text)  # type: ignore[no-untyped-call]
            for text in encode_delta(delta)
        ]
        done: Deferred[Any] = gatherResults(sent, consumeErrors=True)
        return done.addCallbacks(lambda _: None, lambda _: None)

    @WorkerStats.responder
    def stats(self) -> dict[str, Any]:
        assert self.resource is not None
        # Sent ahead of this answer, in order on the same pipe: the parent's
        # totals are current by the time it reads the answer.
        self.send_metrics()
        counters = self.resource.counters
        return {
            "served": counters.served,
            "in_flight": counters.in_flight,
            "refused": counters.refused,
            "upstream_errors": counters.upstream_errors,
            "uptime": self.resource.clock.seconds() - counters.started,
            "replicas": json.dumps(self.resource.router.counts()),
        }

    @ReplicaState.responder
    def replica_state(self, upstream: str, up: bool, models: str) -> dict[str, Any]:
        assert self.resource is not None
        self.resource.router.set_health(upstream, up, decode_models(models))
        return {}

    @SetVerbose.responder
    def set_verbose(self, on: bool) -> dict[str, Any]:
        assert self.resource is not None
        self.resource.request_log.verbose = on
        return {}

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.on_parent_gone()


#: Connections a worker accepts per wake-up.  Every worker is woken for each
#: new connection, and Twisted accepts up to a hundred in a row, so a burst of
#: connections can land whole on one worker while the other idles; one at a
#: time spreads them, but under a flood of new connections lets the listen
#: queue overflow (the stream benchmark lost connections that way).
ACCEPTS_PER_WAKEUP = 8


def accept_a_few_at_a_time(port: Any) -> None:
    """Cap the connections taken per wake-up at L{ACCEPTS_PER_WAKEUP}."""
    accept = port.doRead

    def accept_a_few() -> Any:
        port.numberAccepts = ACCEPTS_PER_WAKEUP
        return accept()

    port.doRead = accept_a_few


class SharedListeningSocket:
    """
    The adopted listening socket, as the port's accept loop sees it.

    A stop begins in the parent by shutting the shared socket down, which
    stops it listening in every process at once (see
    L{llmgw.cluster.Supervisor.stopService}).  The reactor usually sees that
    as a hang-up and closes the port; but a worker already woken to accept
    gets C{EINVAL} from C{accept()}, which Twisted's port would log as an
    unhandled error.  Here that ends the port instead, quietly: no connection
    will ever come through this socket again.
    """

    def __init__(self, listening: socket.socket, port: Any) -> None:
        self._listening = listening
        self._port = port

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return self._listening.accept()
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            stop_accepting(self._port)
            # What the accept loop takes for "no more connections now".
            raise BlockingIOError(errno.EAGAIN, "the socket no longer listens") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._listening, name)


def stop_accepting(port: Any) -> Deferred[None]:
    """
    Stop the port, unless it has stopped already (the parent shut the shared
    socket down: see L{SharedListeningSocket}); stopping it twice would close
    it twice.
    """
    if port.connected and not port.disconnecting:
        stopped: Deferred[None] = port.stopListening()
        return stopped
    return succeed(None)


@implementer(ILogObserver)
class BatchedLines:
    """
    Log lines for the parent, written once per reactor turn rather than each alone.

    Under load a worker logs a line per request; one write per turn instead of
    one per line saves system calls here and wake-ups in the parent.
    """

    def __init__(self, stream: Any, reactor: Any) -> None:
        self.stream = stream
        self.reactor = reactor
        self.lines: list[str] = []

    def __call__(self, event: Any) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        if not text:
            return
        if not self.lines:
            self.reactor.callLater(0, self.flush)
        self.lines.append(text + "\n")

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        self.stream.write("".join(lines))
        self.stream.flush()


def send_access_lines(parent: amp.AMP, lines: str) -> None:
    """Hand a batch of C{--access-log} lines to the parent, which writes the one file."""
    for chunk in access_log_chunks(lines):
        parent.callRemote(AccessLogLines, lines=chunk)


def _log_to_stderr(reactor: Any) -> BatchedLines:
    """Plain lines on stderr; the parent adds the time and the worker's number."""
    observer = BatchedLines(sys.stderr, reactor)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
    return observer


def serve(config: Config, colour: bool, reactor: Any) -> None:
    from llmgw.service import build_site

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state: dict[str, Any] = {"stopping": False}

    def stop() -> None:
        if not state["stopping"]:
            state["stopping"] = True
            reactor.stop()

    parent = WorkerSide(lambda: reactor.callLater(0, stop))
    keys = KeyRing(config.aikey_file, config.api_keys_file)
    limiter: ILimiter | None = None
    if config.rate_limit:
        share = max(0, math.floor(config.rate_limit / config.workers))
        fallback = SlidingWindowLimiter(max(share, 1), config.rate_window, reactor)
        questions = AdmissionQuestions()
        # POSIX's StandardIO takes its descriptors; mypy sees Windows' signature.
        StandardIO(  # type: ignore[call-arg]
            questions, stdin=FROM_PARENT_FD, stdout=TO_PARENT_FD, reactor=reactor
        )
        limiter = RemoteLimiter(questions, fallback, max(share, 1), reactor)
    site: GatewaySite = build_site(config, reactor, limiter, keys, colour=colour)
    parent.resource = site.resource
    access_lines: BatchedAccessLines | None = None
    if config.access_log is not None:
        access_lines = BatchedAccessLines(reactor, lambda lines: send_access_lines(parent, lines))
        site.record_observers.append(access_lines.add_record)
    parent.metrics = WorkerMetrics.of_resource(site.resource)
    site.record_observers.append(parent.metrics.observe)
    sending = LoopingCall(parent.send_metrics)
    sending.clock = reactor
    family = socket.AF_INET6 if ":" in config.bindip else socket.AF_INET
    port = reactor.adoptStreamPort(LISTENING_FD, family, site)
    accept_a_few_at_a_time(port)
    port.socket = SharedListeningSocket(port.socket, port)
    # adoptStreamPort duplicates the descriptor; ours would keep the socket alive.
    os.close(LISTENING_FD)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(keys.reload))

    async def drain() -> None:
        try:
            await stop_accepting(port)
        except Exception:
            # The requests in hand must still finish: a failed drain would
            # let the reactor stop at once and close their connections.
            log.failure("Stopping the listening port")
        await site.drain(config.grace)
        if sending.running:
            sending.stop()
        # The last counts, and gauges at zero; waited for, so they are in
        # the parent's totals before this process exits.
        final = parent.send_metrics(always=True)
        final.addTimeout(FINAL_METRICS_TIMEOUT, reactor)
        await final.addErrback(lambda _: None)
        if access_lines is not None:
            access_lines.flush()
            # A turn of the reactor, for the pipe to the parent to take them.
            await deferLater(reactor, 0.01, lambda: None)

    reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(drain()))
    StandardIO(parent, reactor=reactor)
    sending.start(SEND_INTERVAL, now=False)
    heap.settle()
    reactor.run()


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    config = config_from_json(arguments[0])
    from twisted.internet import reactor

    _log_to_stderr(reactor)

    log.info("Worker {number} serving", number=arguments[1])
    serve(config, arguments[2] == "colour", reactor)


if __name__ == "__main__":
    main()
