"""Compose the gateway's services from a L{Config}: the twistd plugin's entry point.

C{makeService(options)} is what C{twistd llmgw} calls; L{make_service} takes
the reactor explicitly so tests can check the wiring without starting anything.
With one worker the gateway serves in this process; with more, the parent binds
the socket and hands it to worker processes (L{llmgw.cluster}).
"""

from __future__ import annotations

import ipaddress
import signal
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger

from llmgw.api import GatewayResource
from llmgw.keys import KeyRing
from llmgw.logs import RequestLog, use_colour
from llmgw.options import Config, Options
from llmgw.ratelimit import ILimiter, SlidingWindowLimiter
from llmgw.site import GatewaySite
from llmgw.upstream import UpstreamClient

__all__ = ["Options", "makeService", "make_service"]

log = Logger()


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
        access_log=None if config.verbose else request_log.access,
    )


def local_limiter(config: Config, clock: IReactorTime) -> ILimiter | None:
    """The in-process limiter, or L{None} when C{--rate-limit 0} turns limiting off."""
    if config.rate_limit == 0:
        return None
    return SlidingWindowLimiter(config.rate_limit, config.rate_window, clock)


def listening_endpoint(config: Config, reactor: IReactorTCP, backlog: int = 1024) -> Any:
    if ipaddress.ip_address(config.bindip).version == 6:
        return TCP6ServerEndpoint(reactor, config.bindport, backlog, config.bindip)
    return TCP4ServerEndpoint(reactor, config.bindport, backlog, config.bindip)


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


def make_service(config: Config, reactor: Any) -> MultiService:
    """Everything C{twistd llmgw} runs, wired but not started."""
    top = MultiService()
    log.info(
        "llmgw on {bindip}:{bindport} with {workers} worker(s), forwarding to {upstream}",
        bindip=config.bindip,
        bindport=config.bindport,
        workers=config.workers,
        upstream=config.upstream_base.decode(),
    )
    # Fail now, with a usage-style message, rather than in every worker.
    keys = KeyRing(config.aikey_file, config.api_keys_file)
    if config.workers > 1:
        from llmgw.cluster import Supervisor

        supervisor = Supervisor(config, reactor, colour=use_colour())
        _ClusterExit(reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
        supervisor.setServiceParent(top)  # type: ignore[no-untyped-call]
        return top
    KeyReloadService(keys, reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
    site = build_site(config, reactor, local_limiter(config, reactor), keys)
    DrainService(site, config.grace, reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
    server = StreamServerEndpointService(listening_endpoint(config, reactor), site)
    # Like twisted.application.strports: a port that cannot be bound ends
    # start-up with the error instead of a gateway that serves nothing.
    server._raiseSynchronously = True
    server.setServiceParent(top)
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return make_service(options.config, reactor)
