"""Compose the gateway's services from a L{Config}: the twistd plugin's entry point.

C{makeService(options)} is what C{twistd llmgw} calls; L{make_service} takes
the reactor explicitly so tests can check the wiring without starting anything.
With one worker the gateway serves in this process; with more, the parent binds
the socket and hands it to worker processes (L{llmgw.cluster}).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmgw.api import GatewayResource
from llmgw.console import ConsoleCommands, console_service, prompt_safe_stdout
from llmgw.health import HealthChecker, OnChange, state_name
from llmgw.keys import KeyRing
from llmgw.logs import RequestLog, use_colour
from llmgw.options import Config, Options
from llmgw.ratelimit import ILimiter, SlidingWindowLimiter

if TYPE_CHECKING:
    from llmgw.cluster import Supervisor
    from llmgw.redisstore import RedisSlidingWindowLimiter
from llmgw.site import GatewaySite
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
        # the verbose view comes on top of it.
        access_log=request_log.access,
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


class StartupFailure(SystemExit, Exception):
    """
    Start-up cannot go on, for a reason the operator fixes with a flag.

    A L{SystemExit} with status 1, so that neither twistd nor Python prints a
    traceback on the way out; an L{Exception} too, so that a daemonizing
    twistd still reports it, message and all, to the command that started it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 1


def refuse_to_start(message: str) -> NoReturn:
    """
    Tell the operator why, in one line on the real standard error (twistd has
    turned C{sys.stderr} into log events by now), and end start-up.  A daemon's
    standard error is C{/dev/null}: its log file gets the line instead, and
    twistd passes the message on to the command that started it.
    """
    stderr = sys.__stderr__
    if stderr is None or _is_dev_null(stderr):
        log.error("{line}", line=message)
    else:
        stderr.write(message + "\n")
        stderr.flush()
    raise StartupFailure(message)


def _is_dev_null(stream: TextIO) -> bool:
    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))
    except (OSError, ValueError):
        return True


def cannot_listen_message(
    error: CannotListenError, port_flag: str = "--bindport", ip_flag: str = "--bindip"
) -> str:
    """
    C{--bindport 42069: address already in use}: what went wrong, named by
    the flag that fixes it, the port's for a busy or privileged port and the
    address's for an address this host does not have.
    """
    reason = error.socketError
    code = getattr(reason, "errno", None)
    text = os.strerror(code) if isinstance(code, int) else str(reason)
    text = text[:1].lower() + text[1:]
    if code == errno.EADDRNOTAVAIL:
        return f"{ip_flag} {error.interface}: {text}"
    if code in (errno.EADDRINUSE, errno.EACCES):
        return f"{port_flag} {error.port}: {text}"
    return f"{ip_flag} {error.interface} {port_flag} {error.port}: {text}"


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
    """Reload key files on SIGHUP, without touching a connection."""

    def __init__(self, keys: KeyRing, reactor: Any) -> None:
        self.keys = keys
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.keys.reload)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        return super().stopService()  # type: ignore[no-untyped-call]


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


class LocalCommands:
    """The console's commands when the one process serves by itself."""

    def __init__(
        self,
        resource: GatewayResource,
        limiter: ILimiter | None,
        reactor: Any,
        health: HealthChecker | None = None,
    ):
        self.resource = resource
        self.limiter = limiter
        self.reactor = reactor
        self.health = health

    def stats(self) -> Deferred[dict[str, Any]]:
        counters = self.resource.counters
        row = {
            "worker": 1,
            "pid": os.getpid(),
            "served": counters.served,
            "in_flight": counters.in_flight,
            "refused": counters.refused,
            "upstream_errors": counters.upstream_errors,
            "uptime": self.reactor.seconds() - counters.started,
        }
        tracked = len(self.limiter) if isinstance(self.limiter, SlidingWindowLimiter) else 0
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
    if config.workers > 1:
        from llmgw.cluster import Supervisor

        supervisor = Supervisor(config, reactor, colour=use_colour())
        _ClusterExit(reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
        supervisor.setServiceParent(top)  # type: ignore[no-untyped-call]
        supervisor.health = health_checker(config, keys, reactor, supervisor.replica_state_changed)
        if supervisor.health is not None:
            supervisor.health.setServiceParent(top)  # type: ignore[no-untyped-call]
        supervisor.rate_store = shared_rate_store(config, reactor, supervisor.limiter, top)
        if supervisor.limiter is not None:
            SweepService(supervisor.limiter, reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
        commands: ConsoleCommands = ClusterCommands(supervisor, reactor)
    else:
        KeyReloadService(keys, reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
        limiter = local_limiter(config, reactor)
        shared = shared_rate_store(config, reactor, limiter, top)
        site = build_site(config, reactor, limiter if shared is None else shared, keys)
        resource = cast(GatewayResource, site.resource)
        health = health_checker(config, keys, reactor, resource.router.set_health)
        if health is not None:
            health.setServiceParent(top)  # type: ignore[no-untyped-call]
        DrainService(site, config.grace, reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
        if isinstance(limiter, SlidingWindowLimiter):
            SweepService(limiter, reactor).setServiceParent(top)
        server = StreamServerEndpointService(listening_endpoint(config, reactor), site)
        # Like twisted.application.strports: a port that cannot be bound ends
        # start-up (see GatewayService) instead of a gateway that serves nothing.
        server._raiseSynchronously = True
        server.setServiceParent(top)
        commands = LocalCommands(resource, limiter, reactor, health)
    if console:
        # Added last, so that it is the first service stopped.
        console_service(commands, reactor, stdout=stdout).setServiceParent(top)
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    # Before twistd builds its log observer on sys.stdout, so that log lines
    # can be printed above the console's prompt instead of through it.
    return make_service(options.config, reactor, stdout=prompt_safe_stdout())
