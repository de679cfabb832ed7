"""Compose the gateway's services from a L{Config}: the twistd plugin's entry point.

C{makeService(options)} is what C{twistd llmgw} calls; L{make_service} takes
the reactor explicitly so tests can check the wiring without starting anything.
With one worker the gateway serves in this process; with more, the parent binds
the socket and hands it to worker processes (L{llmgw.cluster}).
"""

from __future__ import annotations

import ipaddress
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Site

from llmgw import heap
from llmgw.api import GatewayResource
from llmgw.console import ConsoleCommands, console_service, prompt_safe_stdout
from llmgw.health import HealthChecker, OnChange, state_name
from llmgw.keys import KeyRing
from llmgw.logs import AccessLogFile, BatchedAccessLines, RequestLog, use_colour
from llmgw.metrics import (
    GatewayCollector,
    LocalMetrics,
    MetricsResource,
    MetricsTotals,
    ParentState,
    WorkerMetrics,
    gateway_version,
    metrics_registry,
    upstream_up,
)
from llmgw.options import Config, Options, split_host_port
from llmgw.ratelimit import ILimiter, SlidingWindowLimiter

if TYPE_CHECKING:
    from llmgw.cluster import Supervisor
    from llmgw.redisstore import RedisSlidingWindowLimiter
from llmgw.site import GatewaySite
from llmgw.startup import (
    StartupFailure,
    cannot_listen_message,
    refuse_to_start,
    socket_error_text,
)
from llmgw.upstream import UpstreamClient

__all__ = ["Options", "StartupFailure", "makeService", "make_service"]

log = Logger()

SWEEP_SECONDS = 60.0


def build_site(
    config: Config,
    reactor: Any,
    limiter: ILimiter | None,
    keys: KeyRing,
    *,
    colour: bool | None = None,
) -> GatewaySite:
    """The HTTP side of one worker, from its configuration and its limiter."""
    colour = use_colour() if colour is None else colour
    request_log = RequestLog(reactor, verbose=config.verbose, colour=colour)
    resource = GatewayResource(
        config, UpstreamClient(reactor, config), reactor, request_log, limiter, keys
    )
    return GatewaySite(
        resource,
        reactor,
        max_body=config.max_body,
        read_timeout=config.read_timeout,
        # The access line stays whatever the console switches verbose to;
        # the verbose view comes on top of it.  With --access-log, the JSON
        # lines are the access log: a text line in the main log would say
        # the same again, and cost a write and a relay through the parent.
        access_log=None if config.access_log is not None else request_log.access,
        clients=resource.clients,
    )


def local_limiter(config: Config, clock: IReactorTime) -> ILimiter | None:
    """The in-process limiter, or L{None} when C{--rate-limit 0} turns limiting off."""
    if config.rate_limit == 0:
        return None
    return SlidingWindowLimiter(config.rate_limit, config.rate_window, clock)


def shared_rate_store(
    config: Config, reactor: Any, fallback: ILimiter | None, parent: MultiService
) -> RedisSlidingWindowLimiter | None:
    """
    With C{--rate-store}, the limiter shared with other hosts through Redis,
    its connection started with C{parent}; C{fallback}, the embedded limiter,
    decides while Redis cannot.  A missing txredisapi or an unreadable
    password file ends start-up, in one line.
    """
    if config.rate_store is None or not isinstance(fallback, SlidingWindowLimiter):
        return None
    from llmgw.redisstore import shared_limiter

    try:
        limiter, connection = shared_limiter(config, reactor, fallback)
    except ImportError as e:
        refuse_to_start(str(e))
    except OSError as e:
        refuse_to_start(f"--rate-store-password-file: {e.strerror or e}")
    connection.setServiceParent(parent)
    return limiter


def listening_endpoint(config: Config, reactor: IReactorTCP, backlog: int = 1024) -> Any:
    if ipaddress.ip_address(config.bindip).version == 6:
        return TCP6ServerEndpoint(reactor, config.bindport, backlog, config.bindip)
    return TCP4ServerEndpoint(reactor, config.bindport, backlog, config.bindip)


