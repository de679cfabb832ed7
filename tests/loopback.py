"""Real servers on 127.0.0.1 for integration tests: the stand-in model and the gateway.

Everything listens on port 0 of the loopback interface and is torn down by the
test's cleanups, so no test can reach anything but this machine.
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.ssl import PrivateCertificate
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmgw.api import GatewayResource
from llmgw.devtls import CertificateAuthority, issue_server_certificate, make_ca
from llmgw.keys import KeyRing
from llmgw.logs import RequestLog
from llmgw.mock import (
    DEFAULT_MODEL,
    Behaviour,
    MockModel,
    MockService,
    QuietSite,
    make_resource,
)
from llmgw.options import Config
from llmgw.ratelimit import ILimiter
from llmgw.record import RequestRecord
from llmgw.site import GatewaySite
from llmgw.upstream import UpstreamClient

reactor: Any = _reactor

CHAT = b"/v1/chat/completions"
JSON_HEADERS = {b"Content-Type": [b"application/json"]}


def inline(
    f: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Deferred[None]]:
    """Let trial run an C{async def} test (Twisted 22.4's trial cannot by itself)."""

    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return run


def chat_body(text: str = "Hello there", **fields: object) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], **fields}).encode()


@attrs.frozen
class Reply:
    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else values[0]


@attrs.frozen
class Upstream:
    """A running stand-in model and what a gateway needs to trust it."""

    port: int
    model: MockModel
    ca_file: str
    service: MockService


def write_ca(test: TestCase, ca: CertificateAuthority) -> str:
    path = Path(test.mktemp() + ".pem")
    path.write_bytes(ca.cert_pem)
    return str(path)


def start_upstream(
    test: TestCase,
    *,
    tls: bool = True,
    defaults: Behaviour = Behaviour(),  # noqa: B008
    ca: CertificateAuthority | None = None,
    hostnames: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
    clock: IReactorTime | None = None,
    served_model: str = DEFAULT_MODEL,
) -> Upstream:
    """Serve the stand-in model on 127.0.0.1, over TLS from a CA made for this test."""
    ca = make_ca() if ca is None else ca
    model = MockModel(reactor if clock is None else clock, defaults, served_model)
    site = QuietSite(make_resource(model))
    if tls:
        cert_pem, key_pem = issue_server_certificate(ca, hostnames, ips)
        options = PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        endpoint: Any = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
    else:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    service = MockService(model, endpoint, site)
    service.startService()
    test.addCleanup(service.stopService)
    assert service.port is not None
    return Upstream(port_of(service.port), model, write_ca(test, ca), service)


def gateway_config(upstream: Upstream | None = None, **overrides: Any) -> Config:
    """A configuration aimed at a loopback upstream (never the default: a deployment's)."""
    if upstream is not None:
        overrides = {"aihostport": upstream.port, "aica": upstream.ca_file, **overrides}
    return Config(**{"aihost": "localhost", "aihostport": 9, **overrides})


def replicas_config(ca_file: str, ports: list[int], **overrides: Any) -> Config:
    """A configuration with C{--upstream} replicas on loopback, trusting the test's CA."""
    upstreams = tuple(f"https://localhost:{port}" for port in ports)
    return Config(**{"upstreams": upstreams, "aica": ca_file, **overrides})


@attrs.define
class Gateway:
    """A gateway on loopback, and the record of every request it finished, in order."""

    port: int
    resource: GatewayResource
    site: GatewaySite
    records: list[RequestRecord] = attrs.Factory(list)


def start_gateway(
    test: TestCase,
    config: Config,
    *,
    clock: IReactorTime | None = None,
    limiter: ILimiter | None = None,
    keys: KeyRing | None = None,
) -> Gateway:
    """Serve the gateway on 127.0.0.1:0 with the real reactor; C{clock} runs its deadlines."""
    clock = reactor if clock is None else clock
    upstream = UpstreamClient(reactor, config, clock)
    test.addCleanup(upstream.pool.closeCachedConnections)
    resource = GatewayResource(
        config, upstream, clock, RequestLog(clock, verbose=False, colour=False), limiter, keys
    )
    site = GatewaySite(
        resource,
        reactor,
        max_body=config.max_body,
        read_timeout=config.read_timeout,
        clients=resource.clients,
    )
    port: IListeningPort = reactor.listenTCP(0, site, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    gateway = Gateway(port_of(port), resource, site)
    site.record_observers.append(gateway.records.append)
    return gateway


def free_port() -> int:
    """A loopback port nothing listens on (for a model server that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_post(body: bytes, path: bytes = CHAT) -> bytes:
    """A whole JSON POST, as bytes for a plain socket."""
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body)
    )


def port_of(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


def client(test: TestCase) -> treq.client.HTTPClient:
    """A treq client whose connections end with the test."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))


async def request(
    test: TestCase,
    port: int,
    method: str = "POST",
    path: bytes = CHAT,
    body: bytes | None = None,
    headers: dict[bytes, list[bytes]] | None = None,
) -> Reply:
    """One request to a local server; the whole reply."""
    http = client(test)
    if headers is None:
        headers = JSON_HEADERS if body is not None else {}
    response = await http.request(
        method,
        f"http://127.0.0.1:{port}".encode() + path,
        data=body,
        headers=Headers(headers),
    )
    content = await treq.content(response)
    return Reply(response.code, response.headers, content)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait on the real reactor until C{condition()} holds (for events in other sockets)."""
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition never held")
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01
