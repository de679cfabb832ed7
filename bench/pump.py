"""
The stream floor: the least Twisted can do per relayed SSE event.

    python bench/pump.py PORT UPSTREAM_HOST UPSTREAM_PORT CAFILE WORKERS

A byte pump, no HTTP at all: each client connection (plain TCP, as to the
gateway) gets its own verified TLS connection to the upstream, and bytes are
copied both ways as they come, with flow control each way.  Any HTTP gateway
on Twisted pays at least this per relayed chunk and per stream opened (a TLS
handshake to the upstream), so the bench's stream tests use it as the
reference for the gateway's CPU.  WORKERS processes adopt one listening socket.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

from twisted.internet import protocol, reactor, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

#: The environment variable that tells a worker which descriptor is the socket.
WORKER_FD = "PUMP_FD"
PR_SET_PDEATHSIG = 1


class UpstreamSide(protocol.Protocol):
    """The TLS connection to the upstream: its bytes go to the client."""

    def __init__(self, client: ClientSide) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.client.connected_upstream(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.client.transport.loseConnection()


class ClientSide(protocol.Protocol):
    """A client's connection: held paused until its upstream connection is up."""

    def __init__(self, upstream: IStreamClientEndpoint) -> None:
        self.upstream_endpoint = upstream
        self.upstream: UpstreamSide | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        connecting = self.upstream_endpoint.connect(
            protocol.Factory.forProtocol(lambda: UpstreamSide(self))
        )
        connecting.addErrback(lambda _: self.transport.loseConnection())

    def connected_upstream(self, upstream: UpstreamSide) -> None:
        """Each side throttles the other; then pass on what arrived meanwhile."""
        self.upstream = upstream
        upstream.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(upstream.transport, True)
        for data in self.pending:
            upstream.transport.write(data)
        self.pending = []
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


def serve(fd: int, host: str, port: int, cafile: str) -> None:
    """One worker: adopt the parent's listening socket and pump until killed."""
    with open(cafile, "rb") as f:
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
    creator = ssl.optionsForClientTLS(host, trustRoot=trust)
    upstream = wrapClientTLS(creator, HostnameEndpoint(reactor, host, port))
    factory = protocol.Factory.forProtocol(lambda: ClientSide(upstream))
    factory.noisy = False
    reactor.adoptStreamPort(fd, socket.AF_INET, factory)
    # The bench reads idle memory, and starts its load, once every worker says this.
    reactor.callWhenRunning(print, "serving", flush=True)
    reactor.run()


def supervise(port: int, workers: int) -> None:
    """Bind 127.0.0.1:PORT, start WORKERS copies of this script on it, wait for them."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    listener.set_inheritable(True)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            os.environ[WORKER_FD] = str(listener.fileno())
            os.execv(sys.executable, [sys.executable, *sys.argv])
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def main() -> None:
    port, host, upstream_port, cafile, workers = sys.argv[1:6]
    if WORKER_FD in os.environ:
        # A worker never outlives its parent: the bench kills the parent's session.
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        serve(int(os.environ[WORKER_FD]), host, int(upstream_port), cafile)
    else:
        supervise(int(port), int(workers))


if __name__ == "__main__":
    main()