class GatewayService(MultiService):
    """
    Everything C{twistd llmgw} runs.  The listening socket is bound in
    C{privilegedStartService}, by this process's listener or by the
    L{llmgw.cluster.Supervisor}; either way a port that cannot be bound stops
    start-up with one line that names the flag (L{cannot_listen_message}).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as error:
            refuse_to_start(cannot_listen_message(error))


class KeyReloadService(Service):
    """Reload key files on SIGHUP, without touching a connection; reopen the access log."""

    def __init__(
        self, keys: KeyRing, reactor: Any, access_log: AccessLogFile | None = None
    ) -> None:
        self.keys = keys
        self.reactor = reactor
        self.access_log = access_log
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.keys.reload)
        if self.access_log is not None:
            self.reactor.callFromThread(self.access_log.reopen)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        return super().stopService()  # type: ignore[no-untyped-call]


class AccessLogService(Service):
    """
    Open the C{--access-log} file as the gateway starts (after twistd's
    C{--uid} has taken effect, so that a reopen can do what the first open
    did), or end start-up with one line that says why it cannot be.

    It is never closed early: lines keep coming until the last request has
    drained, and every batch is flushed as it is written.  In a lone process,
    the batch of the last turn is written once the reactor has stopped.

    @ivar lines: this process's batches of lines, if it serves by itself.
    """

    def __init__(
        self, access_log: AccessLogFile, reactor: Any, lines: BatchedAccessLines | None = None
    ) -> None:
        self.access_log = access_log
        self.reactor = reactor
        self.lines = lines

    def startService(self) -> None:
        try:
            self.access_log.open()
        except OSError as e:
            refuse_to_start(f"--access-log {self.access_log.path}: {e.strerror}")
        super().startService()  # type: ignore[no-untyped-call]
        if self.lines is not None:
            self.reactor.addSystemEventTrigger("after", "shutdown", self.lines.flush)


class DrainService(Service):
    """
    On stop, let the requests in hand finish (up to C{--grace}), then exit 0.

    It is added before the listening service, so that L{MultiService} stops the
    listener first.  A stop by SIGTERM or SIGINT that drained cleanly is a
    success: twistd would otherwise re-raise the signal on exit, and systemd
    and shells would see a killed process instead of exit status 0.
    """

    def __init__(self, site: GatewaySite, grace: float, reactor: Any) -> None:
        self.site = site
        self.grace = grace
        self.reactor = reactor

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.site.drain(self.grace).addCallback(lambda _: clear_exit_signal(self.reactor))


def clear_exit_signal(reactor: Any) -> None:
    """Exit 0 after a graceful stop (see L{DrainService})."""
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


class _ClusterExit(Service):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        clear_exit_signal(self.reactor)


class SweepService(Service):
    """Forget idle clients once a minute, so memory is returned after a flood."""

    def __init__(self, limiter: SlidingWindowLimiter, reactor: Any) -> None:
        self.loop = LoopingCall(limiter.sweep)
        self.loop.clock = reactor

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.loop.start(SWEEP_SECONDS, now=False)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.loop.running:
            self.loop.stop()


def health_checker(
    config: Config, keys: KeyRing, reactor: Any, on_change: OnChange
) -> HealthChecker | None:
    """The checks of the C{--upstream} replicas; none for a lone C{--aihost}."""
    if not config.upstreams:
        return None
    return HealthChecker(
        config.upstreams,
        UpstreamClient(reactor, config, log_failures=False),
        keys,
        reactor,
        config.health_interval,
        on_change,
    )


class MetricsListener(StreamServerEndpointService):
    """
    The C{--metrics-bind} listener: C{GET /metrics} on its own port, never
    the API's.  Bound at start-up, so a busy port stops start-up with one
    line that names the flag.  On stop it keeps serving until C{keep_until}
    fires (the drain), so that a scrape can watch the drain and its last counts.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        registry: Any,
        keep_until: Callable[[], Deferred[Any]] | None = None,
    ) -> None:
        assert config.metrics_bind is not None
        self.bind = config.metrics_bind
        self.keep_until = keep_until
        host, port = split_host_port(config.metrics_bind)
        endpoint_type = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        site = Site(MetricsResource(registry), reactor=reactor)
        site.noisy = False
        super().__init__(endpoint_type(reactor, port, 50, host), site)  # type: ignore[no-untyped-call]
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as error:
            refuse_to_start(f"--metrics-bind {self.bind}: {socket_error_text(error)}")

    def stopService(self) -> Deferred[None]:
        if self.keep_until is None:
            return self._stop_listening()

        def drained(_: object) -> Deferred[None]:
            return self._stop_listening()

        stopped: Deferred[None] = self.keep_until().addBoth(drained)
        return stopped

    def _stop_listening(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        return stopped


def metrics_listener(
    config: Config,
    reactor: Any,
    totals: MetricsTotals,
    parent_state: Callable[[], ParentState],
    before_collect: Callable[[], object] | None = None,
    keep_until: Callable[[], Deferred[Any]] | None = None,
) -> MetricsListener | None:
    """The C{/metrics} listener over C{totals}, or L{None} without C{--metrics-bind}."""
    if config.metrics_bind is None:
        return None
    collector = GatewayCollector(totals, parent_state, gateway_version(), before_collect)
    return MetricsListener(config, reactor, metrics_registry(collector), keep_until)


class LocalCommands:
    """The console's commands when the one process serves by itself."""

    def __init__(
        self,
        resource: GatewayResource,
        limiter: ILimiter | None,
        reactor: Any,
        health: HealthChecker | None = None,
        metrics: LocalMetrics | None = None,
    ):
        self.resource = resource
        self.limiter = limiter
        self.reactor = reactor
        self.health = health
        self.metrics = (
            metrics if metrics is not None else LocalMetrics(WorkerMetrics.of_resource(resource))
        )

    def stats(self) -> Deferred[dict[str, Any]]:
        """The one row; served, refused and upstream errors are the metrics' figures."""
        counters = self.resource.counters
        counts = self.metrics.update().console_counts(LocalMetrics.SOURCE)
        row = {
            "worker": 1,
            "pid": os.getpid(),
            "served": counts.served,
            "in_flight": counters.in_flight,
            "refused": counts.refused,
            "upstream_errors": counts.upstream_errors,
            "uptime": self.reactor.seconds() - counters.started,
        }
        tracked = local_clients(self.limiter)
        replicas = [
            {"state": state_name(self.health, row["upstream"]), **row}
            for row in self.resource.router.counts()
        ]
        return succeed({"workers": [row], "tracked_clients": tracked, "replicas": replicas})

    def set_verbose(self, on: bool) -> Deferred[None]:
        self.resource.request_log.verbose = on
        return succeed(None)

    def shutdown(self) -> None:
        self.reactor.stop()


def local_clients(limiter: ILimiter | None) -> int:
    """The clients an in-process limiter tracks (none for another kind, or none at all)."""
    return len(limiter) if isinstance(limiter, SlidingWindowLimiter) else 0


def workers_ended(supervisor: Supervisor) -> Deferred[Any]:
    """Fires once every worker running now has ended."""
    ended: Deferred[Any] = gatherResults(
        [worker.ended for worker in list(supervisor.workers.values())], consumeErrors=True
    )
    return ended


def cluster_state(supervisor: Supervisor) -> ParentState:
    """What the parent knows itself, for C{/metrics}."""
    limiter = supervisor.limiter
    return ParentState(
        workers=len(supervisor.workers),
        limiter_clients=0 if limiter is None else len(limiter),
        upstream_up=upstream_up(supervisor.health),
    )


class ClusterCommands:
    """The console's commands in the parent: every worker is asked over AMP."""

    def __init__(self, supervisor: Supervisor, reactor: Any) -> None:
        self.supervisor = supervisor
        self.reactor = reactor

    def stats(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self.supervisor.stats())

    def set_verbose(self, on: bool) -> Deferred[None]:
        return Deferred.fromCoroutine(self.supervisor.set_verbose(on))

    def shutdown(self) -> None:
        self.reactor.stop()


def make_service(
    config: Config, reactor: Any, stdout: TextIO | None = None, console: bool = True
) -> MultiService:
    """Everything C{twistd llmgw} runs, wired but not started."""
    top = GatewayService()
    log.info(
        "llmgw on {bindip}:{bindport} with {workers} worker(s), forwarding to {upstream}",
        bindip=config.bindip,
        bindport=config.bindport,
        workers=config.workers,
        upstream=", ".join(config.origins),
    )
    # Fail now, with a usage-style message, rather than in every worker.
    keys = KeyRing(config.aikey_file, config.api_keys_file)
    access_log = None if config.access_log is None else AccessLogFile(config.access_log)
    access_lines = None
    if access_log is not None:
        if config.workers == 1:
            access_lines = BatchedAccessLines(reactor, access_log.write)
        opener = AccessLogService(access_log, reactor, access_lines)
        opener.setServiceParent(top)  # type: ignore[no-untyped-call]
    if config.workers > 1:
        from llmgw.cluster import Supervisor

        supervisor = Supervisor(config, reactor, colour=use_colour())
        supervisor.access_log = access_log
        supervisor.keys = keys
        _ClusterExit(reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
        # Before the supervisor, so that it is stopped after the workers drained:
        # the requests in hand are still admitted by the shared limit.
        supervisor.rate_store = shared_rate_store(config, reactor, supervisor.limiter, top)
        cluster_metrics = metrics_listener(
            config,
            reactor,
            supervisor.metrics,
            lambda: cluster_state(supervisor),
            keep_until=lambda: workers_ended(supervisor),
        )
        if cluster_metrics is not None:
            # Before the supervisor, so that its stop is asked for after the drain began.
            cluster_metrics.setServiceParent(top)  # type: ignore[no-untyped-call]
        supervisor.setServiceParent(top)  # type: ignore[no-untyped-call]
        supervisor.health = health_checker(config, keys, reactor, supervisor.replica_state_changed)
        if supervisor.health is not None:
            supervisor.health.setServiceParent(top)  # type: ignore[no-untyped-call]
        if supervisor.limiter is not None:
            SweepService(supervisor.limiter, reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
        commands: ConsoleCommands = ClusterCommands(supervisor, reactor)
    else:
        KeyReloadService(keys, reactor, access_log).setServiceParent(top)  # type: ignore[no-untyped-call]
        limiter = local_limiter(config, reactor)
        shared = shared_rate_store(config, reactor, limiter, top)
        site = build_site(config, reactor, limiter if shared is None else shared, keys)
        if access_lines is not None:
            site.record_observers.append(access_lines.add_record)
        resource = cast(GatewayResource, site.resource)
        health = health_checker(config, keys, reactor, resource.router.set_health)
        if health is not None:
            health.setServiceParent(top)  # type: ignore[no-untyped-call]
        local_metrics = LocalMetrics(WorkerMetrics.of_resource(resource))
        site.record_observers.append(local_metrics.worker.observe)
        listener = metrics_listener(
            config,
            reactor,
            local_metrics.totals,
            lambda: ParentState(1, local_clients(limiter), upstream_up(health)),
            local_metrics.update,
        )
        if listener is not None:
            # Before the drain, so that it is stopped after it.
            listener.setServiceParent(top)  # type: ignore[no-untyped-call]
        DrainService(site, config.grace, reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
        if isinstance(limiter, SlidingWindowLimiter):
            SweepService(limiter, reactor).setServiceParent(top)
        server = StreamServerEndpointService(listening_endpoint(config, reactor), site)
        # Like twisted.application.strports: a port that cannot be bound ends
        # start-up (see GatewayService) instead of a gateway that serves nothing.
        server._raiseSynchronously = True
        server.setServiceParent(top)
        commands = LocalCommands(resource, limiter, reactor, health, local_metrics)
    if console:
        # Added last, so that it is the first service stopped.
        console_service(commands, reactor, stdout=stdout).setServiceParent(top)
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    # Before twistd builds its log observer on sys.stdout, so that log lines
    # can be printed above the console's prompt instead of through it.
    service = make_service(options.config, reactor, stdout=prompt_safe_stdout())
    heap.settle()
    return service
